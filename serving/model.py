"""The Llama 4 text model for serving, in one file, written for one device.

It computes exactly what Hugging Face transformers' `Llama4ForCausalLM` computes (same weights, same names), but
over a flat batch of tokens from many sequences at once (prefill pieces and decode tokens mixed), reading and
writing a paged KV cache through per-sequence block tables (serving/engine/kv_cache.py hands the blocks out), and
running each routed expert only on the tokens the router sent to it. Tensor and expert parallelism are applied from outside (serving/expert_parallel/): they swap
parameters or the `RoutedExperts` module after loading; nothing here knows about them.

Llama 4 specifics, as transformers defines them:
- RoPE layers (`cfg.rope_layers[i]`): complex RoPE on adjacent pairs, llama3 frequency scaling when configured,
  then the weightless L2 QK-norm when `use_qk_norm`, and chunked local attention: a token at position p sees
  only positions in [p // C * C, p] (chunks aligned at multiples of C = attention_chunk_size, not a window).
  Their cache holds only the current chunk's blocks: key p lives at entry (p - p // C * C) of the chunk table.
- NoPE layers: no rotation, global causal attention over the whole context, and attention temperature tuning
  that scales queries by 1 + attn_scale * log1p(floor((p + 1) / floor_scale)) on absolute positions p.
- MoE layers: router logits, top-k, sigmoid of the chosen logits scales the expert *input*; plus a shared expert.

Shape legend (suffixes on tensor names):
  T tokens in the flat batch      D hidden size            V vocabulary
  H query heads, G = H // Hkv     Hkv key/value heads       Dh head dim
  E experts (logical)             El experts held here      K experts per token     A = T * K assignments
  I expert intermediate size      L keys read               M blocks per table        B sequences
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llama4.config import TextConfig
from serving import moe


# ---------------------------------------------------------------------------------------------------------
# Batch description
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SeqSpan:
    """One sequence's run of tokens inside the flat batch, and the KV-cache blocks it reads and writes.

    Keys are addressed by block table, one per layer type (`ring`: False for global layers, True for chunked
    ones): entry i of a table holds the block with the sequence's keys [first_key + i*bs, first_key + (i+1)*bs),
    where first_key is 0 on global layers and the current chunk's start on chunked layers.
    """

    offset: int  # index of its first token in the flat batch
    length: int  # tokens it contributes this step
    start_pos: int  # absolute position of its first token
    tables: dict[bool, list[int]]  # ring -> block table
    first_key: dict[bool, int]  # ring -> absolute position of the table's first key


@dataclass
class Batch:
    """Everything a forward step needs to know about its flat batch of tokens (all tensors on the model device).

    The block addressing of each layer type is worked out once per step (`write_index`, `decode_tables`,
    `span_keys`) and reused by every layer of that type.
    """

    tokens_T: torch.Tensor  # int64 [T]
    positions_T: torch.Tensor  # int64 [T]
    logits_idx_N: torch.Tensor  # int64 [N] rows whose next-token logits are wanted
    spans: list[SeqSpan]
    # Single-token sequences (decode) are attended to together; longer ones (prefill pieces) one by one.
    decode: list[SeqSpan]
    decode_rows_B: torch.Tensor | None  # int64 [B] rows of the single-token sequences (None: all rows are)
    prefill: list[SeqSpan]
    block_size: int
    single: SeqSpan | None = None  # the one sequence, when the batch holds just one (no mask)
    # Early fusion (images): these rows' token embeddings are replaced by the vision tower's (serving/vision.py).
    mm_rows_R: torch.Tensor | None = None  # int64 [R]
    mm_embeds_RD: torch.Tensor | None = None  # [R, D]
    workspace: dict | None = None  # gather buffers reused across layers and steps (the executor keeps it)
    _memo: dict = field(default_factory=dict, repr=False)

    def scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reusable buffer for gathered keys or values. Allocating a fresh one per layer cost more than the
        gather itself on CPU (large tensors come from mmap: page faults on first touch, every time)."""
        ws = self.workspace if self.workspace is not None else self._memo
        n = math.prod(shape)
        buf = ws.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = ws[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)

    def write_index(self, ring: bool) -> torch.Tensor:
        """int64 [T]: row of the flattened cache [blocks * bs] where each token's key and value go."""
        key = ("write", ring)
        if key not in self._memo:
            bs, rows = self.block_size, []
            for s in self.spans:
                table, first = s.tables[ring], s.first_key[ring]
                rows += [table[(p - first) // bs] * bs + p % bs for p in range(s.start_pos, s.start_pos + s.length)]
            self._memo[key] = torch.tensor(rows, dtype=torch.long, device=self.tokens_T.device)
        return self._memo[key]

    def decode_tables(self, ring: bool) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """For the decoding sequences: block ids [B, M] (padded), keys to read L, and the bool [B, 1, 1, L] mask
        of which of them each sequence sees (None when there is one sequence: it sees all L)."""
        key = ("decode", ring)
        if key not in self._memo:
            dev, bs = self.tokens_T.device, self.block_size
            seen = [s.start_pos - s.first_key[ring] + 1 for s in self.decode]  # keys each sequence attends to
            L = max(seen)
            M = -(-L // bs)
            table = torch.tensor([s.tables[ring][:M] + [0] * (M - min(M, len(s.tables[ring]))) for s in self.decode],
                                 dtype=torch.long, device=dev)
            mask = None
            if len(self.decode) > 1:
                mask = (torch.arange(L, device=dev)[None, :] < torch.tensor(seen, device=dev)[:, None])[:, None, None]
            self._memo[key] = (table, L, mask)
        return self._memo[key]

    def single_run(self, ring: bool) -> int | None:
        """The first block when the batch is one decoding sequence whose blocks are consecutive (a view then
        replaces the gather), else None."""
        key = ("run", ring)
        if key not in self._memo:
            run = None
            if len(self.decode) == 1 and not self.prefill:
                table, _, _ = self.decode_tables(ring)
                t = table[0].tolist()
                if t == list(range(t[0], t[0] + len(t))):
                    run = t[0]
            self._memo[key] = run
        return self._memo[key]

    def span_keys(self, span: SeqSpan, ring: bool) -> tuple[torch.Tensor | slice, int]:
        """A prefill span's blocks (a slice when they are consecutive: a view, no gather) and its key count."""
        key = ("span", ring, span.offset)
        if key not in self._memo:
            n_keys = span.start_pos + span.length - span.first_key[ring]
            table = span.tables[ring][:-(-n_keys // self.block_size)]
            if table == list(range(table[0], table[0] + len(table))):
                blocks = slice(table[0], table[0] + len(table))
            else:
                blocks = torch.tensor(table, dtype=torch.long, device=self.tokens_T.device)
            self._memo[key] = (blocks, n_keys)
        return self._memo[key]

    @classmethod
    def build(cls, spans: list[tuple[list[int], int, bool, list[int], int, list[int]]], device: torch.device | str,
              chunk_size: int, block_size: int) -> "Batch":
        """From (token_ids, start_pos, need_logits, global blocks, chunk start, chunked blocks) per sequence;
        need_logits is a bool (the last position's logits) or a count k (the last k positions', e.g. a scored prompt).

        A piece must not cross an attention-chunk boundary (the scheduler splits prefill there): its chunked-layer
        keys all live in the blocks of one chunk.
        """
        tokens, positions, logits_idx, seq_spans = [], [], [], []
        for ids, start, need_logits, global_blocks, chunk_start, chunked_blocks in spans:
            n = len(ids)
            if n == 0:
                raise ValueError("a sequence chunk must hold at least one token")
            if start // chunk_size != (start + n - 1) // chunk_size:
                raise ValueError(f"prefill piece [{start}, {start + n}) crosses an attention-chunk boundary "
                                 f"(chunk size {chunk_size}); split it at multiples of the chunk size")
            seq_spans.append(SeqSpan(len(tokens), n, start, {False: global_blocks, True: chunked_blocks},
                                     {False: 0, True: chunk_start}))
            tokens.extend(ids)
            positions.extend(range(start, start + n))
            if need_logits:
                logits_idx.extend(range(len(tokens) - int(need_logits), len(tokens)))
        decode = [s for s in seq_spans if s.length == 1]
        prefill = [s for s in seq_spans if s.length > 1]
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return cls(
            tokens_T=as_long(tokens),
            positions_T=as_long(positions),
            logits_idx_N=as_long(logits_idx),
            spans=seq_spans,
            decode=decode,
            decode_rows_B=None if not prefill else as_long([s.offset for s in decode]),
            prefill=prefill,
            block_size=block_size,
            single=seq_spans[0] if len(seq_spans) == 1 else None,
        )


@dataclass
class StepTables:
    """Per-step values shared by all layers: RoPE rotation and the NoPE query temperature."""

    rot_T1F: torch.Tensor  # complex64 [T, 1, Dh/2]: e^(i * position * frequency), F = Dh/2 pairs
    attn_scale_T: torch.Tensor | None  # [T] query scale on NoPE layers, None when tuning is off


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_norm(x, self.eps) * self.weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) in float32, no weight: Llama 4's QK norm (transformers' `Llama4TextL2Norm`)."""
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).type_as(x)


def rope_inv_freq(cfg: TextConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [Dh/2] in float32, with llama3 scaling when the config has it."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    if rs.high_freq_factor == rs.low_freq_factor:
        return scaled  # no band to interpolate (Scout: both 1.0); the smoothing formula would divide by zero
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x_THX: torch.Tensor, rot_T1F: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) as complex numbers, in float32 (Llama 4's layout)."""
    x_THF = torch.view_as_complex(x_THX.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(x_THF * rot_T1F).flatten(-2).type_as(x_THX)


class SwiGLU(nn.Module):
    """The dense MLP and the shared expert: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """GQA attention over the paged cache; chunked-local on RoPE layers, global with temperature on NoPE ones."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.use_rope = cfg.rope_layers[layer]
        self.use_qk_norm = cfg.use_qk_norm and self.use_rope
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.eps = cfg.rms_norm_eps
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.cache_k: torch.Tensor | None = None  # [blocks, bs, Hkv, Dh]: this layer type's pool
        self.cache_v: torch.Tensor | None = None

    def allocate_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> None:
        shape = (num_blocks, block_size, self.n_kv_heads, self.head_dim)
        self.cache_k = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_v = torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, x_TD: torch.Tensor, batch: Batch, tables: StepTables) -> torch.Tensor:
        T = x_TD.shape[0]
        q_THX = self.q_proj(x_TD).view(T, self.n_heads, self.head_dim)
        k_THX = self.k_proj(x_TD).view(T, self.n_kv_heads, self.head_dim)
        v_THX = self.v_proj(x_TD).view(T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q_THX = apply_rope(q_THX, tables.rot_T1F)
            k_THX = apply_rope(k_THX, tables.rot_T1F)
        if self.use_qk_norm:
            q_THX, k_THX = l2_norm(q_THX, self.eps), l2_norm(k_THX, self.eps)
        if self.temperature_tuning:
            q_THX = (q_THX * tables.attn_scale_T[:, None, None]).to(q_THX.dtype)

        # Write this step's keys and values first, then every query reads its context from the cache.
        rows_T = batch.write_index(self.use_rope)
        self.cache_k.view(-1, self.n_kv_heads, self.head_dim).index_copy_(0, rows_T, k_THX.to(self.cache_k.dtype))
        self.cache_v.view(-1, self.n_kv_heads, self.head_dim).index_copy_(0, rows_T, v_THX.to(self.cache_v.dtype))

        if not batch.prefill:
            out_TX = self._decode(q_THX, batch)
        else:
            out_TX = torch.empty(T, self.n_heads * self.head_dim, dtype=x_TD.dtype, device=x_TD.device)
            if batch.decode:
                out_TX[batch.decode_rows_B] = self._decode(q_THX[batch.decode_rows_B], batch)
            for span in batch.prefill:
                rows = slice(span.offset, span.offset + span.length)
                out_TX[rows] = self._prefill(q_THX[rows], span, batch)
        return self.o_proj(out_TX)

    def _decode(self, q_BHX: torch.Tensor, batch: Batch) -> torch.Tensor:
        """One query per sequence, all sequences in one padded attention call over their gathered blocks."""
        B = q_BHX.shape[0]
        table_BM, L, mask = batch.decode_tables(self.use_rope)
        M, bs = table_BM.shape[1], batch.block_size
        run = batch.single_run(self.use_rope)  # one sequence on consecutive blocks: read them in place

        def gather(cache: torch.Tensor, name: str) -> torch.Tensor:  # [B, Hkv, L, Dh]
            if run is not None:
                return cache[run:run + M].view(1, M * bs, self.n_kv_heads, -1)[:, :L].transpose(1, 2)
            out = batch.scratch(name, (B * M, bs, self.n_kv_heads, self.head_dim), cache)
            held = torch.index_select(cache, 0, table_BM.view(-1), out=out)
            return held.view(B, M * bs, self.n_kv_heads, -1)[:, :L].transpose(1, 2)

        q_BHGX = q_BHX.view(B, self.n_kv_heads, -1, self.head_dim)  # query head h = kv head h // G
        k_BHLX, v_BHLX = gather(self.cache_k, "k"), gather(self.cache_v, "v")
        out = F.scaled_dot_product_attention(q_BHGX, k_BHLX.to(q_BHX.dtype), v_BHLX.to(q_BHX.dtype), attn_mask=mask)
        return out.reshape(B, -1)

    def _prefill(self, q_nHX: torch.Tensor, span: SeqSpan, batch: Batch) -> torch.Tensor:
        """A prefill piece of one sequence: causal attention to everything its chunk (or the context) holds."""
        n, end = span.length, span.start_pos + span.length
        blocks, n_keys = batch.span_keys(span, self.use_rope)

        def keys(cache: torch.Tensor, name: str) -> torch.Tensor:  # [Hkv, L, Dh]
            if isinstance(blocks, slice):
                held = cache[blocks]
            else:
                out = batch.scratch(name, (len(blocks), *cache.shape[1:]), cache)
                held = torch.index_select(cache, 0, blocks, out=out)
            return held.reshape(-1, self.n_kv_heads, self.head_dim)[:n_keys].transpose(0, 1)

        first_key = span.first_key[self.use_rope]
        key_pos = torch.arange(first_key, end, device=q_nHX.device)
        q_pos = torch.arange(span.start_pos, end, device=q_nHX.device)
        mask_nL = key_pos[None, :] <= q_pos[:, None]
        out = F.scaled_dot_product_attention(
            q_nHX.transpose(0, 1)[None], keys(self.cache_k, "k")[None].to(q_nHX.dtype),
            keys(self.cache_v, "v")[None].to(q_nHX.dtype), attn_mask=mask_nL, enable_gqa=True)  # [1, H, n, Dh]
        return out[0].transpose(0, 1).reshape(n, -1)


# ---------------------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------------------
class RoutedExperts(nn.Module):
    """The routed experts this module holds (`expert_ids`, in slot order), run only on the tokens routed to them
    (the kernel is serving/moe.py).

    Weights keep the released fused layout: gate_up_proj [El, D, 2I] (gate first) and down_proj [El, I, D].
    Tokens routed to experts not held here contribute zero.
    """

    def __init__(self, cfg: TextConfig, expert_ids: list[int] | None = None):
        super().__init__()
        self.num_experts = cfg.num_local_experts
        self.expert_ids = list(range(cfg.num_local_experts)) if expert_ids is None else list(expert_ids)
        El, D, I = len(self.expert_ids), cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(El, D, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(El, I, D))
        self.register_buffer("local_of_global", torch.empty(self.num_experts, dtype=torch.long), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Map logical expert id -> slot here (-1: not held); called again after moving to a device."""
        table = torch.full((self.num_experts,), -1, dtype=torch.long)
        table[torch.tensor(self.expert_ids, dtype=torch.long)] = torch.arange(len(self.expert_ids))
        self.local_of_global = table.to(self.local_of_global.device)
        self._holds_all = self.expert_ids == list(range(self.num_experts))

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        slot_TK = self.local_of_global[topk_idx_TK]
        return moe.routed_experts(x_TD, slot_TK, topk_weight_TK, self.gate_up_proj, self.down_proj, self._holds_all)


class MoE(nn.Module):
    """Router + routed experts + shared expert; counts how many tokens each expert received."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = RoutedExperts(cfg)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.register_buffer("routed_token_counts", torch.zeros(cfg.num_local_experts, dtype=torch.long),
                             persistent=False)  # [E], cumulative

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = self.router(x_TD)
        topk_logit_TK, topk_idx_TK = torch.topk(logits_TE, self.top_k, dim=1)
        topk_weight_TK = torch.sigmoid(topk_logit_TK.float()).to(x_TD.dtype)
        self.routed_token_counts += torch.bincount(topk_idx_TK.reshape(-1), minlength=logits_TE.shape[1])
        return self.shared_expert(x_TD) + self.experts(x_TD, topk_idx_TK, topk_weight_TK)


# ---------------------------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.is_moe = cfg.is_moe_layer(layer)
        self.feed_forward = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_TD: torch.Tensor, batch: Batch, tables: StepTables) -> torch.Tensor:
        h_TD = x_TD + self.self_attn(self.input_layernorm(x_TD), batch, tables)
        return h_TD + self.feed_forward(self.post_attention_layernorm(h_TD))


class Transformer(nn.Module):
    """Llama 4 text model. Parameter names are the checkpoint's, less the `model.` / `language_model.` prefix."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(cfg)  # float32 [Dh/2]; a plain attribute so dtype casts leave it alone

    def moe_layers(self) -> list[MoE]:
        return [layer.feed_forward for layer in self.layers if layer.is_moe]

    def reset_buffers(self) -> None:
        """Recompute non-weight state after the module was materialised on a device (see serving/loader.py)."""
        device = self.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.cfg).to(device)
        for moe in self.moe_layers():
            moe.routed_token_counts = torch.zeros(self.cfg.num_local_experts, dtype=torch.long, device=device)
            if isinstance(moe.experts, RoutedExperts):
                moe.experts.local_of_global = moe.experts.local_of_global.to(device)
                moe.experts.reset_buffers()

    @torch.no_grad()
    def optimize_for_inference(self) -> "Transformer":
        """Re-lay weights for fast serving on CPU, once, after loading; names, shapes and values stay the same.

        Every `nn.Linear` weight keeps its [out, in] shape but gets [in, out] storage (transposed strides), so
        `F.linear` becomes a plain x @ W product: MKL ran 32-row products of these shapes 2.2x faster that way.
        Measured on CPU only, so other devices are left alone. The routed experts keep the checkpoint's
        [in, out] layout, already the fast one for their 1-2 row products. The loader calls this for every
        process, expert-parallel workers included, after their share is filled.
        """
        if self.embed_tokens.weight.device.type != "cpu":
            return self
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.stride(-1) == 1:
                module.weight.data = module.weight.data.t().contiguous().t()
        return self

    def allocate_kv_cache(self, global_blocks: int, chunked_blocks: int, block_size: int,
                          dtype: torch.dtype | None = None) -> None:
        """Allocate the paged cache: each global layer a pool of `global_blocks` blocks, each chunked layer one of
        `chunked_blocks` (serving/engine/kv_cache.py decides both and hands the blocks out)."""
        w = self.embed_tokens.weight
        for layer in self.layers:
            n = chunked_blocks if layer.self_attn.use_rope else global_blocks
            layer.self_attn.allocate_cache(n, block_size, dtype or w.dtype, w.device)

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[str, int, int]]) -> None:
        """Copy KV-cache blocks, (kind, source, destination) with kind "global" or "chunked" (the layers whose pool
        holds them): a forked sample's own copy of its prompt's partial last block."""
        device = self.embed_tokens.weight.device
        index = {}  # kind -> (source blocks, destination blocks), built once for all layers of that kind
        for kind in ("global", "chunked"):
            pairs = [(src, dst) for k, src, dst in copies if k == kind]
            if pairs:
                index[kind] = tuple(torch.tensor(ix, device=device) for ix in zip(*pairs))
        for layer in self.layers:
            attn = layer.self_attn
            src_dst = index.get("chunked" if attn.use_rope else "global")
            if src_dst is not None:
                src_B, dst_B = src_dst
                attn.cache_k.index_copy_(0, dst_B, attn.cache_k.index_select(0, src_B))
                attn.cache_v.index_copy_(0, dst_B, attn.cache_v.index_select(0, src_B))

    def step_tables(self, positions_T: torch.Tensor) -> StepTables:
        freqs_TF = positions_T[:, None].float() * self.inv_freq[None, :]
        scale_T = None
        if self.cfg.attn_temperature_tuning:
            scale_T = torch.log1p(torch.floor((positions_T.float() + 1.0) / self.cfg.floor_scale)) \
                * self.cfg.attn_scale + 1.0
        return StepTables(torch.polar(torch.ones_like(freqs_TF), freqs_TF)[:, None, :], scale_T)

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Run one step; returns float32 logits [N, V] for the rows in `batch.logits_idx_N`."""
        tables = self.step_tables(batch.positions_T)
        x_TD = self.embed_tokens(batch.tokens_T)
        if batch.mm_rows_R is not None:
            x_TD[batch.mm_rows_R] = batch.mm_embeds_RD.to(x_TD.dtype)
        for layer in self.layers:
            x_TD = layer(x_TD, batch, tables)
        return self.lm_head(self.norm(x_TD[batch.logits_idx_N])).float()
