"""Llama 4 text-model configuration: one typed view of config.json, read leniently.

Released Llama 4 config.json files nest the text model under `text_config`, use `rope_theta` + `rope_scaling`
(newer transformers writes `rope_parameters`), may leave derived lists empty (`moe_layers`, `no_rope_layers`,
`layer_types`) and carry ints where bools are meant (`"attn_temperature_tuning": 4`). `TextConfig.from_dict`
accepts all of those and resolves every derived field once, so model, engine and planner read plain values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style RoPE frequency scaling (Scout uses it; Maverick has none)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class TextConfig:
    """The Llama 4 text model's shape and behaviour, with derived per-layer lists resolved."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # per routed expert and the shared expert
    intermediate_size_mlp: int  # dense (non-MoE) layers
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    use_qk_norm: bool
    attention_chunk_size: int
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    max_position_embeddings: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[bool, ...]  # True: RoPE + chunked local attention; False: NoPE global attention
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived views -------------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        return layer in self._moe_set

    def is_rope_layer(self, layer: int) -> bool:
        return self.rope_layers[layer]

    @property
    def _moe_set(self) -> frozenset[int]:
        return frozenset(self.moe_layers)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def num_global_layers(self) -> int:
        return sum(1 for r in self.rope_layers if not r)

    @property
    def num_chunked_layers(self) -> int:
        return sum(1 for r in self.rope_layers if r)

    # ---- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TextConfig":
        """Build from a config.json dict: `Llama4ForConditionalGeneration` (nested) or text-only layouts."""
        top = raw
        d = dict(raw.get("text_config") or raw)
        n_layers = int(d["num_hidden_layers"])
        rope_theta, rope_scaling = _read_rope(d)

        step = int(d.get("interleave_moe_layer_step") or 1)
        moe_layers = d.get("moe_layers") or list(range(step - 1, n_layers, step))
        if int(d.get("num_local_experts") or 0) == 0:
            moe_layers = []

        interval = int(d.get("no_rope_layer_interval") or 4)
        no_rope = d.get("no_rope_layers")
        layer_types = d.get("layer_types")
        if no_rope:  # transformers' convention: 1 = this layer uses RoPE, 0 = NoPE
            rope_layers = [bool(v) for v in no_rope]
        elif layer_types:
            rope_layers = [t == "chunked_attention" for t in layer_types]
        else:
            rope_layers = [(i + 1) % interval != 0 for i in range(n_layers)]
        if len(rope_layers) != n_layers:
            raise ValueError(f"config: no_rope_layers has {len(rope_layers)} entries for {n_layers} layers")

        eos = d.get("eos_token_id", top.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        head_dim = d.get("head_dim") or int(d["hidden_size"]) // int(d["num_attention_heads"])
        known = {f.name for f in fields(cls)}
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            head_dim=int(head_dim),
            intermediate_size=int(d["intermediate_size"]),
            intermediate_size_mlp=int(d.get("intermediate_size_mlp") or d["intermediate_size"]),
            num_local_experts=int(d.get("num_local_experts") or 0),
            num_experts_per_tok=int(d.get("num_experts_per_tok") or 1),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            use_qk_norm=bool(d.get("use_qk_norm", True)),
            attention_chunk_size=int(d.get("attention_chunk_size") or 8192),
            attn_temperature_tuning=bool(d.get("attn_temperature_tuning", True)),
            floor_scale=float(d.get("floor_scale", 8192)),
            attn_scale=float(d.get("attn_scale", 0.1)),
            max_position_embeddings=int(d.get("max_position_embeddings") or 131072),
            moe_layers=tuple(int(i) for i in moe_layers),
            rope_layers=tuple(rope_layers),
            tie_word_embeddings=bool(top.get("tie_word_embeddings", d.get("tie_word_embeddings", False))),
            bos_token_id=d.get("bos_token_id", top.get("bos_token_id")),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=d.get("pad_token_id", top.get("pad_token_id")),
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TextConfig":
        """Read `config.json` from a checkpoint folder."""
        with open(Path(path) / "config.json", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _read_rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """RoPE theta and llama3 scaling from either the released keys or transformers 5's `rope_parameters`."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    theta = d.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") not in ("default", None):
            scaling = params
    if theta is None:
        theta = 500000.0
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"config: rope scaling type {kind!r} is not supported (Llama 4 uses 'llama3')")
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )
