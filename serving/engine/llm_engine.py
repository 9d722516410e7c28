"""`LLMEngine`: requests in, tokens and text out, one `step()` at a time (vLLM's synchronous engine API).

Each step asks the scheduler for pieces, runs them on the executor, samples a token for every sequence whose
last token was computed, detokenizes incrementally, applies stop conditions, and frees the KV slot of every
request that finished. `generate()` loops `step()` until its requests are done; `AsyncLLMEngine` runs the same
loop in a background thread and streams deltas.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from llama4.config import TextConfig
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.errors import WorkerDiedError
from serving.engine.outputs import (CompletionOutput, EngineStats, Logprob, RequestDelta, RequestMetrics,
                                    RequestOutput)
from serving.engine.params import SamplingParams, sample_seed
from serving.engine.sampling import choose_tokens, top_logprobs
from serving.engine.scheduler import Request, RequestStatus, Scheduler

log = logging.getLogger(__name__)


class LLMEngine:
    """Continuous-batching engine over one executor (in-process, or expert-parallel over Ray workers)."""

    def __init__(self, executor, tokenizer, config: TextConfig, *, max_model_len: int, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 2048, eos_token_ids: Sequence[int] = (),
                 enable_prefix_caching: bool = True, model_config=None):
        from serving.engine.kv_cache import KVCacheManager

        self.executor = executor
        self.tokenizer = tokenizer
        self.config = config
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids or config.eos_token_ids)
        # One block manager per node: the executor's workers hold the blocks, the engine decides who uses them.
        self.kv = KVCacheManager(executor.kv_plan, executor.num_nodes, enable_prefix_caching)
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, config.attention_chunk_size, self.kv)
        self.image_support = _image_support(executor, tokenizer, model_config)  # None: text-only checkpoint
        self._requests: dict[str, Request] = {}
        self._pending: list[Request] = []  # finished outside a step (abort): reported by the next step
        self._seq_ids = itertools.count()
        self._gen_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.prompt_tokens_computed = 0  # prompt tokens the model ran (a prefix-cache hit skips the rest)
        self.generation_tokens_total = 0
        self.engine_config = None  # the serving.config.EngineConfig it was built from, if any

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "LLMEngine":
        """Load a checkpoint folder (Hugging Face layout) and build the engine around it.

        Keywords (vLLM's names where vLLM has the concept; all in serving/config.py): dtype, device,
        max_num_seqs, max_num_batched_tokens, max_model_len, kv_cache_memory_bytes, lora_adapter (a PEFT LoRA
        folder, merged into the weights as they load), and for expert parallelism expert_parallel_size,
        tensor_parallel_size, nodes, placement, placement_group, weights, s3_endpoint_url, cache_dir and the
        workers' resources. An unknown keyword, or one the chosen layout would not use, is an error.
        """
        from serving.build import build_executor
        from serving.config import EngineConfig

        config = EngineConfig.from_kwargs(path, **kwargs)
        if not config.model.skip_tokenizer_init:  # refuse a folder without tokenizer files before loading weights
            from serving.engine.tokenizer import TOKENIZER_FILES, load_tokenizer

            if any(not (config.model.path / f).is_file() for f in TOKENIZER_FILES):
                load_tokenizer(config.model.path)
        return cls.from_config(config, build_executor(config))

    @classmethod
    def from_config(cls, config, executor) -> "LLMEngine":
        """The engine for a validated `serving.config.EngineConfig` around an executor built for it.

        With `skip_tokenizer_init` (vLLM's option) there is no tokenizer: prompts are token ids, outputs token ids
        (text empty)."""
        from serving.engine.tokenizer import load_tokenizer

        m = config.model
        tokenizer = None if m.skip_tokenizer_init else load_tokenizer(m.path)
        engine = cls(executor, tokenizer, m.text, max_model_len=config.cache.max_model_len,
                     max_num_seqs=config.scheduler.max_num_seqs,
                     max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                     eos_token_ids=generation_eos_ids(m.path, m.text),
                     enable_prefix_caching=config.cache.enable_prefix_caching, model_config=m)
        engine.engine_config = config
        return engine

    # ---- requests --------------------------------------------------------------------------------
    def _decode_one(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the checkpoint's own chat template, ready for a reply."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat_prompt(self, messages: list[dict]) -> dict:
        """A prompt dict for chat messages whose content may hold image parts (serving/engine/multimodal.py)."""
        from serving.engine.multimodal import chat_prompt

        return chat_prompt(self, messages)

    def make_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                     arrival_time: float | None = None, cache_salt: str | None = None) -> Request:
        """Tokenize and validate a request without touching engine state (safe from another thread).

        cache_salt: mixed into the request's prefix-cache keys (vLLM's field), so only requests with the same salt
        share cached blocks: a shared prefix cache is a timing side channel between tenants.
        """
        params = params or SamplingParams()
        images = None
        if self.tokenizer is None and (isinstance(prompt, (str, dict)) or params.stop_list):
            raise ValueError("this engine has no tokenizer (skip_tokenizer_init=True): give the prompt as token ids, "
                             "and stop on stop_token_ids rather than stop strings")
        if isinstance(prompt, dict):  # vLLM-style {"prompt" | "prompt_token_ids", "multi_modal_data": {"image"}}
            from serving.engine.multimodal import parse_prompt

            text, ids, images = parse_prompt(self, prompt)
        elif isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}; shorten the "
                             "prompt (it and at least one generated token must fit)")
        why = self.kv.never_fits(len(ids) + 1)
        if why:
            raise ValueError(f"prompt has {len(ids)} tokens: {why}; shorten the prompt or give the engine a larger "
                             "kv_cache_memory_bytes")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        bad = [t for t in params.logit_bias or () if t >= self.config.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        arrival, cache_key = arrival_time or time.time(), _cache_key(cache_salt, images)

        def sample(index: int) -> Request:
            seed = sample_seed(params.seed, index)
            # A CPU generator on purpose: the sampler draws seeded rows on it, so a seed means the same on every
            # device.
            gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
            grammar = self.grammars.new_state(params.structured_outputs) if params.structured_outputs else None
            return Request(request_id, next(self._seq_ids), text, ids, params, max_tokens, RequestMetrics(arrival),
                           IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens), gen,
                           logprobs=[] if params.logprobs is not None else None, grammar=grammar,
                           prompt_logprobs=[None] if params.prompt_logprobs is not None else None, images=images,
                           cache_key=cache_key, index=index)

        req = sample(0)
        if params.n > 1:  # the other samples wait for sample 0's prompt, then fork from it (_fork_samples)
            req.group = [req] + [sample(i) for i in range(1, params.n)]
            req.held = req.group[1:]
            for other in req.held:
                other.group = req.group
        return req

    @property
    def grammars(self):
        """The structured-output grammar compiler (serving/engine/structured.py), made on first use."""
        if getattr(self, "_grammars", None) is None:
            from serving.engine.structured import Grammars

            self._grammars = Grammars(self.tokenizer, self.config.vocab_size, sorted(self.eos_token_ids))
        return self._grammars

    def add_request(self, request_id: str, prompt: str | list[int] | dict | Request,
                    params: SamplingParams | None = None, arrival_time: float | None = None,
                    cache_salt: str | None = None) -> None:
        req = prompt if isinstance(prompt, Request) else self.make_request(request_id, prompt, params, arrival_time,
                                                                           cache_salt)
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self._requests[req.request_id] = req
        self.scheduler.add(req)
        self.prompt_tokens_total += len(req.prompt_token_ids)

    def abort_request(self, request_id: str | Sequence[str]) -> None:
        """Stop requests now and free their cache; each (each sample, with n > 1) is reported once more with
        finish_reason "abort"."""
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            req = self._requests.get(rid)
            for sample in req.samples if req is not None else ():
                if not sample.finished:
                    self._finish(sample, "abort")
                    self._pending.append(sample)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- stepping --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; outputs of every request that gained tokens or finished (one per request, all its
        samples in it)."""
        firsts = {id(r.samples[0]): r.samples[0] for r in self._step()}
        return [self._output(r) for r in firsts.values()]

    def step_deltas(self) -> list[RequestDelta]:
        """Run one step; what each changed sequence gained since its previous delta (for streaming): one delta
        per sample (`index`), and `finished` on the last delta of a request whose samples are all done."""
        changed = self._step()
        deltas = [self._delta(r) for r in changed]
        seen: set[int] = set()
        for req, delta in zip(reversed(changed), reversed(deltas)):
            group = id(req.samples[0])
            delta.finished = group not in seen and all(r.finished for r in req.samples)
            seen.add(group)
        return deltas

    def _step(self) -> list[Request]:
        changed, self._pending = self._pending, []
        pieces = self.scheduler.schedule()
        if not pieces:
            return changed
        now = time.time()
        for p in pieces:
            if p.request.metrics.first_scheduled_time is None:
                p.request.metrics.first_scheduled_time = now
            if p.request.images:  # the vision tower runs here, once per image, when its patches are first due
                p.chunk.mm_embeds = self.image_support.chunk_embeds(p.request.images, p.chunk.start_pos,
                                                                    len(p.chunk.token_ids))
        try:
            logits_NV = self.executor.execute([p.chunk for p in pieces])
        except WorkerDiedError as exc:
            return changed + self._fail_running(exc)
        except Exception as exc:  # this batch failed; the device and the other requests are fine
            return changed + self._fail_step(pieces, exc)
        done = [p for p in pieces if p.chunk.need_logits]
        for p in pieces:
            if p.chunk.block_copies:
                self.kv.copies_done(p.request.seq_id)
            self.prompt_tokens_computed += max(0, min(p.chunk.start_pos + len(p.chunk.token_ids),
                                                      len(p.request.prompt_token_ids)) - p.chunk.start_pos)
            p.request.num_computed += len(p.chunk.token_ids)
            self.kv.computed(p.request.seq_id, p.request.token_ids, p.request.num_computed)
        if not done:
            return changed
        # Rows: each done piece's last num_logits positions. A scored prompt's rows give its tokens' log-
        # probabilities; a piece's last row samples when it reached the sequence's end (else it is mid-prompt).
        reqs, rows, row = [], [], 0
        for p in done:
            k = p.chunk.num_logits
            if p.request.prompt_logprobs is not None:
                self._score_prompt(p.request, p.chunk, logits_NV[row:row + k])
            if p.request.num_computed == len(p.request.token_ids):
                reqs.append(p.request)
                rows.append(row + k - 1)
            row += k
        if len(rows) != row:
            logits_NV = logits_NV[rows]
        if any(r.held for r in reqs):  # n > 1: the prompt is done; its other samples start from these logits
            reqs, logits_NV = self._fork_samples(reqs, logits_NV)
        tokens = self._choose_tokens(logits_NV, [r.params for r in reqs], [r.generator for r in reqs],
                               [(r.prompt_token_ids, r.output_token_ids) if r.params.adjusts_logits else None
                                for r in reqs], [r.grammar for r in reqs])
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            self._append_or_fail(req, token, logits_NV[i])
            changed.append(req)
        return changed

    def _fork_samples(self, reqs: list[Request], logits_NV: torch.Tensor) -> tuple[list[Request], torch.Tensor]:
        """Start the held samples of requests whose prompt just finished computing: each shares the prompt's
        blocks (its partial last block copied) and samples its first token from the same logits row, so the
        prompt is computed once for all n. A sample that finds no free block or no free `max_num_seqs` place
        waits in the queue like a new request instead (its prompt then comes from the prefix cache, all but the
        last block)."""
        out, rows, queued = [], [], []
        for row, req in enumerate(reqs):
            out.append(req)
            rows.append(row)
            held, req.held = req.held, []
            for sample in held:
                if sample.finished:
                    continue
                if req.prompt_logprobs is not None:
                    sample.prompt_logprobs = list(req.prompt_logprobs)
                sample.metrics.first_scheduled_time = req.metrics.first_scheduled_time
                if self.kv.fork(req.seq_id, sample.seq_id, req.num_computed):
                    if self.scheduler.start_forked(sample):
                        sample.num_computed = req.num_computed
                        out.append(sample)
                        rows.append(row)
                        continue
                    self.kv.free(sample.seq_id)
                queued.append(sample)
        self.scheduler.waiting.extendleft(reversed(queued))  # first in the queue, in index order
        return out, logits_NV[rows]

    def _score_prompt(self, req: Request, chunk, logits_KV: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens a scored piece's rows predict (the row of position q scores token
        q + 1); tokens already scored before a preemption are not scored again."""
        end, k = chunk.start_pos + len(chunk.token_ids), logits_KV.shape[0]
        for j in range(k):
            target = end - k + j + 1
            if target < len(req.prompt_token_ids) and target == len(req.prompt_logprobs):
                token = req.token_ids[target]
                req.prompt_logprobs.append({t: Logprob(lp, rank, self._decode_one(t)) for t, lp, rank in
                                            top_logprobs(logits_KV[j], token, req.params.prompt_logprobs)})

    def _choose_tokens(self, logits_NV: torch.Tensor, params: list, generators: list, *per_row) -> list[int | None]:
        """`choose_tokens` for the batch; if it fails, row by row, so only the rows that fail get None."""
        try:
            return choose_tokens(logits_NV, params, generators, *per_row)
        except Exception:
            pass
        tokens: list[int | None] = []
        for i in range(len(params)):
            rest = [None if r is None else r[i:i + 1] for r in per_row]
            try:
                tokens.append(choose_tokens(logits_NV[i:i + 1], params[i:i + 1], generators[i:i + 1], *rest)[0])
            except Exception as exc:
                log.warning("sampling failed for one request: %s", exc.__class__.__name__)
                tokens.append(exc)
        return tokens

    def _append_or_fail(self, req: Request, token, logits_V: torch.Tensor) -> None:
        """Add a sampled token; a failure here (sampling, detokenizing, stop checks) fails this request only."""
        if isinstance(token, BaseException):
            return self._fail_request(req, f"sampling failed: {token}")
        try:
            self._append_token(req, token, logits_V)
        except Exception as exc:
            log.warning("finishing a token failed for one request: %s", exc.__class__.__name__)
            self._fail_request(req, f"processing the generated token failed: {exc}")

    def _fail_request(self, req: Request, error: str) -> None:
        req.error = error
        if not req.finished:
            self._finish(req, "error")

    def _fail_step(self, pieces, exc: Exception) -> list[Request]:
        """A forward pass raised: fail that step's requests and free their slots; the engine goes on serving.

        A device that no longer answers (a CUDA error is sticky) cannot serve anything: then the error propagates and
        the engine loop stops, so the replica is replaced."""
        if not self._device_alive():
            raise exc
        log.error("a model step failed; failing its %d request(s): %r", len(pieces), exc)
        failed = []
        for p in pieces:
            if not p.request.finished:
                self._fail_request(p.request, f"the model step failed: {exc}")
                failed.append(p.request)
        return failed

    def _device_alive(self) -> bool:
        device = getattr(self.executor, "device", None)
        if device is None or torch.device(device).type == "cpu":
            return True
        try:
            torch.ones(1, device=device).add_(1).item()  # any sticky device error surfaces here
            return True
        except Exception:
            return False

    def _fail_running(self, exc: Exception) -> list[Request]:
        """A worker died: fail what was in flight, rebuild the executor, keep the waiting requests."""
        failed = list(self.scheduler.running)
        for req in failed:
            req.error = f"model worker failed: {exc}"
            self._finish(req, "error")
        self.executor.rebuild()
        self.kv.reset()  # the new workers' caches are empty: nothing cached survives
        for req in self.scheduler.waiting:  # preempted ones had computed tokens in the old caches
            req.num_computed = 0
        return failed

    def _append_token(self, req: Request, token: int, logits_V: torch.Tensor) -> None:
        now = time.time()
        m = req.metrics
        m.first_token_time = m.first_token_time or now
        m.last_token_time = now
        req.token_ids.append(token)
        self.generation_tokens_total += 1
        if req.logprobs is not None:
            req.logprobs.append({t: Logprob(lp, rank, self._decode_one(t))
                                 for t, lp, rank in top_logprobs(logits_V, token, req.params.logprobs)})
        p = req.params
        old_len = len(req.output_text)
        req.output_text += req.detokenizer.add(token)
        if p.stop_token_ids and token in p.stop_token_ids:
            return self._finish(req, "stop", token)
        if not p.ignore_eos and token in self.eos_token_ids:
            return self._finish(req, "stop")
        if p.stop_list and self._check_stop_strings(req, old_len):
            return
        if req.num_generated >= req.max_tokens:
            self._finish(req, "length")

    def _check_stop_strings(self, req: Request, old_len: int) -> bool:
        text = req.output_text
        hits = []
        for s in req.params.stop_list:
            i = text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0:
                hits.append((i, s))
        if not hits:
            return False
        i, s = min(hits)
        req.output_text = text[:i]
        self._finish(req, "stop", s)
        return True

    def _finish(self, req: Request, reason: str, stop_reason: str | int | None = None) -> None:
        if req.finished:
            return
        if reason in ("length", "stop") and not isinstance(stop_reason, str):
            req.output_text += req.detokenizer.flush()
        req.status = RequestStatus.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.metrics.finished_time = time.time()
        self.scheduler.remove(req)  # and its KV-cache blocks
        held, req.held = req.held, []
        for sample in held:  # failed or aborted before its prompt was done: its other samples cannot start
            sample.error = req.error
            self._finish(sample, reason)
            self._pending.append(sample)
        if all(r.finished for r in req.samples):
            self._requests.pop(req.request_id, None)

    # ---- outputs ---------------------------------------------------------------------------------
    def _output(self, req: Request) -> RequestOutput:
        """The request's output: one CompletionOutput per sample, in index order."""
        samples = req.samples
        outputs = [CompletionOutput(r.index, r.output_text, r.output_token_ids, r.finish_reason, r.stop_reason,
                                    list(r.logprobs) if r.logprobs is not None else None, r.error) for r in samples]
        first = samples[0]
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids, outputs,
                             all(r.finished for r in samples), first.metrics, first.prompt_logprobs)

    def _streamable_text_len(self, req: Request) -> int:
        """Text that no stop string can still claim: hold back a possible stop string's beginning."""
        if req.finished or not req.params.stop_list:
            return len(req.output_text)
        hold = max(len(s) for s in req.params.stop_list) - 1
        return max(req.sent_text, len(req.output_text) - hold)

    def _delta(self, req: Request) -> RequestDelta:
        out_ids = req.output_token_ids
        text_end = self._streamable_text_len(req)
        lps = None
        if req.logprobs is not None:
            lps, req.sent_logprobs = req.logprobs[req.sent_logprobs:], len(req.logprobs)
        delta = RequestDelta(
            req.request_id, out_ids[req.sent_tokens:], req.output_text[req.sent_text:text_end], req.finish_reason,
            len(req.prompt_token_ids), len(out_ids), lps, req.stop_reason, req.error, req.metrics.arrival_time,
            req.metrics.first_token_time, req.metrics.queued_time)
        if req.prompt_logprobs is not None and req.sent_tokens == 0:
            delta.prompt_logprobs = req.prompt_logprobs
        delta.index, delta.finished = req.index, req.finished
        req.sent_tokens, req.sent_text = len(out_ids), text_end
        return delta

    # ---- convenience -----------------------------------------------------------------------------
    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; one `RequestOutput` per prompt, in order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids = [f"generate-{next(self._gen_ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        while wanted - final.keys():
            for req in self._step():  # build outputs for finished requests only: no per-step copies
                if req.request_id in wanted and all(r.finished for r in req.samples):
                    final[req.request_id] = self._output(req)
        return [final[rid] for rid in ids]

    def last_token_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """float32 [len(prompts), V]: the next-token logits after each prompt, computed in full (no prefix hit) on
        blocks of their own, outside the scheduler (tools and checks: selfcheck, tests). Call between steps."""
        from serving.engine.executor import SeqChunk

        C, ids = self.config.attention_chunk_size, [next(self._seq_ids) for _ in prompts]
        try:
            for seq, p in zip(ids, prompts):
                if self.kv.admit(seq, p, use_prefix=False) is None or not self.kv.grow(seq, len(p)):
                    raise RuntimeError("the KV cache has no room for these prompts now; call when it is idle")
            out = [None] * len(prompts)
            for start in range(0, max(map(len, prompts)), C):  # one piece per attention chunk, as the scheduler
                live = [i for i, p in enumerate(prompts) if start < len(p)]
                chunks = []
                for i in live:
                    node, g, cs, c = self.kv.tables(ids[i])
                    piece = prompts[i][start:start + C]
                    chunks.append(SeqChunk(ids[i], piece, start, True, node, g, start // C * C, c))
                logits = self.executor.execute(chunks)
                for row, i in enumerate(live):
                    out[i] = logits[row]
            return torch.stack(out).float().cpu()
        finally:
            for seq in ids:
                self.kv.free(seq)

    def stats(self) -> EngineStats:
        kv = self.kv
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), kv.usage(),
                           self.prompt_tokens_total, self.generation_tokens_total,
                           num_preemptions=self.scheduler.num_preemptions, prefix_cache_queries=kv.prefix_queries,
                           prefix_cache_hits=kv.prefix_hits, kv_blocks_in_use=kv.blocks_in_use(),
                           prompt_tokens_computed=self.prompt_tokens_computed)

    def routed_token_counts(self) -> torch.Tensor:
        """int64 [num_moe_layers, num_experts]: tokens each expert has received since start."""
        return self.executor.routed_token_counts()

    def shutdown(self) -> None:
        self.executor.shutdown()


def _cache_key(cache_salt: str | None, images) -> bytes:
    """What a request's prefix-cache keys mix in besides its tokens: its salt and its images' content hashes (the
    same <|patch|> tokens stand for different pictures)."""
    import hashlib

    h = hashlib.sha256()
    if cache_salt:
        h.update(b"salt:" + cache_salt.encode())
    for img in images or ():
        h.update(b"image:" + str(getattr(img, "content_hash", id(img))).encode())
    return h.digest() if cache_salt or images else b""


def _image_support(executor, tokenizer, model_config=None):
    """The image path for a checkpoint with a vision tower, on the text model's device and dtype (else None).
    With an engine config its weights come through the engine's loader, from where the config says they are."""
    if tokenizer is None:  # skip_tokenizer_init: token ids only, no image prompts
        return None
    from serving.engine.multimodal import ImageSupport
    from serving.loader import resolve_dtype

    weight = getattr(getattr(executor, "model", None), "embed_tokens", None)
    dtype, device = (weight.weight.dtype, weight.weight.device) if weight is not None else (torch.float32, "cpu")
    if model_config is None:
        return ImageSupport.from_pretrained(getattr(tokenizer, "name_or_path", ""), tokenizer, dtype, device)
    from serving.vision import has_vision_weights

    m = model_config
    if not has_vision_weights(m.path):
        return None
    if weight is None:  # the text model runs on workers: the tower runs here, in the engine's process
        dtype, device = resolve_dtype(m.dtype), "cpu" if m.device == "cpu" else "cuda"
    from serving.loader import open_reader

    cache = m.cache_dir
    if cache is None and m.weights_source.startswith("s3://"):
        from serving.expert_parallel.s3 import cache_root

        cache = str(cache_root() / "s3")  # private to this user (a shared /tmp path is not)
    reader = open_reader(m.weights_source, s3_endpoint_url=m.s3_endpoint_url, cache_dir=cache)
    try:
        return ImageSupport.from_pretrained(m.path, tokenizer, dtype, device, reader)
    finally:
        reader.close()


def generation_eos_ids(path: Path, cfg: TextConfig) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what `generate` stops on), else from config.json."""
    gen = Path(path) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    return cfg.eos_token_ids
