"""Benchmark: one image request (a 2x3 tile grid + the global tile) split into preprocessing, vision encoder and
prefill, on maverick-bench (336-px tiles, 144 tokens per tile, a two-layer vision tower).

References measured in the same run: the prefill of a text-only prompt of the same length (what fusing the image
rows costs on top), and transformers' vision encoder + projector on the same tiles (herd's encoder against it).
Each repeat uses a differently coloured image and fresh text tokens, so no prefix cache can serve a repeat.

    python -m bench.images                      # CPU, 2 threads, maverick-bench (created in ./checkpoints/)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("checkpoints") / "maverick-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs (median kept), after one warm-up")
    ap.add_argument("--size", type=int, nargs=2, default=[1000, 660], metavar=("W", "H"),
                    help="image size; 1000x660 needs a 2x3 grid of 336-px tiles")
    ap.add_argument("--skip-transformers", action="store_true")
    return ap.parse_args(argv)


def checkpoint(path: Path) -> Path:
    """maverick-bench with the preset's current vision tower (an older folder is written again)."""
    from llama4.checkpoint import create_checkpoint, ensure_checkpoint
    from llama4.presets import PRESETS

    want = PRESETS["maverick-bench"].vision
    cfg = path / "config.json"
    if cfg.exists() and any(json.loads(cfg.read_text())["vision_config"].get(k) != v for k, v in want.items()):
        print(f"re-creating {path}: its vision tower predates the preset's", flush=True)
        create_checkpoint("maverick-bench", path, seed=0, overwrite=True)
    return ensure_checkpoint("maverick-bench", path)


def picture(w: int, h: int, k: int):
    """A gradient with a checker, coloured by k (each repeat a different image)."""
    from PIL import Image

    x = torch.linspace(0, 255, w)[None, :].expand(h, w)
    y = torch.linspace(0, 255, h)[:, None].expand(h, w)
    check = ((torch.arange(w)[None, :] // 24 + torch.arange(h)[:, None] // 24) % 2) * 255
    rgb = torch.stack([(x + 37 * k) % 256, (y + 53 * k) % 256, check.float()], dim=-1).to(torch.uint8)
    return Image.fromarray(rgb.numpy())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from llama4.images import ImageConfig, preprocess
    from serving.engine import LLMEngine, SamplingParams

    path = checkpoint(args.checkpoint)
    engine = LLMEngine.from_pretrained(path, dtype="float32", max_num_seqs=2, max_model_len=4096,
                                       max_num_batched_tokens=4096)
    support = engine.image_support
    cfg = ImageConfig.from_pretrained(path)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    w, h = args.size
    tiles = preprocess(picture(w, h, 0), cfg)
    print(f"image {w}x{h}: grid {tiles.grid[0]}x{tiles.grid[1]} + global = {tiles.num_tiles} tiles of "
          f"{cfg.tile_size} px, {cfg.tokens_per_tile} tokens each; threads {args.threads}", flush=True)

    rows = {"preprocess": [], "encoder": [], "prefill": [], "request": [], "text_prefill": []}
    n_prompt = 0
    for k in range(args.repeats + 1):
        img = picture(w, h, k + 1)
        t_pre, _ = timed(lambda: preprocess(img, cfg))
        prompt = engine.chat_prompt([{"role": "user", "content": [
            {"type": "image", "image": img}, {"type": "text", "text": f"Describe picture {k}."}]}])
        encoded = support.images_encoded
        t_req, out = timed(lambda: engine.generate(prompt, one))
        assert support.images_encoded == encoded + 1
        n_prompt = len(out[0].prompt_token_ids)
        px = preprocess(img, cfg).pixel_values
        t_enc, _ = timed(lambda: support.tower(px))  # the same work the request's step did
        g = torch.Generator().manual_seed(k)
        text = torch.randint(3, 2000, (n_prompt,), generator=g).tolist()
        t_text, _ = timed(lambda: engine.generate([text], one))
        if k == 0:
            continue  # warm-up
        rows["preprocess"].append(t_pre)
        rows["encoder"].append(t_enc)
        rows["request"].append(t_req)
        rows["prefill"].append(t_req - t_pre - t_enc)
        rows["text_prefill"].append(t_text)
    med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    print(f"prompt {n_prompt} tokens ({tiles.num_tiles * cfg.tokens_per_tile} image rows); median of "
          f"{args.repeats}, ms:")
    for name in ("preprocess", "encoder", "prefill", "request", "text_prefill"):
        print(f"  {name:13s} {med[name]:9.1f}")
    print(f"  image request / text-only prefill of the same length: {med['request'] / med['text_prefill']:.2f}x "
          f"(prefill alone {med['prefill'] / med['text_prefill']:.2f}x)")
    print(f"  split: preprocess {med['preprocess'] / med['request']:.0%}, encoder "
          f"{med['encoder'] / med['request']:.0%}, prefill {med['prefill'] / med['request']:.0%}")

    if not args.skip_transformers:
        from transformers import Llama4ForConditionalGeneration

        ref = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        px = tiles.pixel_values
        with torch.no_grad():
            def hf():
                feats = ref.get_image_features(pixel_values=px.float()).last_hidden_state
                return ref.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))

            hf()
            t_hf = statistics.median(timed(hf)[0] for _ in range(args.repeats)) * 1e3
        t_herd = statistics.median(timed(lambda: support.tower(px))[0] for _ in range(args.repeats)) * 1e3
        diff = (support.tower(px) - hf()).abs().max().item()
        print(f"vision encoder + projector, {tiles.num_tiles} tiles: herd {t_herd:.1f} ms, transformers "
              f"{t_hf:.1f} ms, ratio {t_hf / t_herd:.2f}x (max |diff| {diff:.1e})")
    engine.shutdown()


if __name__ == "__main__":
    main()
