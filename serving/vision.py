"""Llama 4's vision encoder and projector for serving, in plain PyTorch, written for one device.

It computes what transformers' `Llama4VisionModel` + `Llama4MultiModalProjector` compute (same weights, same names
as the checkpoint's `vision_model.*` and `multi_modal_projector.*`): tiles in, one text-width embedding per
`<|patch|>` token out. The engine runs it once per image and writes its rows over the prompt's `<|patch|>`
embeddings before the first decoder layer (early fusion; see `serving.model.Batch.mm_rows_R`).

Per tile: unfold into patch_size^2 * 3 pixel vectors -> linear patch embedding; a class token appended last;
learned positional embeddings; pre-norm; encoder layers (LayerNorm, full attention with 2D rotary on patch
(x, y) coordinates, the class token unrotated; GELU MLP); post-norm; the class token dropped; pixel shuffle
(2x2 neighbouring patches -> one token of 4x the width); a two-layer GELU MLP; the projector to the text width.

Shape legend: N tiles, P patches per tile (+1 with the class token), C hidden size, H heads, Dh head dim,
Q tokens per tile after the shuffle, D text hidden size.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VisionConfig:
    """`vision_config` of a Llama 4 config.json, plus the text width the projector maps to."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    text_hidden_size: int
    num_channels: int = 3
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, config: dict) -> "VisionConfig":
        v = config["vision_config"]
        shuffled = v["hidden_size"] / v["pixel_shuffle_ratio"] ** 2
        if v["intermediate_size"] != shuffled:
            raise ValueError(f"vision_config: intermediate_size ({v['intermediate_size']}) must equal hidden_size / "
                             f"pixel_shuffle_ratio**2 ({shuffled:g}): it is also the pixel-shuffle MLP's input width")
        theta = v.get("rope_theta") or (v.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        return cls(**{k: v[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "image_size", "patch_size", "pixel_shuffle_ratio",
                                         "projector_input_dim", "projector_output_dim", "vision_output_dim")},
                   text_hidden_size=config["text_config"]["hidden_size"], num_channels=v.get("num_channels", 3),
                   norm_eps=v.get("norm_eps", 1e-5), rope_theta=float(theta))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return int(self.grid ** 2 * self.pixel_shuffle_ratio ** 2)


def rope_2d(cfg: VisionConfig) -> torch.Tensor:
    """complex64 [P + 1, Dh / 2]: rotations for patch (x, y) coordinates (1-based) and none for the class token."""
    g = cfg.grid
    idx = torch.arange(g * g + 1)
    x, y = idx % g + 1, idx // g + 1
    freq_dim = cfg.hidden_size // cfg.num_attention_heads // 2
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, freq_dim, 2)[: freq_dim // 2].float() / freq_dim))
    # the first half of each head's pairs turns with x, the second half with y
    angles = torch.cat([x[:, None] * inv, y[:, None] * inv], dim=-1).float()
    angles[-1] = 0.0  # the class token (last) is not rotated
    return torch.polar(torch.ones_like(angles), angles)


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        c = cfg.hidden_size
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(c, c, bias=True))
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(c, cfg.intermediate_size, bias=True)
        self.mlp.fc2 = nn.Linear(cfg.intermediate_size, c, bias=True)
        self.input_layernorm = nn.LayerNorm(c)
        self.post_attention_layernorm = nn.LayerNorm(c)

    def forward(self, x_NPC: torch.Tensor, rot_PF: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        N, P, C = x_NPC.shape
        h = self.input_layernorm(x_NPC)
        q, k, v = (proj(h).view(N, P, self.n_heads, -1) for proj in (a.q_proj, a.k_proj, a.v_proj))
        q, k = (torch.view_as_real(torch.view_as_complex(t.float().unflatten(-1, (-1, 2))) * rot_PF[:, None])
                .flatten(-2).type_as(t) for t in (q, k))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [N, H, P, Dh]
        x_NPC = x_NPC + a.o_proj(out.transpose(1, 2).reshape(N, P, C))
        return x_NPC + self.mlp.fc2(F.gelu(self.mlp.fc1(self.post_attention_layernorm(x_NPC))))


def pixel_shuffle(x_NPC: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, g*g, C] -> [N, g*g*ratio^2, C/ratio^2]: each ratio^-1 x ratio^-1 block of patches becomes one token."""
    N, P, C = x_NPC.shape
    g = int(math.sqrt(P))
    x = x_NPC.view(N, g, int(g * ratio), int(C / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(N, int(g * ratio), int(g * ratio), int(C / ratio ** 2)).permute(0, 2, 1, 3)
    return x.reshape(N, -1, x.shape[-1])


class VisionModel(nn.Module):
    """`vision_model.*`: tiles [N, 3, S, S] -> [N, Q, vision_output_dim]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        c, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = nn.Module()
        self.patch_embedding.linear = nn.Linear(cfg.num_channels * p * p, c, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(c))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(cfg.grid ** 2 + 1, c))
        self.layernorm_pre = nn.LayerNorm(c)
        self.layernorm_post = nn.LayerNorm(c)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.vision_adapter = nn.Module()
        self.vision_adapter.mlp = nn.Module()
        self.vision_adapter.mlp.fc1 = nn.Linear(cfg.intermediate_size, cfg.projector_input_dim, bias=False)
        self.vision_adapter.mlp.fc2 = nn.Linear(cfg.projector_output_dim, cfg.projector_output_dim, bias=False)
        self.rot_PF = rope_2d(cfg)  # plain attribute: dtype casts leave it complex64

    def forward(self, pixels_N3SS: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_size
        w = self.patch_embedding.linear.weight
        patches = F.unfold(pixels_N3SS.to(w.dtype), kernel_size=p, stride=p).transpose(1, 2)  # [N, P, 3*p*p]
        x = self.patch_embedding.linear(patches)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.layernorm_pre(torch.cat([x, cls], dim=1) + self.positional_embedding_vlm)
        rot = self.rot_PF.to(x.device)
        for layer in self.model.layers:
            x = layer(x, rot)
        x = self.layernorm_post(x)[:, :-1]  # drop the class token
        mlp = self.vision_adapter.mlp
        return F.gelu(mlp.fc2(F.gelu(mlp.fc1(pixel_shuffle(x, self.cfg.pixel_shuffle_ratio)))))


class VisionTower(nn.Module):
    """The vision encoder and the projector; parameter names are the checkpoint's."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionModel(cfg)
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = nn.Linear(cfg.vision_output_dim, cfg.text_hidden_size, bias=False)

    @torch.inference_mode()
    def forward(self, pixels_N3SS: torch.Tensor) -> torch.Tensor:
        """Embeddings [N * Q, D] for N tiles, in the order their `<|patch|>` tokens appear in the prompt."""
        feats = self.vision_model(pixels_N3SS)
        return self.multi_modal_projector.linear_1(feats.reshape(-1, feats.shape[-1]))


def has_vision_weights(path: str | Path) -> bool:
    index = Path(path) / "model.safetensors.index.json"
    if not index.exists():
        return False
    return any(k.startswith("vision_model.") for k in json.loads(index.read_text())["weight_map"])


def load_vision_tower(path: str | Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", reader=None) -> VisionTower:
    """`vision_model.*` and `multi_modal_projector.*` (safetensors only), read through the engine's weight reader
    (serving/loader.py `open_reader`: a folder, or s3:// byte ranges) or, by default, from the folder `path`,
    which holds config.json."""
    from llama4.checkpoint import CheckpointError, CheckpointReader

    path = Path(path)
    cfg = VisionConfig.from_dict(json.loads((path / "config.json").read_text()))
    own = reader is None
    reader = reader or CheckpointReader(path)  # refuses pickled checkpoints with the reason
    with torch.device("meta"):
        tower = VisionTower(cfg)
    tower = tower.to(dtype).to_empty(device=device)
    try:
        with torch.no_grad():
            for name, param in tower.named_parameters():
                if name not in reader.weight_map:
                    raise CheckpointError(f"tensor {name!r} is missing from {reader.path}; this checkpoint has no "
                                          "vision tower (a text-only Llama 4 checkpoint cannot take images)")
                tensor = reader.get_raw(name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies "
                                          f"{tuple(param.shape)}; config and weights disagree")
                param.copy_(tensor)
    finally:
        if own:
            reader.close()
    tower.vision_model.rot_PF = rope_2d(cfg).to(device)
    return tower.eval().requires_grad_(False)
