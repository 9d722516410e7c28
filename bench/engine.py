"""Benchmark: herd's engine versus transformers `generate` on the same Llama 4 checkpoint, same threads, same prompts.

Decode tokens/s at 1 and at 32 concurrent sequences, and the ratio. Decode time is measured the same way for both:
time(generate N new tokens) - time(generate 1 new token), so prefill cancels out. At 1 sequence it also reports
the weight bytes read per second (what one decode step must read: every non-expert matrix and the routed experts
the token uses) against a plain matrix-vector product's bandwidth measured in the same run: the ceiling.

    python -m bench.engine                                   # CPU, maverick-bench (created in ./checkpoints/)
    python -m bench.engine --device cuda                     # GPU: bf16, a Maverick-shaped stack sized to the card
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="maverick-bench")
    ap.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default ./checkpoints/PRESET)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best is kept)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--gpu-layers", type=int, default=0, help="CUDA: layers of the Maverick-shaped stack (0: fit)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
def cpu_checkpoint(args) -> Path:
    """The preset's checkpoint folder, created on first use (an ignored folder)."""
    from llama4.checkpoint import create_checkpoint

    path = args.checkpoint or Path("checkpoints") / args.preset
    if not (path / "config.json").exists():
        print(f"creating {args.preset} checkpoint in {path} ...", flush=True)
        create_checkpoint(args.preset, path, seed=0)
    return path


def herd_engine_from_checkpoint(path: Path, dtype: str, device: str, max_seqs: int, max_len: int):
    from serving.engine import LLMEngine

    return LLMEngine.from_pretrained(path, dtype=dtype, device=device, max_num_seqs=max_seqs, max_model_len=max_len)


def hf_from_checkpoint(path: Path, dtype: str):
    from transformers import Llama4ForConditionalGeneration

    from serving.loader import resolve_dtype

    model = Llama4ForConditionalGeneration.from_pretrained(path, dtype=resolve_dtype(dtype)).eval()
    return model.language_model


def gpu_models(args, dtype: str, max_seqs: int, max_len: int, with_hf: bool):
    """A Maverick-shaped stack (released dims, fewer layers) with random weights, built on the GPU directly.

    A released-size checkpoint would not fit the disk, so the weights are drawn on the device; herd's model and
    transformers' get the same tensors (parameter names are shared).
    """
    from transformers import AutoTokenizer, Llama4ForCausalLM, Llama4TextConfig

    from llama4.presets import get_preset
    from serving.engine import LLMEngine
    from serving.engine.executor import LocalExecutor
    from serving.engine.kv_cache import plan_kv_cache
    from serving.loader import resolve_dtype
    from serving.model import Transformer

    tdtype = resolve_dtype(dtype)
    text = dict(get_preset("maverick").text)
    free = torch.cuda.mem_get_info()[0]
    per_pair = 2 * 2 * (128 * 3 * 5120 * 8192 + 3 * 5120 * 16384) // 2  # one MoE + one dense layer, bf16 bytes
    layers = args.gpu_layers or max(2, 2 * int(0.8 * free / (per_pair * (2 if with_hf else 1)) // 2 * 1))
    text.update(num_hidden_layers=layers, vocab_size=202048)
    from llama4.config import TextConfig

    cfg = TextConfig.from_dict(text)
    print(f"GPU stack: {layers} layers of Maverick dims ({cfg.num_moe_layers} MoE), {dtype}", flush=True)
    with torch.device("cuda"):
        model = Transformer(cfg).to(tdtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.reset_buffers()
    plan = plan_kv_cache(cfg, max_len, tdtype, max_seqs)
    tok = AutoTokenizer.from_pretrained(str(cpu_checkpoint(argparse.Namespace(checkpoint=None,
                                                                              preset="maverick-tiny"))))
    engine = LLMEngine(LocalExecutor(model, plan), tok, cfg, max_model_len=max_len)
    hf = None
    if with_hf:
        hf_cfg = Llama4TextConfig(**{k: v for k, v in text.items() if k != "rope_scaling"})
        with torch.device("cuda"):
            hf = Llama4ForCausalLM(hf_cfg).to(tdtype).eval()
        hf.model.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
                                 strict=False)
        hf.lm_head.weight.data.copy_(model.lm_head.weight)
    return engine, hf, cfg


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, repeats: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def decode_tps(generate, batch: int, new_tokens: int, repeats: int, device: str) -> float:
    """Decode tokens/s: (time for new_tokens) - (time for 1 token), over batch * (new_tokens - 1) tokens."""
    generate(2)  # warm-up
    t_one = _best_time(lambda: generate(1), repeats, device)
    t_all = _best_time(lambda: generate(new_tokens), repeats, device)
    return batch * (new_tokens - 1) / max(t_all - t_one, 1e-9)


def herd_generate(engine, prompts):
    from serving.engine import SamplingParams

    def run(n: int):
        engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))

    return run


def hf_generate(model, prompts, device: str):
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def run(n: int):
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)

    return run


def matvec_bandwidth(device: str, dtype: torch.dtype, repeats: int = 5) -> float:
    """Bytes/s of a plain matrix-vector product over a matrix far larger than the caches: the ceiling."""
    rows = 16384 if device == "cpu" else 65536
    cols = 4096 if device == "cpu" else 16384
    w = torch.randn(rows, cols, device=device).to(dtype)
    x = torch.randn(cols, device=device).to(dtype)
    t = _best_time(lambda: [torch.mv(w, x) for _ in range(4)], repeats, device) / 4
    return w.numel() * w.element_size() / t


def bytes_per_decode_step(cfg, dtype: torch.dtype) -> float:
    """Weight bytes one token's decode step reads: everything but the embedding table and unused experts."""
    from llama4.sizing import param_counts

    c = param_counts(cfg)
    per = torch.finfo(dtype).bits // 8
    return (c.active - c.embed) * per


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    max_seqs, max_len = max(args.batch_sizes), args.prompt_len + args.new_tokens + 8
    if device == "cuda":
        engine, hf, cfg = gpu_models(args, dtype, max_seqs, max_len, with_hf=not args.skip_transformers)
    else:
        path = cpu_checkpoint(args)
        engine = herd_engine_from_checkpoint(path, dtype, device, max_seqs, max_len)
        hf = None if args.skip_transformers else hf_from_checkpoint(path, dtype)
        cfg = engine.config
    from serving.loader import resolve_dtype

    tdtype = resolve_dtype(dtype)
    print(f"machine: {torch.get_num_threads()} threads, device {device}, {dtype}; model {args.preset if device == 'cpu' else 'maverick-shaped'}: "
          f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts", flush=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(3, 2000, (batch, args.prompt_len), generator=g).tolist()
        herd = decode_tps(herd_generate(engine, prompts), batch, args.new_tokens, args.repeats, device)
        ref = decode_tps(hf_generate(hf, prompts, device), batch, args.new_tokens, 1, device) if hf else None
        rows.append((batch, herd, ref))
        ratio = f"{herd / ref:6.1f}x" if ref else "   n/a"
        ref_s = f"{ref:9.1f}" if ref else "      n/a"
        print(f"sequences {batch:3d}: herd {herd:9.1f} tok/s   transformers {ref_s} tok/s   ratio {ratio}", flush=True)
    ceiling = matvec_bandwidth(device, tdtype)
    step_bytes = bytes_per_decode_step(cfg, tdtype)
    one = next((h for b, h, _ in rows if b == 1), None)
    if one:
        achieved = one * step_bytes
        print(f"weight bytes per decode step: {step_bytes / 2**20:.1f} MiB; at 1 sequence herd reads "
              f"{achieved / 1e9:.2f} GB/s of weights; matvec ceiling {ceiling / 1e9:.2f} GB/s "
              f"({100 * achieved / ceiling:.0f}% of it)")


if __name__ == "__main__":
    main()
