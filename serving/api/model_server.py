"""The model deployment: one replica owns one `AsyncLLMEngine` (and, with expert parallelism, its Ray workers).

`generate(job)` is a streaming method the ingress calls through a Serve handle. It checks what needs the
tokenizer (chat template, context length, token ids), runs the request, and yields plain dicts:
  - `{"error": ApiError dict}` alone when the request is refused before it starts (400, 503);
  - else items with `text`, `completion_tokens`, `finish_reason`, `failed`, `index` (the sample, n > 1) and
    `last` (the stream's final item), the first also `prompt_tokens` (streamed: one per engine delta; not
    streamed: one item per sample with its whole answer).
If the caller goes away (the ingress cancels the stream when its client disconnects) the engine request is
aborted, which frees its KV slot. The replica also keeps its metrics and pushes them to the app's MetricsHub.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid

from ray import serve

from serving.api.errors import ApiError, bad_request, queue_full
from serving.api.images import image_parts, image_prompt, text_chars

# No token of a Llama 4 vocabulary is this long: a prompt over max_model_len x this many characters cannot fit.
MAX_CHARS_PER_TOKEN = 64
from serving.api.metrics import HEARTBEAT_STALE_S, PUSH_INTERVAL_S, ReplicaMetrics

log = logging.getLogger("herd.serving.model")


@serve.deployment(name="ModelServer")
class ModelServer:
    """One model copy behind Serve; its engine is built from `ServeArgs` (a plain dict across Serve)."""

    def __init__(self, args: dict):
        import torch

        from serving.api.config import ServeArgs
        from serving.api.metrics import hub_handle

        torch.set_num_threads(int(os.environ.get("HERD_TORCH_THREADS", "1")))
        self.args = ServeArgs.model_validate(args)
        self.engine = _build_engine(self.args)
        self.llm = self.engine.engine  # the synchronous LLMEngine: tokenizer, chat template, stats
        self.max_model_len = self.llm.max_model_len
        self.vocab_size = self.llm.config.vocab_size
        self.metrics = ReplicaMetrics()
        # The grammar engine's vocabulary tables take seconds for Llama 4's 202k tokens: build them now, in the
        # background, not on the first structured request.
        threading.Thread(target=self.llm.grammars.warm, name="herd-grammar-warmup", daemon=True).start()
        self.hub = hub_handle(self.args.app_name)
        self.replica_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pusher: asyncio.Task | None = None

    # ---- serve hooks ---------------------------------------------------------------------------------------
    async def check_health(self) -> None:
        self._ensure_pusher()
        err = self.engine.dead_reason  # Serve replaces a replica whose health check raises
        if err is not None:
            raise RuntimeError(f"engine stopped: {err.__class__.__name__}")
        age = self.engine.heartbeat_age()
        if age > HEARTBEAT_STALE_S:
            raise RuntimeError(f"engine loop stalled: no heartbeat for {age:.0f} s")

    def _health(self) -> dict:
        """The engine's state as the ingress's /health reports it: cheap, no generation."""
        dead = self.engine.dead_reason
        return {"heartbeat_age_s": self.engine.heartbeat_age(), "dead": None if dead is None else
                dead.__class__.__name__}

    async def ready(self) -> int:
        """Answers once the engine is loaded; returns the context length."""
        self._ensure_pusher()
        return self.max_model_len

    # ---- tokenizer endpoints ------------------------------------------------------------------------------
    async def tokenizer_job(self, job: dict) -> dict:
        """/tokenize and /detokenize (vLLM's shapes), off the event loop; errors as {"error": ...}."""
        try:
            return await asyncio.to_thread(self._tokenizer_job, job)
        except ApiError as e:
            return {"error": e.to_dict()}

    def _tokenizer_job(self, job: dict) -> dict:
        tok = self.llm.tokenizer
        if job["kind"] == "detokenize":
            bad = [t for t in job["tokens"] if not 0 <= t < self.vocab_size]
            if bad:
                raise bad_request(f"'tokens' holds token id {bad[0]}, outside the vocabulary [0, {self.vocab_size}).",
                                  param="tokens", code="invalid_value")
            return {"prompt": tok.decode(job["tokens"])}
        if "messages" in job:
            from serving.api.answer import chat_prompt_ids

            ids = chat_prompt_ids(tok, job["messages"], job.get("tools"))
        else:
            ids = tok.encode(job["prompt"], add_special_tokens=job.get("add_special_tokens", True))
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": None}

    # ---- generation ----------------------------------------------------------------------------------------
    async def generate(self, job: dict):
        self._ensure_pusher()
        rid = job["request_id"]
        try:
            prompt_ids = prompt = await self._tokenize(job)
            parts = image_parts(job["messages"]) if "messages" in job else None
            if parts:  # fetched, checked, decoded and expanded off the event loop (serving/api/images.py)
                prompt = await asyncio.to_thread(image_prompt, self.llm, self.args.image_limits(), parts, prompt_ids,
                                                 self.max_model_len)
                prompt_ids = prompt["prompt_token_ids"]
            params = self._params(job, len(prompt_ids))
        except ApiError as e:
            yield {"error": e.to_dict()}
            return
        from serving.engine.errors import QueueFullError

        t_arrival = time.time()
        try:
            deltas = self.engine.add_request(rid, prompt, params, cache_salt=job.get("cache_salt"))
        except QueueFullError:
            yield {"error": queue_full(self.args.retry_after_s).to_dict()}
            return
        except ValueError as e:  # the engine's own input checks, should ours have missed one
            yield {"error": bad_request(str(e), code="invalid_value").to_dict()}
            return
        finished = False
        from serving.api.answer import Answer

        # One Answer per sample (n > 1: the engine's deltas interleave, told apart by `index`; each item says its
        # `index`, and the stream's last item has `last`).
        answers = [Answer(self.llm.tokenizer, job, prompt_ids) for _ in range(params.n)]
        try:
            delta = await deltas.__anext__()
            tracker = _RequestTimes(self.metrics, t_arrival, len(prompt_ids))
            if job["stream"]:
                # Each item costs a hop through Serve; with stream_interval_s > 0, deltas that arrive within the
                # interval travel as one item (the first token is never held back).
                interval, last_sent, sent_any = self.args.stream_interval_s, [0.0] * params.n, False
                while True:
                    tracker.on_delta(delta)
                    finished, i = delta.finished, delta.index
                    answers[i].add(delta)
                    now = time.monotonic()
                    if delta.finish_reason is not None or now - last_sent[i] >= interval:
                        item = _item(delta)
                        item.update(answers[i].take(delta.finish_reason), index=i, last=finished)
                        if not sent_any:
                            item["prompt_tokens"] = len(prompt_ids)
                        last_sent[i], sent_any = now, True
                        yield item
                    if finished:
                        break
                    delta = await deltas.__anext__()
            else:
                last: dict[int, object] = {}
                while True:
                    tracker.on_delta(delta)
                    answers[delta.index].add(delta)
                    last[delta.index] = delta
                    if delta.finished:
                        finished = True
                        break
                    delta = await deltas.__anext__()
                for i in range(params.n):
                    item = _item(last[i])
                    item.update(answers[i].take(last[i].finish_reason), prompt_tokens=len(prompt_ids), index=i,
                                last=i == params.n - 1)
                    yield item
        finally:
            if not finished:  # cancelled (client gone) or failed: free the sequence's slot now
                await self.engine.abort(rid)
                self.metrics.inc("herd:request_success", 1.0, "abort")
            await deltas.aclose()

    # ---- request checks that need the tokenizer -------------------------------------------------------------
    async def _tokenize(self, job: dict) -> list[int]:
        """`_prompt_ids` in a thread (a long prompt must not stall this replica's event loop), after refusing a
        prompt longer in characters than the context could hold at any tokenization."""
        texts = [m.get("content") for m in job["messages"]] if "messages" in job else [job.get("prompt")]
        chars = sum(text_chars(t) for t in texts if t is not None)  # image parts are limited by image_prompt
        limit = self.max_model_len * MAX_CHARS_PER_TOKEN
        if chars > limit:
            where = "messages" if "messages" in job else "prompt"
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens; the {where} has "
                              f"{chars} characters, more than any {self.max_model_len} tokens hold (at most "
                              f"{limit}). Shorten it.", param=where, code="context_length_exceeded")
        return await asyncio.to_thread(self._prompt_ids, job)

    def _prompt_ids(self, job: dict) -> list[int]:
        if "messages" in job:
            from serving.api.answer import chat_prompt_ids

            ids = chat_prompt_ids(self.llm.tokenizer, job["messages"], job.get("tools"))
            where = "messages"
        elif isinstance(job["prompt"], str):
            ids = self.llm.tokenizer.encode(job["prompt"])
            where = "prompt"
        else:
            ids, where = list(job["prompt"]), "prompt"
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise bad_request(f"'prompt' holds token id {bad[0]}, outside the vocabulary [0, {self.vocab_size}).",
                                  param="prompt", code="invalid_value")
        n, ctx = len(ids), self.max_model_len
        if n >= ctx:
            raise bad_request(f"This model's maximum context length is {ctx} tokens; the {where} is {n} tokens, "
                              "leaving no room for a completion. Shorten it.", param=where,
                              code="context_length_exceeded")
        return ids

    def _params(self, job: dict, n_prompt: int):
        from serving.engine import SamplingParams

        ctx = self.max_model_len
        max_tokens = job.get("max_tokens")
        if max_tokens is None:
            max_tokens = ctx - n_prompt
        elif n_prompt + max_tokens > ctx:
            name = job.get("max_tokens_param", "max_tokens")
            raise bad_request(f"This model's maximum context length is {ctx} tokens; the prompt is {n_prompt} "
                              f"tokens and {name} asks for {max_tokens} more. Ask for at most {ctx - n_prompt}.",
                              param=name, code="context_length_exceeded")
        try:
            from serving.api.answer import engine_extras

            return SamplingParams(max_tokens=max_tokens, **job["sampling"], **engine_extras(job))
        except (ValueError, TypeError) as e:
            field = str(e).split()[0] if str(e) else None
            raise bad_request(str(e), param=field if field in job["sampling"] else None,
                              code="invalid_value") from None

    # ---- metrics --------------------------------------------------------------------------------------------
    def _ensure_pusher(self) -> None:
        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        experts: asyncio.Future | None = None
        while True:
            try:
                stats = self.llm.stats()
                self.metrics.gauges.update({
                    "herd:num_requests_running": float(stats.num_running),
                    "herd:num_requests_waiting": float(stats.num_waiting),
                    "herd:kv_cache_usage_perc": float(stats.kv_cache_usage),
                })
                for name, total in (("herd:prefix_cache_queries", stats.prefix_cache_queries),
                                    ("herd:prefix_cache_hits", stats.prefix_cache_hits),
                                    ("herd:num_preemptions", stats.num_preemptions)):
                    self.metrics.set_counter(name, total)
                # With expert parallelism the counts come from the workers (a blocking Ray call that may wait
                # for a step): fetch them in a thread, one fetch at a time, never on this event loop.
                if experts is not None and experts.done():
                    self.metrics.set_expert_counts(experts.result().tolist())
                    experts = None
                if experts is None:
                    experts = asyncio.ensure_future(asyncio.to_thread(self.llm.routed_token_counts))
                await self.hub.report.remote(self.replica_id, self.metrics.snapshot(self._health()))
            except Exception as e:  # metrics must never take the replica down
                log.warning("metrics push failed: %s", e.__class__.__name__)
                experts = None
            await asyncio.sleep(PUSH_INTERVAL_S)

    def __del__(self):
        eng = getattr(self, "engine", None)
        if eng is not None:
            try:
                eng.shutdown()
            except Exception:
                pass


class _RequestTimes:
    """Turns one request's deltas into vLLM's timing metrics and token counters."""

    def __init__(self, m: ReplicaMetrics, arrival: float, n_prompt: int):
        self.m, self.arrival, self.last = m, arrival, {}  # sample index -> when its latest token came
        m.inc("herd:prompt_tokens", float(n_prompt))

    def on_delta(self, d) -> None:
        now = time.time()
        k = len(d.new_token_ids)
        arrival = d.arrival_time or self.arrival
        if k:
            self.m.inc("herd:generation_tokens", float(k))
            if not self.last:  # the request's first token (of any sample)
                self.m.observe("herd:time_to_first_token_seconds", (d.first_token_time or now) - arrival)
                if d.queued_time is not None:
                    self.m.observe("herd:request_queue_time_seconds", d.queued_time)
            elif d.index in self.last:  # gaps between one sample's tokens (samples of n > 1 interleave)
                for _ in range(k):  # tokens that arrived together share the gap
                    self.m.observe("herd:inter_token_latency_seconds", (now - self.last[d.index]) / k)
            self.last[d.index] = now
        if d.finished:  # the request's last delta (with n > 1, of its last sample)
            self.m.observe("herd:e2e_request_latency_seconds", now - arrival)
            self.m.inc("herd:request_success", 1.0, d.finish_reason)


def _item(delta) -> dict:
    return {"text": delta.new_text, "completion_tokens": delta.num_generated_tokens,
            "finish_reason": delta.finish_reason, "failed": delta.finish_reason == "error"}


def _build_engine(a):
    """AsyncLLMEngine for these args; with EP the replica's own placement group is handed to the engine."""
    import torch

    from serving.engine import AsyncLLMEngine

    if a.device != "auto":
        device = a.device
    elif a.expert_parallel_size > 1:  # the replica itself holds no GPU; its workers do when given one
        device = "cuda" if a.worker_num_gpus > 0 else "cpu"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    kwargs = dict(dtype=dtype, device=device, max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len,
                  expert_parallel_size=a.expert_parallel_size, tensor_parallel_size=a.tensor_parallel_size,
                  max_waiting_requests=a.max_waiting_requests, lora_adapter=a.lora_adapter,
                  kv_cache_memory_bytes=a.kv_cache_memory_bytes, mean_sequence_tokens=a.mean_sequence_tokens)
    if a.expert_parallel_size > 1:
        from ray.util import get_current_placement_group

        kwargs["placement_group"] = get_current_placement_group()
        kwargs["nodes"] = a.nodes
        # Workers must ask for what their bundles hold (model_deployment_options in serving/app.py).
        kwargs["num_cpus_per_worker"] = a.worker_num_cpus
        kwargs["num_gpus_per_worker"] = a.worker_num_gpus
        if a.placement_file:
            from cluster.placement import PlacementMap

            kwargs["placement"] = PlacementMap.load(a.placement_file)
    path = a.model
    if path.startswith("s3://"):
        # The engine reads config and tokenizer from a folder; expert-parallel workers read their weights from S3
        # by byte range.
        from serving.expert_parallel.s3 import S3Checkpoint, cache_root, source_key

        cache = str(cache_root() / "s3")  # private to this user; ranges keyed by source and ETag inside
        meta = os.path.join(cache, "meta", source_key(a.model, a.s3_endpoint_url))
        remote = S3Checkpoint(a.model, cache, endpoint_url=a.s3_endpoint_url)
        if a.expert_parallel_size > 1 or a.tensor_parallel_size > 1:
            path = str(remote.download_metadata(meta))
            kwargs.update(weights=a.model, s3_endpoint_url=a.s3_endpoint_url, cache_dir=cache)
        else:  # one worker reads every tensor: copy the checkpoint to the node once and load it from disk
            path = str(remote.download_all(meta))
    return AsyncLLMEngine.from_pretrained(path, **kwargs)
