"""Sizing arithmetic for Llama 4: parameter counts, bytes per weight dtype, KV-cache bytes per token.

The cluster planner and the engine's KV-cache allocator both use these functions, so a plan's memory figures
and what the engine allocates agree by construction. Counts are for the text model (the published 109B/400B
totals include the vision encoder).
"""
from __future__ import annotations

from dataclasses import dataclass

from llama4.config import TextConfig

# Bytes per parameter for weights, by the dtype names users write in cluster files.
# int4: 4-bit weights with one bf16 scale per group of 128 (0.5 + 2/128 bytes per weight).
INT4_GROUP_SIZE = 128
WEIGHT_DTYPE_BYTES: dict[str, float] = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5 + 2.0 / INT4_GROUP_SIZE, "fp32": 4.0}
KV_DTYPE_BYTES: dict[str, float] = {"bf16": 2.0, "fp8": 1.0, "fp32": 4.0}


@dataclass(frozen=True)
class ParamCounts:
    """Text-model parameter counts by component."""

    embed: int
    lm_head: int
    attention: int  # q, k, v, o over all layers
    norms: int
    dense_mlp: int  # the dense SwiGLU layers
    shared_experts: int
    routers: int
    routed_experts: int  # all routed experts of all MoE layers
    active_routed: int  # routed-expert parameters one token uses (top-k experts per MoE layer)

    @property
    def non_expert(self) -> int:
        """Everything but the routed experts: the part replicated on every node of a replica."""
        return self.total - self.routed_experts

    @property
    def total(self) -> int:
        return (self.embed + self.lm_head + self.attention + self.norms + self.dense_mlp + self.shared_experts
                + self.routers + self.routed_experts)

    @property
    def active(self) -> int:
        """Parameters used per token (the "17B active" figure)."""
        return self.non_expert + self.active_routed


def expert_params(cfg: TextConfig) -> int:
    """Parameters of one routed expert (gate, up and down projections)."""
    return 3 * cfg.hidden_size * cfg.intermediate_size


def param_counts(cfg: TextConfig) -> ParamCounts:
    """Count parameters by component from the config alone (no weights needed)."""
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    q = h * cfg.num_attention_heads * cfg.head_dim
    kv = 2 * h * cfg.num_key_value_heads * cfg.head_dim
    n_moe = cfg.num_moe_layers
    return ParamCounts(
        embed=cfg.vocab_size * h,
        lm_head=0 if cfg.tie_word_embeddings else cfg.vocab_size * h,
        attention=L * (2 * q + kv),
        norms=(2 * L + 1) * h,
        dense_mlp=(L - n_moe) * 3 * h * cfg.intermediate_size_mlp,
        shared_experts=n_moe * expert_params(cfg),
        routers=n_moe * cfg.num_local_experts * h,
        routed_experts=n_moe * cfg.num_local_experts * expert_params(cfg),
        active_routed=n_moe * cfg.num_experts_per_tok * expert_params(cfg),
    )


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of weights, split the way the serving layout splits them."""

    non_expert: float  # replicated per node (tensor-parallel within it)
    routed_experts: float  # partitioned over all workers of a replica

    @property
    def total(self) -> float:
        return self.non_expert + self.routed_experts


def weight_bytes(cfg: TextConfig, dtype: str) -> WeightBytes:
    """Weight bytes for a weight dtype as Meta released or commonly quantises Llama 4.

    - bf16: everything in bf16.
    - fp8: routed experts in fp8 (one fp32 scale per output row), the rest bf16 (Meta's FP8 release).
    - int4: every linear weight (attention, MLPs, experts, router, lm_head) 4-bit with bf16 group scales;
      embeddings and norms stay bf16.
    """
    if dtype not in WEIGHT_DTYPE_BYTES:
        raise ValueError(f"weight dtype {dtype!r} unknown; choose one of {sorted(WEIGHT_DTYPE_BYTES)}")
    c = param_counts(cfg)
    if dtype in ("bf16", "fp32"):
        b = WEIGHT_DTYPE_BYTES[dtype]
        return WeightBytes(c.non_expert * b, c.routed_experts * b)
    if dtype == "fp8":
        rows = cfg.num_moe_layers * cfg.num_local_experts * (2 * cfg.intermediate_size + cfg.hidden_size)
        return WeightBytes(c.non_expert * 2.0, c.routed_experts * 1.0 + rows * 4.0)
    q = WEIGHT_DTYPE_BYTES["int4"]
    plain = c.embed + c.norms  # not linear layers: kept in bf16
    return WeightBytes((c.non_expert - plain) * q + plain * 2.0, c.routed_experts * q)


@dataclass(frozen=True)
class KVBytesPerToken:
    """KV-cache bytes one token costs in one layer of each kind, and over the whole model."""

    per_layer: float  # K and V for one token in one layer
    chunked_layers: int  # RoPE layers: keep at most `attention_chunk_size` tokens per sequence
    global_layers: int  # NoPE layers: keep the whole context
    chunk_size: int

    def sequence_bytes(self, context_len: int) -> float:
        """Cache bytes one sequence of `context_len` tokens holds at most."""
        local = min(context_len, self.chunk_size)
        return self.per_layer * (self.chunked_layers * local + self.global_layers * context_len)


def kv_bytes_per_token(cfg: TextConfig, kv_dtype: str = "bf16") -> KVBytesPerToken:
    """Bytes per cached token per layer (K and V), and how many layers of each kind there are."""
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ValueError(f"KV-cache dtype {kv_dtype!r} unknown; choose one of {sorted(KV_DTYPE_BYTES)}")
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * KV_DTYPE_BYTES[kv_dtype]
    return KVBytesPerToken(per_layer, cfg.num_chunked_layers, cfg.num_global_layers, cfg.attention_chunk_size)


def max_sequences(cfg: TextConfig, budget_bytes: float, context_len: int, kv_dtype: str = "bf16") -> int:
    """How many full-context sequences fit a KV-cache budget (chunked layers capped at the chunk)."""
    per_seq = kv_bytes_per_token(cfg, kv_dtype).sequence_bytes(context_len)
    return int(budget_bytes // per_seq) if per_seq > 0 else 0


def vision_params(vision: dict, text_hidden_size: int) -> int:
    """Parameters of the vision encoder and the projector to the text width, from a `vision_config` dict
    (what the serving process holds besides the text model when it takes images)."""
    c, inter, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    patches = (vision["image_size"] // p) ** 2 + 1  # + the class token
    per_layer = 4 * (c * c + c) + (c * inter + inter) + (inter * c + c) + 2 * 2 * c  # attention, MLP, 2 LayerNorms
    embed = vision.get("num_channels", 3) * p * p * c + c + patches * c + 2 * 2 * c  # patches, class, positions, norms
    adapter = inter * vision["projector_input_dim"] + vision["projector_output_dim"] ** 2
    return embed + vision["num_hidden_layers"] * per_layer + adapter + vision["vision_output_dim"] * text_hidden_size


# ---- the paged KV cache's block arithmetic (serving/engine/kv_cache.py sizes its pools with these) -------------
DEFAULT_BLOCK_SIZE = 16  # tokens per KV-cache block (vLLM's default)
DEFAULT_MEAN_SEQUENCE_TOKENS = 2048  # the sequence length a budget is split for, unless told


@dataclass(frozen=True)
class BlockCounts:
    """Blocks of each layer type's pool: the global (NoPE) layers' and the chunked (RoPE) layers'."""

    global_blocks: int
    chunked_blocks: int


def sequence_blocks(kv: KVBytesPerToken, num_tokens: int, block_size: int) -> BlockCounts:
    """Blocks one sequence of `num_tokens` tokens holds at its end: global layers a block per `block_size` tokens,
    chunked layers only the blocks of the chunk its last token is in (chunks start at multiples of the chunk size).
    A layer type the model lacks holds none."""
    chunk_tokens = num_tokens - (num_tokens - 1) // kv.chunk_size * kv.chunk_size if num_tokens else 0
    return BlockCounts(-(-num_tokens // block_size) if kv.global_layers else 0,
                       -(-chunk_tokens // block_size) if kv.chunked_layers else 0)


def peak_sequence_blocks(kv: KVBytesPerToken, num_tokens: int, block_size: int) -> BlockCounts:
    """The most blocks one sequence holds while it grows to `num_tokens` tokens (a whole chunk's, once past it)."""
    return BlockCounts(sequence_blocks(kv, num_tokens, block_size).global_blocks,
                       -(-min(kv.chunk_size, num_tokens) // block_size) if kv.chunked_layers else 0)


def block_bytes(kv: KVBytesPerToken, block_size: int) -> tuple[float, float]:
    """Bytes one block costs over all layers of its type: (global, chunked)."""
    per = kv.per_layer * block_size
    return per * kv.global_layers, per * kv.chunked_layers


def blocks_bytes(kv: KVBytesPerToken, blocks: BlockCounts, block_size: int) -> float:
    """Bytes `blocks` cost."""
    g, c = block_bytes(kv, block_size)
    return blocks.global_blocks * g + blocks.chunked_blocks * c


def kv_pools(kv: KVBytesPerToken, budget_bytes: float, max_len: int, block_size: int = DEFAULT_BLOCK_SIZE,
             mean_tokens: int = DEFAULT_MEAN_SEQUENCE_TOKENS) -> BlockCounts:
    """The two pools a KV budget buys: first one whole sequence of `max_len` tokens (so every admitted sequence can
    finish), then the rest split in the proportion a sequence of `mean_tokens` needs. ValueError when the budget
    cannot hold the one sequence."""
    one = peak_sequence_blocks(kv, max_len, block_size)
    need = blocks_bytes(kv, one, block_size)
    if budget_bytes < need:
        raise ValueError(f"a KV budget of {int(budget_bytes)} bytes cannot hold one sequence of {max_len} tokens "
                         f"({int(need)} bytes)")
    mean = sequence_blocks(kv, max(1, min(mean_tokens, max_len)), block_size)
    mean_cost = blocks_bytes(kv, mean, block_size)
    extra = int((budget_bytes - need) // mean_cost) if mean_cost else 0
    return BlockCounts(one.global_blocks + extra * mean.global_blocks, one.chunked_blocks + extra * mean.chunked_blocks)


def cache_tokens(kv: KVBytesPerToken, pools: BlockCounts, block_size: int) -> int:
    """Tokens the pools hold over all sequences: the global pool's (every token of a sequence has a global block;
    chunked layers need fewer), or the chunked pool's for a model without global layers."""
    return (pools.global_blocks if kv.global_layers else pools.chunked_blocks) * block_size


def sequences_in_pools(kv: KVBytesPerToken, pools: BlockCounts, num_tokens: int, block_size: int) -> int:
    """How many sequences of `num_tokens` tokens the pools hold at once (each at its peak)."""
    need = peak_sequence_blocks(kv, num_tokens, block_size)
    fits = [have // n for have, n in ((pools.global_blocks, need.global_blocks),
                                      (pools.chunked_blocks, need.chunked_blocks)) if n]
    return min(fits, default=0)


def longest_sequence(kv: KVBytesPerToken, budget_bytes: float, block_size: int = DEFAULT_BLOCK_SIZE,
                     limit: int = 2**62) -> int:
    """The longest single sequence, in tokens, a KV budget holds when the sequence has it to itself (a multiple
    of the block size; chunked layers stop growing at the chunk), at most `limit` (the model's context)."""
    g, c = block_bytes(kv, block_size)
    if budget_bytes <= 0 or g + c <= 0:
        return 0
    chunk_blocks = -(-kv.chunk_size // block_size)
    within = int(budget_bytes // (g + c))  # blocks while the sequence is within its first chunk
    if within < chunk_blocks or not kv.chunked_layers:
        return min(within * block_size, limit)
    if not g:
        return limit  # only chunked layers: past one chunk a sequence needs no more blocks
    return min(int((budget_bytes - chunk_blocks * c) // g) * block_size, limit)
