"""The paged KV cache: how many blocks a memory budget holds, which blocks each sequence holds, prefix caching.

The cache is a pool of fixed-size blocks (`block_size` tokens; vLLM's PagedAttention), allocated on demand as a
sequence grows and returned when it finishes, is aborted or is preempted. Llama 4 has two layer types and each
gets its own pool (vLLM's hybrid allocator, one "KV-cache group" per type):
- global (NoPE) layers keep a block for every token of the sequence;
- chunked (RoPE) layers attend only within the current attention chunk (aligned at multiples of C), so a sequence
  holds only the blocks of its current chunk there; crossing a boundary returns the previous chunk's blocks.

Prefix caching (on by default): a full block is keyed by a sha256 of its token ids chained to the previous
block's key; the first key also mixes in the request's extra keys (`cache_salt`, the API key's identity when the
operator isolates tenants, image content hashes). A new request reuses its longest cached prefix and computes
only the rest. Freed blocks keep their key until the pool needs them (least recently freed reused first). A hit
counts only as far as both layer types still hold it: the global blocks up to the hit, and the chunked blocks of
the chunk that contains the hit's end. Blocks are reference counted, so sequences share hit blocks; a block that
is shared is never written (a request's own last, partial block is always its own).

Fork (n samples of one prompt): a sample joins the sequence that computed the prompt by sharing its full blocks
and getting a device copy of its partial last block (`fork`, `pending_copies`, `copies_done`): the prompt is
computed once for all n.

With expert parallelism each node's workers hold their own pools; `KVCacheManager` keeps one pair per node and
places a new sequence on the node that holds its prefix, else the one with the most free blocks.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch

from llama4.config import TextConfig
from llama4.sizing import (KVBytesPerToken, blocks_bytes, kv_bytes_per_token, kv_pools, peak_sequence_blocks,
                           sequence_blocks)

_SIZING_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "bf16"}  # fp16 costs as bf16
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MEAN_SEQUENCE_TOKENS = 2048
GLOBAL, CHUNKED = "global", "chunked"


@dataclass(frozen=True)
class KVCachePlan:
    """The cache's shape and cost, decided before allocation (per process; per worker under expert parallelism)."""

    block_size: int
    global_blocks: int  # blocks of the global-layer pool
    chunked_blocks: int  # blocks of the chunked-layer pool
    max_model_len: int
    max_num_seqs: int
    kv_dtype: str  # sizing name: fp32 / bf16
    bytes_per_token_per_layer: float  # K and V of one token in one layer (either layer type)
    chunked_layers: int
    global_layers: int
    chunk_size: int
    budget_bytes: float | None = None  # the budget it was sized for; None: the default (see plan_kv_cache)

    @property
    def block_bytes(self) -> dict[str, float]:
        """Bytes one block costs across all layers of each type."""
        per = self.bytes_per_token_per_layer * self.block_size
        return {GLOBAL: per * self.global_layers, CHUNKED: per * self.chunked_layers}

    @property
    def total_bytes(self) -> float:
        b = self.block_bytes
        return self.global_blocks * b[GLOBAL] + self.chunked_blocks * b[CHUNKED]

    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache holds across all sequences (the global pool's size; chunked layers need fewer)."""
        return self.global_blocks * self.block_size if self.global_layers else self.chunked_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> dict[str, int]:
        """Blocks of each pool one sequence of `num_tokens` tokens holds at its end."""
        kv = KVBytesPerToken(self.bytes_per_token_per_layer, self.chunked_layers, self.global_layers, self.chunk_size)
        b = sequence_blocks(kv, num_tokens, self.block_size)
        return {GLOBAL: b.global_blocks, CHUNKED: b.chunked_blocks}

    def longest_sequence(self) -> int:
        """The most tokens one sequence can reach when it has the whole cache to itself."""
        if self.global_layers:
            return self.global_blocks * self.block_size
        return self.max_model_len

    def describe(self) -> str:
        return (f"KV cache: paged, {self.block_size}-token blocks, {self.kv_dtype}, "
                f"{self.total_bytes / 2**20:.1f} MiB: {self.global_blocks} blocks for {self.global_layers} global "
                f"layers ({self.capacity_tokens} tokens), {self.chunked_blocks} for {self.chunked_layers} chunked "
                f"layers (chunk {self.chunk_size}); {self.bytes_per_token_per_layer:.0f} B/token/layer")


def plan_kv_cache(cfg: TextConfig, max_model_len: int, dtype: torch.dtype, max_num_seqs: int,
                  memory_bytes: float | None = None, tensor_parallel_size: int | None = None,
                  block_size: int = DEFAULT_BLOCK_SIZE,
                  mean_sequence_tokens: int = DEFAULT_MEAN_SEQUENCE_TOKENS) -> KVCachePlan:
    """Size the two block pools.

    Without a budget (the CPU default) the pools hold `max_num_seqs` sequences of `max_model_len` tokens: the
    memory a static cache would reserve, so a default engine never runs out mid-sequence and never takes more
    memory than it did before blocks; on demand allocation then lets short sequences share it. With
    `memory_bytes` the pools first hold one sequence of `max_model_len` tokens (so every admitted request can
    finish), and the rest is split between the pools in the proportion a sequence of `mean_sequence_tokens`
    needs (chunked layers keep at most one chunk of it).

    tensor_parallel_size: set for an expert-parallel worker (None: the single-process engine). Each of a node's
    workers keeps 1/tp of the KV heads, so a block costs one worker 1/tp, and `memory_bytes` is that worker's
    budget (the planner's per-GPU figure).
    """
    tp = tensor_parallel_size or 1
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
    if max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings}); lower max_model_len")
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if block_size < 1 or cfg.attention_chunk_size % block_size:
        raise ValueError(f"block_size ({block_size}) must divide the model's attention_chunk_size "
                         f"({cfg.attention_chunk_size}): a chunk's blocks are freed together")
    name = _SIZING_NAMES.get(dtype, "fp32")
    full = kv_bytes_per_token(cfg, name)
    per = replace(full, per_layer=full.per_layer / tp)  # what one worker holds of each token
    shape = dict(block_size=block_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_dtype=name,
                 bytes_per_token_per_layer=per.per_layer, chunked_layers=per.chunked_layers,
                 global_layers=per.global_layers, chunk_size=per.chunk_size)
    one = peak_sequence_blocks(per, max_model_len, block_size)
    if memory_bytes is None:
        return KVCachePlan(global_blocks=max_num_seqs * one.global_blocks,
                           chunked_blocks=max_num_seqs * one.chunked_blocks, **shape)
    need = blocks_bytes(per, one, block_size)
    if memory_bytes < need:
        who = (f", per worker) cannot hold one sequence of max_model_len={max_model_len} tokens ({int(need)} "
               f"bytes per worker at tensor_parallel_size={tp}" if tensor_parallel_size else
               f") cannot hold one sequence of max_model_len={max_model_len} tokens ({int(need)} bytes")
        raise ValueError(f"kv_cache_memory_bytes ({int(memory_bytes)}{who}); raise the budget or lower "
                         "max_model_len")
    pools = kv_pools(per, memory_bytes, max_model_len, block_size, mean_sequence_tokens)
    return KVCachePlan(global_blocks=pools.global_blocks, chunked_blocks=pools.chunked_blocks,
                       budget_bytes=memory_bytes, **shape)


# ---------------------------------------------------------------------------------------------------------
# Block pools
# ---------------------------------------------------------------------------------------------------------
class BlockPool:
    """Reference-counted blocks of one layer type on one node, with the prefix-cache index of full blocks."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block holding it
        # Blocks nobody holds, least recently freed first; cached ones keep their key until taken.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def take(self, n: int) -> list[int]:
        """`n` blocks for new data (the caller checked `num_free`); evicts the least recently freed keys."""
        out = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            if self.key[block] is not None:
                del self.cached[self.key[block]]
                self.key[block] = None
            self.ref[block] = 1
            out.append(block)
        return out

    def lookup(self, key: bytes) -> int | None:
        return self.cached.get(key)

    def share(self, block: int) -> None:
        """Hold a cached block (a prefix hit)."""
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one holder of each; blocks nobody holds go to the free list (last first: a sequence's tail is
        the least likely to be shared, so it is reused first)."""
        for block in reversed(blocks):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None

    def register(self, block: int, key: bytes) -> None:
        """Index a block that is now full, so later requests can share it."""
        if self.key[block] is None and key not in self.cached:
            self.key[block] = key
            self.cached[key] = block

    def reset(self) -> None:
        self.__init__(self.num_blocks)


def block_keys(token_ids: list[int], block_size: int, extra: bytes = b"", start: int = 0,
               prev: bytes | None = None) -> list[bytes]:
    """sha256 keys of the full blocks of `token_ids` from block `start`, each chained to the previous key (the
    first block's parent is `extra`: salt, tenant, image hashes)."""
    keys = []
    parent = prev if prev is not None else hashlib.sha256(b"herd-kv" + extra).digest()
    for i in range(start, len(token_ids) // block_size):
        h = hashlib.sha256(parent)
        h.update(torch.tensor(token_ids[i * block_size:(i + 1) * block_size], dtype=torch.int64).numpy().tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass
class SeqBlocks:
    """The blocks one sequence holds on its node."""

    node: int
    extra: bytes
    global_blocks: list[int] = field(default_factory=list)  # block i holds positions [i*bs, (i+1)*bs)
    chunk_start: int = 0  # first position of the chunk whose blocks `chunked_blocks` are
    chunked_blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # keys of its full blocks, in order
    registered: int = 0  # how many of them are indexed (global pool); chunked ones are indexed as they fill
    # A forked sequence's partial last block, (kind, source, destination): copied on the device at the start of
    # its first step; the source is held until then, so nobody can take and overwrite it first.
    copies: list[tuple[str, int, int]] = field(default_factory=list)


class KVCacheManager:
    """Which blocks each sequence holds, on which node; admission, growth, prefix hits and release."""

    def __init__(self, plan: KVCachePlan, num_nodes: int = 1, enable_prefix_caching: bool = True,
                 reserve_max_model_len: bool = False):
        self.plan = plan
        self.bs = plan.block_size
        self.chunk = plan.chunk_size
        self.num_nodes = num_nodes
        self.enable_prefix_caching = enable_prefix_caching
        # Benchmarks only: take a whole max_model_len sequence's blocks at admission (what a static slot cache
        # reserves), to measure what on-demand allocation gains.
        self.reserve_max_model_len = reserve_max_model_len
        self.pools = [{GLOBAL: BlockPool(plan.global_blocks), CHUNKED: BlockPool(plan.chunked_blocks)}
                      for _ in range(num_nodes)]
        self.seqs: dict[int, SeqBlocks] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, tokens found cached

    # ---- questions -------------------------------------------------------------------------------------
    def never_fits(self, num_tokens: int) -> str | None:
        """Why a sequence of `num_tokens` tokens (prompt plus one generated) cannot run even alone, or None."""
        need = self.plan.blocks_for(num_tokens)
        for kind, have in ((GLOBAL, self.plan.global_blocks), (CHUNKED, self.plan.chunked_blocks)):
            if need[kind] > have:
                return (f"a sequence of {num_tokens} tokens needs {need[kind]} KV-cache blocks of {self.bs} tokens "
                        f"for the {kind} layers but the whole cache holds {have} ({have * self.bs} tokens)")
        return None

    def usage(self) -> float:
        """Fraction of blocks held, the fuller pool's (what limits admission)."""
        fr = [p[k].num_used / p[k].num_blocks for p in self.pools for k in (GLOBAL, CHUNKED) if p[k].num_blocks]
        return max(fr, default=0.0)

    def blocks_in_use(self) -> dict[str, int]:
        return {k: sum(p[k].num_used for p in self.pools) for k in (GLOBAL, CHUNKED)}

    def holds(self, seq_id: int) -> bool:
        return seq_id in self.seqs

    def tables(self, seq_id: int) -> tuple[int, list[int], int, list[int]]:
        """(node, global block table, chunk start, chunked block table) of a sequence."""
        s = self.seqs[seq_id]
        return s.node, s.global_blocks, s.chunk_start, s.chunked_blocks

    # ---- admission ---------------------------------------------------------------------------------------
    def admit(self, seq_id: int, token_ids: list[int], extra: bytes = b"", use_prefix: bool = True) -> int | None:
        """Place a new (or preempted) sequence: its cached prefix is shared, nothing else is taken yet.

        Returns the number of tokens already in the cache (a multiple of the block size), or None when no node
        has room for its first block."""
        keys = block_keys(token_ids, self.bs, extra) if self.enable_prefix_caching else []
        # The block holding the last token is always computed (its logits are needed), so it is never a hit.
        usable = keys[:(len(token_ids) - 1) // self.bs]
        best = None
        for node in range(self.num_nodes):
            hit = self._hit_blocks(node, usable) if use_prefix else 0
            free = self.pools[node][GLOBAL].num_free + self.pools[node][CHUNKED].num_free
            score = (hit, free)
            if best is None or score > best[0]:
                best = (score, node, hit)
        _, node, hit = best
        pools = self.pools[node]
        hit_tokens = hit * self.bs
        chunk_start = hit_tokens // self.chunk * self.chunk if hit_tokens else 0
        first_chunked = chunk_start // self.bs
        if self.enable_prefix_caching and use_prefix:
            self.prefix_queries += len(token_ids)
            self.prefix_hits += hit_tokens
        s = SeqBlocks(node, extra, keys=keys, chunk_start=chunk_start)
        for i in range(hit if self.plan.global_layers else 0):
            b = pools[GLOBAL].lookup(keys[i])
            pools[GLOBAL].share(b)
            s.global_blocks.append(b)
        for i in range(first_chunked, hit if self.plan.chunked_layers else first_chunked):
            b = pools[CHUNKED].lookup(keys[i])
            pools[CHUNKED].share(b)
            s.chunked_blocks.append(b)
        s.registered = hit
        self.seqs[seq_id] = s
        want = self.plan.max_model_len if self.reserve_max_model_len else hit_tokens + 1
        if not self.grow(seq_id, want):
            self.free(seq_id)
            if self.enable_prefix_caching and use_prefix:
                self.prefix_queries -= len(token_ids)
                self.prefix_hits -= hit_tokens
            return None
        return hit_tokens

    def _hit_blocks(self, node: int, keys: list[bytes]) -> int:
        """Blocks of prefix both layer types hold: global blocks up to the hit, chunked ones of its chunk."""
        pools = self.pools[node]
        n = 0
        if self.plan.global_layers:
            while n < len(keys) and pools[GLOBAL].lookup(keys[n]) is not None:
                n += 1
        else:
            n = len(keys)
        if not self.plan.chunked_layers:
            return n
        while n > 0:
            start = n * self.bs // self.chunk * self.chunk // self.bs  # first block of the chunk after the hit
            if all(pools[CHUNKED].lookup(keys[i]) is not None for i in range(start, n)):
                return n
            n -= 1
        return 0

    # ---- growth ------------------------------------------------------------------------------------------
    def grow(self, seq_id: int, end: int) -> bool:
        """Hold blocks for positions [0, end) (chunked layers: of the chunk containing end - 1); False, taking
        nothing, when the node lacks free blocks."""
        s = self.seqs[seq_id]
        pools = self.pools[s.node]
        new_chunk_start = (end - 1) // self.chunk * self.chunk
        g_need = (-(-end // self.bs) - len(s.global_blocks)) if self.plan.global_layers else 0
        drop = new_chunk_start != s.chunk_start
        c_have = 0 if drop else len(s.chunked_blocks)
        c_need = (-(-(end - new_chunk_start) // self.bs) - c_have) if self.plan.chunked_layers else 0
        # Blocks of the chunk being left return first, so they count as free for the new chunk.
        c_free = pools[CHUNKED].num_free + (self._only_holder(pools[CHUNKED], s.chunked_blocks) if drop else 0)
        if max(g_need, 0) > pools[GLOBAL].num_free or max(c_need, 0) > c_free:
            return False
        if drop:
            self._register_chunked(s, pools)
            pools[CHUNKED].release(s.chunked_blocks)
            s.chunked_blocks, s.chunk_start = [], new_chunk_start
        if g_need > 0:
            s.global_blocks += pools[GLOBAL].take(g_need)
        if c_need > 0:
            s.chunked_blocks += pools[CHUNKED].take(c_need)
        return True

    @staticmethod
    def _only_holder(pool: BlockPool, blocks: list[int]) -> int:
        return sum(1 for b in blocks if pool.ref[b] == 1)

    def computed(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Index the blocks that `num_computed` computed tokens have filled, for later prefix hits."""
        if not self.enable_prefix_caching:
            return
        s = self.seqs[seq_id]
        full = num_computed // self.bs
        if full > len(s.keys):
            s.keys += block_keys(token_ids[:full * self.bs], self.bs, s.extra, start=len(s.keys),
                                 prev=s.keys[-1] if s.keys else None)
        pools = self.pools[s.node]
        for i in range(s.registered, min(full, len(s.global_blocks))):
            pools[GLOBAL].register(s.global_blocks[i], s.keys[i])
        s.registered = max(s.registered, full)
        self._register_chunked(s, pools, upto=full)

    def _register_chunked(self, s: SeqBlocks, pools, upto: int | None = None) -> None:
        if not self.enable_prefix_caching:
            return
        first = s.chunk_start // self.bs
        upto = s.registered if upto is None else upto
        for j, b in enumerate(s.chunked_blocks):
            i = first + j
            if i < upto and i < len(s.keys):
                pools[CHUNKED].register(b, s.keys[i])

    # ---- fork (n samples of one prompt) ------------------------------------------------------------------
    def fork(self, parent: int, child: int, num_computed: int) -> bool:
        """Make `child` hold what `parent` computed of its first `num_computed` tokens, without computing them
        again: full blocks are shared; the partial last block gets a copy (a block of the child's own, which
        `pending_copies` hands to the device before the child's first step). False, taking nothing, when the
        parent's node has no free block for that copy."""
        s = self.seqs[parent]
        pools = self.pools[s.node]
        full, partial = divmod(num_computed, self.bs)
        kinds = []  # (kind, the parent's blocks holding [start, num_computed), first block of the table)
        if self.plan.global_layers:
            kinds.append((GLOBAL, s.global_blocks, 0))
        if self.plan.chunked_layers:
            kinds.append((CHUNKED, s.chunked_blocks, s.chunk_start // self.bs))
        if partial and any(pools[kind].num_free < 1 for kind, _, _ in kinds):
            return False
        c = SeqBlocks(s.node, s.extra, chunk_start=s.chunk_start, keys=list(s.keys[:full]),
                      registered=min(s.registered, full))
        for kind, blocks, first in kinds:
            held = blocks[:full - first]
            for b in held:
                pools[kind].share(b)
            table = list(held)
            if partial:
                src = blocks[full - first]
                pools[kind].share(src)  # released by copies_done (or free) once the copy has run
                dst = pools[kind].take(1)[0]
                c.copies.append((kind, src, dst))
                table.append(dst)
            if kind == GLOBAL:
                c.global_blocks = table
            else:
                c.chunked_blocks = table
        self.seqs[child] = c
        return True

    def pending_copies(self, seq_id: int) -> list[tuple[str, int, int]]:
        """Block copies the device must make before this sequence's next step (a fork's partial block). The list
        itself, not a copy (this runs for every piece of every step); `copies_done` replaces it, never edits it."""
        return self.seqs[seq_id].copies

    def copies_done(self, seq_id: int) -> None:
        """The device made the sequence's copies: let go of their sources."""
        s = self.seqs.get(seq_id)
        if s is not None and s.copies:
            self._release_sources(s)

    def _release_sources(self, s: SeqBlocks) -> None:
        for kind, src, _ in s.copies:
            self.pools[s.node][kind].release([src])
        s.copies = []

    # ---- release -----------------------------------------------------------------------------------------
    def free(self, seq_id: int) -> None:
        s = self.seqs.pop(seq_id, None)
        if s is None:
            return
        self._release_sources(s)
        pools = self.pools[s.node]
        pools[GLOBAL].release(s.global_blocks)
        pools[CHUNKED].release(s.chunked_blocks)

    def reset(self) -> None:
        """Forget everything (the workers holding the blocks were replaced)."""
        for p in self.pools:
            p[GLOBAL].reset()
            p[CHUNKED].reset()
        self.seqs.clear()

