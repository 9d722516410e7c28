"""Benchmark: herd's engine versus transformers `generate` on the same Llama 4 checkpoint, same threads, same prompts.

Decode tokens/s at 1 and at 32 concurrent sequences, and the ratio. Decode time is measured the same way for both:
time(generate N new tokens) - time(generate 1 new token), so prefill cancels out. At 1 sequence it also reports
the weight bytes read per second (what one decode step must read: every non-expert matrix and the routed experts
the token uses) against a plain matrix-vector product's bandwidth measured in the same run: the ceiling.

    python -m bench.engine                                   # CPU, maverick-bench (created in ./checkpoints/)
    python -m bench.engine --device cuda                     # GPU: bf16, a Maverick-shaped stack sized to the card
    python -m bench.engine --micro                           # CPU: weight layouts for one MoE layer, 32 tokens
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
    ap.add_argument("--micro", action="store_true", help="only the layout microbenchmark (maverick-bench shapes)")
    ap.add_argument("--gpu-layers", type=int, default=0, help="CUDA: layers of the Maverick-shaped stack (0: fit)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
def cpu_checkpoint(args) -> Path:
    """The preset's checkpoint folder, created on first use (an ignored folder)."""
    from llama4.checkpoint import ensure_checkpoint

    return ensure_checkpoint(args.preset, args.checkpoint or Path("checkpoints") / args.preset)


def herd_engine_from_checkpoint(path: Path, dtype: str, device: str, max_seqs: int, max_len: int):
    from serving.engine import LLMEngine

    return LLMEngine.from_pretrained(path, dtype=dtype, device=device, max_num_seqs=max_seqs, max_model_len=max_len)


def hf_from_checkpoint(path: Path, dtype: str):
    from transformers import Llama4ForConditionalGeneration

    from serving.loader import resolve_dtype

    model = Llama4ForConditionalGeneration.from_pretrained(path, dtype=resolve_dtype(dtype)).eval()
    return model.language_model


def random_models(text: dict, device: str, dtype: str, max_seqs: int, max_len: int, with_hf: bool):
    """herd's engine (and transformers' model, with the same tensors) with random weights drawn on the device.

    A released-size checkpoint would not fit the GPU machine's disk, so the GPU run builds the model in memory;
    parameter names are shared, so transformers gets exactly herd's weights.
    """
    from transformers import AutoTokenizer, Llama4ForCausalLM, Llama4TextConfig

    from llama4.config import TextConfig
    from serving.engine import LLMEngine
    from serving.engine.executor import LocalExecutor
    from serving.engine.kv_cache import plan_kv_cache
    from serving.loader import resolve_dtype
    from serving.model import Transformer

    tdtype = resolve_dtype(dtype)
    cfg = TextConfig.from_dict(text)
    with torch.device("meta"):  # materialise once, in the target dtype (a float32 copy would not fit the card)
        model = Transformer(cfg)
    model = model.to(tdtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 1.0 if "embed" in name else p.shape[-2 if "experts" in name else -1] ** -0.5)
    model.reset_buffers()
    model.eval().requires_grad_(False)
    tok_path = cpu_checkpoint(argparse.Namespace(checkpoint=None, preset="maverick-tiny"))
    engine = LLMEngine(LocalExecutor(model, plan_kv_cache(cfg, max_len, tdtype, max_seqs)),
                       AutoTokenizer.from_pretrained(str(tok_path)), cfg, max_model_len=max_len, max_num_seqs=max_seqs)
    hf = None
    if with_hf:
        default = torch.get_default_dtype()
        torch.set_default_dtype(tdtype)  # build in the target dtype directly, for the same reason
        try:
            with torch.device(device):
                hf = Llama4ForCausalLM(Llama4TextConfig(**text)).eval()
        finally:
            torch.set_default_dtype(default)
        from serving.loader import checkpoint_name

        state = {checkpoint_name(k): v for k, v in model.state_dict().items()}
        missing, unexpected = hf.load_state_dict(state, strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return engine, hf, cfg


def gpu_models(args, dtype: str, max_seqs: int, max_len: int, with_hf: bool):
    """A Maverick-shaped stack: released dimensions and vocabulary, as many layer pairs as the card holds."""
    from llama4.config import TextConfig
    from llama4.presets import get_preset
    from llama4.sizing import weight_bytes

    text = {**get_preset("maverick").text, "max_position_embeddings": 16384}
    size = lambda n: weight_bytes(TextConfig.from_dict({**text, "num_hidden_layers": n}), "bf16").total  # noqa
    pair, base = size(4) - size(2), 2 * size(2) - size(4)
    copies = 2 if with_hf else 1
    free = torch.cuda.mem_get_info()[0] * 0.85 / copies
    layers = args.gpu_layers or max(2, 2 * int((free - base) // pair))
    text["num_hidden_layers"] = layers
    print(f"GPU stack: {layers} layers of Maverick dimensions, {size(layers) / 2**30:.1f} GiB per copy", flush=True)
    return random_models(text, "cuda", dtype, max_seqs, max_len, with_hf)


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


def same_greedy(engine, hf, prompts, device: str, n: int = 16) -> str:
    """Whether herd and transformers pick the same greedy tokens here (bf16 may legitimately drift late)."""
    from serving.engine import SamplingParams

    ours = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompts, device=device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompts[0]):].tolist()
    got = ours.outputs[0].token_ids
    first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    return "yes" if first is None else f"no, from token {first}"


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


# ---------------------------------------------------------------------------------------------------------
# Microbenchmark: the layouts behind Transformer.optimize_for_inference
# ---------------------------------------------------------------------------------------------------------
def _micro_time(fn, calls: int, rounds: int = 7) -> float:
    """Best mean seconds per call over `rounds` of `calls` calls (best-of: the machine is shared)."""
    for i in range(3):
        fn(i)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def micro(layers: int = 4, tokens: int = 32) -> None:
    """One MoE layer of maverick-bench shapes (128 experts, D 512, I 256), 32 tokens, top-1, and the 32-row
    dense products, each in the stored layouts considered. Calls rotate over `layers` layers' weights and 8
    routings, so experts come from memory as in a real decode step."""
    import torch.nn.functional as F

    E, D, I = 128, 512, 256
    g = torch.Generator().manual_seed(0)
    gate_up = [torch.randn(E, D, 2 * I, generator=g) for _ in range(layers)]  # checkpoint layout [E, in, out]
    down = [torch.randn(E, I, D, generator=g) for _ in range(layers)]
    strided = lambda w: w.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731  same shape, [out, in] storage
    x_TD = torch.randn(tokens, D, generator=g)
    routes = [torch.randint(0, E, (tokens,), generator=g) for _ in range(8)]

    def loop(gu, dn, i):
        local_A, token_A = torch.sort(routes[i % 8], stable=True)
        x_AD = x_TD[token_A]
        counts = torch.bincount(local_A, minlength=E)
        experts = counts.nonzero().flatten().tolist()
        y_AD, start = torch.empty_like(x_AD), 0
        for e, n in zip(experts, counts[experts].tolist()):
            gate, up = (x_AD[start:start + n] @ gu[i % layers][e]).chunk(2, dim=-1)
            y_AD[start:start + n] = (up * F.silu(gate)) @ dn[i % layers][e]
            start += n
        return y_AD

    def grouped(gu, dn, i):
        local_A, token_A = torch.sort(routes[i % 8], stable=True)
        offs = torch.bincount(local_A, minlength=E).cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(x_TD[token_A], gu[i % layers], offs=offs).chunk(2, dim=-1)
        return F.grouped_mm(up * F.silu(gate), dn[i % layers], offs=offs)

    gate_up_t, down_t = [strided(w) for w in gate_up], [strided(w) for w in down]
    print(f"MoE layer, {tokens} tokens, top-1 ({routes[0].unique().numel()} experts used), "
          f"{torch.get_num_threads()} threads:")
    for name, fn in [("per-expert mm, checkpoint [in, out] layout", lambda i: loop(gate_up, down, i)),
                     ("per-expert mm, transposed strides [out, in]", lambda i: loop(gate_up_t, down_t, i)),
                     ("F.grouped_mm, [in, out]", lambda i: grouped(gate_up, down, i))]:
        print(f"  {name:44s} {_micro_time(fn, 16) * 1e3:7.2f} ms")
    print(f"dense products of {tokens} rows, F.linear with the weight stored [out, in] (nn.Linear) vs [in, out]:")
    for d_in, d_out in [(512, 512), (512, 128), (512, 1024), (1024, 512), (512, 4096)]:
        ws = [torch.randn(d_out, d_in, generator=g) for _ in range(layers)]
        ws_t = [strided(w) for w in ws]
        a = _micro_time(lambda i: F.linear(x_TD[:, :d_in] if d_in <= D else x_TD.repeat(1, 2), ws[i % layers]), 50)
        b = _micro_time(lambda i: F.linear(x_TD[:, :d_in] if d_in <= D else x_TD.repeat(1, 2), ws_t[i % layers]), 50)
        print(f"  [{d_out}, {d_in}]: [out, in] {a * 1e6:7.1f} us   [in, out] {b * 1e6:7.1f} us   {a / b:4.2f}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.micro:
        return micro()
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
    if hf is not None:
        check = torch.randint(3, 2000, (1, args.prompt_len), generator=g).tolist()
        print(f"greedy tokens equal to transformers: {same_greedy(engine, hf, check, device)}", flush=True)
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(3, 2000, (batch, args.prompt_len), generator=g).tolist()
        herd = decode_tps(herd_generate(engine, prompts), batch, args.new_tokens, args.repeats, device)
        ref = decode_tps(hf_generate(hf, prompts, device), batch, args.new_tokens, args.repeats, device) if hf else None
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
