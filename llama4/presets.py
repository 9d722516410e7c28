"""Named Llama 4 model shapes, in one registry: the released models for planning, small ones for tests.

`scout` and `maverick` carry the released dimensions (used by the planner; never written to disk by default).
The tiny presets keep the structure that matters (Maverick-tiny keeps 128 experts and the dense/MoE interleave)
with a small attention chunk and `floor_scale`, so short prompts cross chunk boundaries, NoPE layers and the
attention temperature tuning. `maverick-bench` is a few hundred million parameters, for CPU benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llama4.config import TextConfig

REAL_VOCAB_SIZE = 202048  # 200000 BPE tokens + 2048 special-token slots
SPECIAL_SLOTS = 2048  # every Llama 4 tokenizer reserves this many ids for special tokens, after the BPE ids

_RELEASED_COMMON: dict[str, Any] = {
    "hidden_size": 5120,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "rope_theta": 500000.0,
    "attention_chunk_size": 8192,
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "attn_temperature_tuning": True,  # early releases wrote 4; transformers 5 rejects a non-bool
    "num_experts_per_tok": 1,
    "rms_norm_eps": 1e-5,
}

# The vision MLP's width is also the pixel-shuffle MLP's input (`Llama4VisionMLP2.fc1`), so it must be
# hidden_size / pixel_shuffle_ratio**2 (1408 -> 5632 released); the projector dims must all agree too.
_SMALL_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
    "projector_input_dim": 64,
    "projector_output_dim": 64,
    "vision_output_dim": 64,
}

# maverick-bench: released tile size (336 px, 144 tokens per tile) with a narrow two-layer tower.
_BENCH_VISION: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 336,
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
    "projector_input_dim": 512,
    "projector_output_dim": 512,
    "vision_output_dim": 512,
}

_RELEASED_VISION: dict[str, Any] = {
    "hidden_size": 1408,
    "intermediate_size": 5632,
    "num_hidden_layers": 34,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
    "projector_input_dim": 4096,
    "projector_output_dim": 4096,
    "vision_output_dim": 4096,
}


@dataclass(frozen=True)
class Preset:
    """One named model shape: the text config (HF keys) and a vision config, plus how it may be used."""

    name: str
    description: str
    text: dict[str, Any]
    vision: dict[str, Any]
    bpe_vocab_size: int  # BPE ids before the special-token block
    materialise: bool  # False: planning only (hundreds of GB); `herd checkpoint create` refuses it
    released_params: dict[str, float] = field(default_factory=dict)  # published text-only counts, for checks

    def text_config(self, vocab_size: int | None = None) -> TextConfig:
        """The resolved `TextConfig` (vocab size from the tokenizer when one was trained)."""
        d = dict(self.text)
        d["vocab_size"] = vocab_size or d.get("vocab_size") or self.bpe_vocab_size + SPECIAL_SLOTS
        return TextConfig.from_dict(d)


def _tiny(**over: Any) -> dict[str, Any]:
    base = {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 32,
        "intermediate_size_mlp": 128,
        "rope_theta": 500000.0,
        "attention_chunk_size": 32,
        "floor_scale": 32,
        "attn_scale": 0.1,
        "attn_temperature_tuning": True,
        "num_experts_per_tok": 1,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
    }
    base.update(over)
    return base


PRESETS: dict[str, Preset] = {
    "scout": Preset(
        name="scout",
        description="Llama 4 Scout 17B-16E: 16 experts on every layer, QK-norm, llama3 RoPE scaling",
        text={
            **_RELEASED_COMMON,
            "vocab_size": REAL_VOCAB_SIZE,
            "num_local_experts": 16,
            "interleave_moe_layer_step": 1,
            "use_qk_norm": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 16.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
            },
            "max_position_embeddings": 10485760,
        },
        vision=_RELEASED_VISION,
        bpe_vocab_size=REAL_VOCAB_SIZE - SPECIAL_SLOTS,
        materialise=False,
        released_params={"total": 107.8e9, "active": 17.2e9},
    ),
    "maverick": Preset(
        name="maverick",
        description="Llama 4 Maverick 17B-128E: 128 experts on odd layers, dense MLP on even layers, no QK-norm",
        text={
            **_RELEASED_COMMON,
            "vocab_size": REAL_VOCAB_SIZE,
            "num_local_experts": 128,
            "interleave_moe_layer_step": 2,
            "use_qk_norm": False,
            "rope_scaling": None,
            "max_position_embeddings": 1048576,
        },
        vision=_RELEASED_VISION,
        bpe_vocab_size=REAL_VOCAB_SIZE - SPECIAL_SLOTS,
        materialise=False,
        released_params={"total": 400.7e9, "active": 17.2e9},
    ),
    "scout-tiny": Preset(
        name="scout-tiny",
        description="Scout's structure at a few MB: 16 experts every layer, QK-norm, llama3 scaling, chunk 32",
        text=_tiny(
            num_local_experts=16,
            interleave_moe_layer_step=1,
            use_qk_norm=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 16.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 64,
            },
        ),
        vision=_SMALL_VISION,
        bpe_vocab_size=2048,
        materialise=True,
    ),
    "maverick-tiny": Preset(
        name="maverick-tiny",
        description="Maverick's structure at a few MB: 128 experts on odd layers, dense even layers, chunk 32",
        text=_tiny(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None),
        vision=_SMALL_VISION,
        bpe_vocab_size=2048,
        materialise=True,
    ),
    "maverick-bench": Preset(
        name="maverick-bench",
        description="Maverick-shaped, ~219M parameters (hidden 512, 8 layers, 128 experts), for CPU benchmarks; "
                    "336-px tiles through a 2-layer vision tower",
        text=_tiny(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=256,
            intermediate_size_mlp=1024,
            num_local_experts=128,
            interleave_moe_layer_step=2,
            use_qk_norm=False,
            rope_scaling=None,
            attention_chunk_size=8192,
            floor_scale=8192,
            max_position_embeddings=16384,
        ),
        vision=_BENCH_VISION,
        bpe_vocab_size=2048,
        materialise=True,
    ),
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; the error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown preset {name!r}{hint}; choose one of: {', '.join(PRESETS)}") from None
