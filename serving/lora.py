"""Serve a LoRA adapter (PEFT format, as `finetune/` writes it) by merging it into the weights as they load.

`W' = W + scaling * B @ A` for each targeted `nn.Linear` (attention, shared expert, dense MLP), and per expert for
the fused routed-expert tensors PEFT reaches through `target_parameters` (`feed_forward.experts.gate_up_proj`
[E, D, 2I] and `.down_proj` [E, I, D]), with PEFT's own factor layout: `lora_A` [r*E, in], `lora_B` [out, r*E],
expert e taking rows e*r..(e+1)*r of A and columns {k*E + e} of B. Merging once at load costs nothing per token
and keeps the engine, expert parallelism and tensor parallelism unchanged: `MergedReader` wraps a checkpoint
reader and returns merged tensors, and it merges only the rows a caller reads (one worker's experts, one
tensor-parallel shard), so no worker materialises more than its share.

Only what LoRA merges exactly is accepted: DoRA, LoRA biases, `modules_to_save`, embedding adapters and
`alpha_pattern` are refused with the reason, as is an adapter whose shapes do not fit the checkpoint.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from llama4.checkpoint import CheckpointError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?:language_model\.)?(?P<module>.+?)\.(?P<base>(?:base_layer\.)*)"
                  r"lora_(?P<ab>[AB])\.weight$")


class LoraError(ValueError):
    """An adapter herd cannot serve; the message says why and what to do."""


class LoraAdapter:
    """The factors of one adapter, keyed by the checkpoint tensor they modify (`model.layers.0.self_attn.q_proj.weight`,
    `model.layers.1.feed_forward.experts.gate_up_proj`)."""

    def __init__(self, path: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], experts: set[str],
                 ranks: set[int], alpha: float, rslora: bool = False):
        self.path = Path(path)
        self.alpha, self.rslora = alpha, rslora  # one scaling rule for every tensor (alpha_pattern is refused)
        # Ranks the config allows (r, and rank_pattern's): a fused expert tensor's A has r*E rows, and only a known
        # r tells an adapter for E experts from one for another expert count.
        self.ranks = ranks
        self.factors = factors  # tensor name -> (lora_A, lora_B) in fp32; the rank comes from A's shape
        self.experts = experts  # names of fused routed-expert tensors (3-D, PEFT ParamWrapper layout)

    @classmethod
    def load(cls, path: str | Path) -> "LoraAdapter":
        from safetensors import safe_open

        path = Path(path)
        cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_path.is_file():
            raise LoraError(f"{path}: no {CONFIG_FILE}; give the folder a PEFT `save_pretrained` wrote (finetune's "
                            "`adapter/` output)")
        if not weights.is_file():
            bins = sorted(p.name for p in path.glob("*.bin"))
            raise LoraError(f"{path}: no {WEIGHTS_FILE}" + (f" (only pickled {bins[0]}; herd loads safetensors "
                                                             "only: re-save with safe_serialization=True)" if bins else ""))
        cfg = json.loads(cfg_path.read_text())
        _check_config(cfg, path)
        # PEFT nests one wrapper per target parameter of the same module, the first listed innermost; its keys
        # carry one `base_layer.` per wrapper around it.
        params = [p.rsplit(".", 1)[-1] for p in (cfg.get("target_parameters") or [])]
        raw: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    raise LoraError(f"{path}: tensor {key!r} is not a LoRA factor herd can merge (embedding "
                                    "adapters and extra trained modules are not supported)")
                depth = m["base"].count("base_layer.")
                raw.setdefault((m["module"], depth), {})[m["ab"]] = f.get_tensor(key)
        factors, experts = {}, set()
        for (module, depth), ab in raw.items():
            if set(ab) != {"A", "B"}:
                raise LoraError(f"{path}: {module} has lora_{''.join(ab)} but not both factors")
            if module.endswith(".experts"):
                if not params:
                    raise LoraError(f"{path}: factors for {module} but no target_parameters in {CONFIG_FILE}")
                index = len(params) - 1 - depth
                if not 0 <= index < len(params):
                    raise LoraError(f"{path}: {module} is wrapped {depth + 1} deep but target_parameters lists "
                                    f"{len(params)}")
                name = f"{module}.{params[index]}"
                experts.add(name)
            else:
                name = f"{module}.weight"
            A, B = ab["A"].float(), ab["B"].float()
            if A.shape[0] != B.shape[1]:
                raise LoraError(f"{path}: {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree on rank")
            factors[name] = (A, B)
        ranks = {int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())}
        return cls(path, factors, experts, ranks, float(cfg["lora_alpha"]), bool(cfg.get("use_rslora")))

    def targets(self, name: str) -> bool:
        return name in self.factors

    def delta(self, name: str, base_shape: tuple[int, ...], rows=None) -> torch.Tensor:
        """The fp32 update for checkpoint tensor `name` (full shape `base_shape`), for first-dimension `rows` only
        (some experts of a fused tensor, or some output features of a Linear) when given."""
        A, B = self.factors[name]
        if name in self.experts:
            E, d_in, d_out = base_shape  # HF [E, in, out]; PEFT's A is [r*E, out], B is [in, r*E] for this layout
            if A.shape[0] % E or A.shape[0] // E not in self.ranks or A.shape[1] != d_out or B.shape[0] != d_in:
                raise LoraError(f"{self.path}: {name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit the "
                                f"checkpoint's {tuple(base_shape)}; was the adapter trained on another model?")
            r = A.shape[0] // E
            ids = list(range(E)) if rows is None else list(rows)
            A_erO = A.view(E, r, d_out)[ids]  # expert e's rank rows
            B_Iers = B.view(d_in, r, E)[:, :, ids]  # column k*E + e of B
            return torch.einsum("irE,Ero->Eio", B_Iers, A_erO) * self._scale(r)
        if len(base_shape) != 2 or A.shape[1] != base_shape[1] or B.shape[0] != base_shape[0]:
            raise LoraError(f"{self.path}: {name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit the "
                            f"checkpoint's {tuple(base_shape)}; was the adapter trained on another model?")
        B_sel = B if rows is None else B[list(rows)]
        return (B_sel @ A) * self._scale(A.shape[0])

    def _scale(self, r: int) -> float:
        return self.alpha / math.sqrt(r) if self.rslora else self.alpha / r


def _check_config(cfg: dict, path: Path) -> None:
    refuse = [
        (cfg.get("peft_type", "LORA") != "LORA", f"peft_type is {cfg.get('peft_type')!r}, not LORA"),
        (bool(cfg.get("use_dora")), "DoRA adapters do not merge into a plain weight"),
        (cfg.get("bias", "none") != "none" or bool(cfg.get("lora_bias")), "adapters with trained biases"),
        (bool(cfg.get("modules_to_save")), "modules_to_save (whole trained modules)"),
        (bool(cfg.get("alpha_pattern")), "alpha_pattern (per-module scaling)"),
        (bool(cfg.get("fan_in_fan_out")), "fan_in_fan_out (Conv1D-style weights)"),
    ]
    for bad, why in refuse:
        if bad:
            raise LoraError(f"{path / CONFIG_FILE}: herd cannot serve this adapter: {why}; merge it with PEFT "
                            "(merge_and_unload) and serve the merged checkpoint instead")
    if "lora_alpha" not in cfg:
        raise LoraError(f"{path / CONFIG_FILE}: lora_alpha is missing; is this a PEFT LoRA adapter?")


class MergedReader:
    """A checkpoint reader whose tensors have the adapter merged in (same interface as `CheckpointReader`).

    Merged tensors come back in fp32 (the loader casts them to the serving dtype, rounding once), so serving in
    fp32 gives what PEFT's merge gives on an fp32 model, and bf16 serving rounds only the merged sum.
    """

    def __init__(self, reader, adapter: LoraAdapter):
        self.reader, self.adapter = reader, adapter
        self.path = reader.path
        self.merged: set[str] = set()  # tensors an update was applied to (all of them, once loading is done)

    def __getattr__(self, attr):  # has, full_name, names, close, bytes_fetched, ...
        return getattr(self.reader, attr)

    def get(self, name: str) -> torch.Tensor:
        t = self.reader.get(name)
        if not self.adapter.targets(name):
            return t
        self.merged.add(name)
        return t.float() + self.adapter.delta(name, tuple(t.shape))

    def get_rows(self, name: str, index) -> torch.Tensor:
        t = self.reader.get_rows(name, index)
        if not self.adapter.targets(name):
            return t
        self.merged.add(name)
        return t.float() + self.adapter.delta(name, self.reader.shape(name), rows=index)

    def check_all_merged(self) -> None:
        """Every factor of the adapter found its tensor (else the adapter targets modules this model lacks)."""
        missing = sorted(set(self.adapter.factors) - self.merged)
        if missing:
            raise LoraError(f"{self.adapter.path}: the adapter modifies {missing[0]} (and {len(missing) - 1} more) "
                            "which this checkpoint does not have; was it trained on another model?")
