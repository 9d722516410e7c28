"""`make demo`: herd's main job on the local default, end to end, on a small Llama 4 checkpoint.

Each step prints what it did. Everything stays on this machine: a local Ray cluster on 127.0.0.1, a tiny
checkpoint in the released Hugging Face layout, local folders for storage (./herd-data).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

DATA = Path(os.environ.get("HERD_DEMO_DIR", "herd-data/demo"))


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def make_checkpoint() -> Path:
    from llama4.checkpoint import CheckpointReader, create_checkpoint
    from llama4.config import TextConfig
    from llama4.sizing import param_counts

    path = DATA / "maverick-tiny"
    step(f"1. checkpoint: maverick-tiny in the released Llama 4 layout -> {path}")
    if not (path / "model.safetensors.index.json").exists():
        create_checkpoint("maverick-tiny", path, seed=0, overwrite=True)
    cfg = TextConfig.from_pretrained(path)
    counts = param_counts(cfg)
    reader = CheckpointReader(path)
    shards = sorted(set(reader.weight_map.values()))
    print(f"   {cfg.num_hidden_layers} layers (MoE on {list(cfg.moe_layers)}, NoPE on "
          f"{[i for i, r in enumerate(cfg.rope_layers) if not r]}), {cfg.num_local_experts} experts, "
          f"vocab {cfg.vocab_size}, {counts.total / 1e6:.2f}M text parameters ({counts.active / 1e6:.2f}M active), "
          f"{len(shards)} safetensors shards")
    return path


def generate(path: Path) -> None:
    step("2. generate: herd's engine on one process")
    try:
        from serving.engine import LLMEngine, SamplingParams
    except ImportError:
        LLMEngine = None
    prompt = "The capital of France is"
    if LLMEngine is not None:
        engine = LLMEngine.from_pretrained(str(path), dtype="float32")
        out = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))[0]
        text = out.outputs[0].text
    else:  # until the engine lands, transformers is the reference
        import torch
        from transformers import AutoTokenizer, Llama4ForCausalLM

        tok = AutoTokenizer.from_pretrained(path)
        model = Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32)
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=24, do_sample=False)
        text = tok.decode(gen[0, ids.shape[1]:])
    print(f"   prompt: {prompt!r}\n   continuation (random weights, so not meaningful): {text!r}")


def main() -> int:
    t0 = time.time()
    print("herd demo: Llama 4 on a local default (tiny checkpoint, local Ray, local storage)")
    path = make_checkpoint()
    generate(path)
    print(f"\nDone in {time.time() - t0:.0f}s. Built with Llama.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
