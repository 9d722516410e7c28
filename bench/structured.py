"""Benchmark: decoding under a JSON schema (xgrammar masks at every step) versus free decoding, same engine.

32 sequences decode together, once all constrained by one JSON schema and once free, on `maverick-bench` shapes
with Llama 4's 202,048-token vocabulary (200,000 byte-level BPE tokens + the 2,048 special slots): the mask's cost
grows with the vocabulary, so the tiny checkpoints' 4,096 tokens would flatter it. The checkpoint's tokenizer is
a synthetic byte-level vocabulary of that size (word pieces with and without a leading space, capitalised words,
digits, punctuation runs, non-ASCII pieces), since the released one cannot be shipped; the grammar engine sees it
exactly as it would see Llama 4's.

Decode time is time(N new tokens) - time(1 new token) (prefill cancels out), best of --repeats, per generated
token; the schema (an array of 32 records) is long enough that no sequence finishes inside N tokens. Prints both
figures and the ratio (target: at most 1.3x), plus the grammar's first compile and a cached lookup.

    python -m bench.structured                     # CPU, 2 threads, checkpoint in ./checkpoints/maverick-bench-202k
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 32, "maxItems": 32, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 16},
                       "score": {"type": "integer", "minimum": 0, "maximum": 1000},
                       "tag": {"enum": ["alpha", "beta", "gamma"]},
                       "ok": {"type": "boolean"}},
        "required": ["name", "score", "tag", "ok"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False,
}
BPE_SIZE = 200_000


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("checkpoints") / "maverick-bench-202k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args(argv)


def synthetic_vocab(n: int, seed: int = 0) -> dict[str, int]:
    """n byte-level BPE token strings: the 256 byte symbols, then word-like pieces (deterministic)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_sym = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 6, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9, 1.5, 1, .8, .2, .2, .1, .1]
    punct = list(".,:;!?\"'(){}[]<>-_/\\|@#$%^&*+=~`")
    foreign = [chr(c) for c in list(range(0x430, 0x450)) + list(range(0x4E00, 0x4E00 + 3000)) + list(range(0xE0, 0xFF))]
    vocab = {s: i for i, s in enumerate(alphabet)}

    def sym(text: str) -> str:
        return "".join(byte_sym[b] for b in text.encode("utf-8"))

    while len(vocab) < n:
        r = rng.random()
        if r < 0.55:
            w = "".join(rng.choices(letters, weights, k=rng.randint(2, 10)))
            w = w.capitalize() if rng.random() < 0.15 else w
            piece = (" " if rng.random() < 0.6 else "") + w
        elif r < 0.62:
            piece = (" " if rng.random() < 0.3 else "") + str(rng.randint(0, 999))
        elif r < 0.75:
            piece = "".join(rng.choices(punct, k=rng.randint(1, 3))) + (" " if rng.random() < 0.2 else "")
            piece = ("\n" + " " * rng.randint(0, 8)) if rng.random() < 0.05 else piece
        else:
            piece = (" " if rng.random() < 0.4 else "") + "".join(rng.choices(foreign, k=rng.randint(1, 2)))
        s = sym(piece)
        if s not in vocab:
            vocab[s] = len(vocab)
    return vocab


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable symbol table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def ensure_checkpoint(path: Path) -> Path:
    """maverick-bench with 202,048 vocabulary rows and a synthetic 200,000-token byte-level BPE tokenizer."""
    if (path / "model.safetensors.index.json").exists() and (path / ".synthetic-vocab").exists():
        return path
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from llama4.checkpoint import create_checkpoint
    from llama4.presets import get_preset
    from llama4.tokenizer import special_tokens

    preset = dataclasses.replace(get_preset("maverick-bench"), name="maverick-bench-202k", bpe_vocab_size=BPE_SIZE)
    create_checkpoint(preset, path, seed=0, overwrite=True)
    tok = Tokenizer(models.BPE(vocab=synthetic_vocab(BPE_SIZE), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens()])
    assert tok.get_vocab_size() == BPE_SIZE + len(special_tokens())
    tok.save(str(path / "tokenizer.json"))
    (path / ".synthetic-vocab").write_text("tokenizer.json: synthetic 200,000-token byte-level vocabulary\n")
    return path


def decode_seconds_per_token(engine, prompts, new_tokens: int, structured, repeats: int) -> tuple[float, int]:
    from serving.engine import SamplingParams

    def run(n: int) -> tuple[float, int]:
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True,
                                 structured_outputs=structured) for i in range(len(prompts))]
        t = time.perf_counter()
        outs = engine.generate(prompts, params)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    run(2)  # warm-up (and the grammar's compile, cached afterwards)
    full = min(run(new_tokens) for _ in range(repeats))
    one = min(run(1) for _ in range(repeats))
    if full[1] != len(prompts) * new_tokens:
        raise RuntimeError(f"sequences ended early ({full[1]} tokens): the schema must outlast --new-tokens")
    return (full[0] - one[0]) / (full[1] - one[1]), full[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from serving.engine import LLMEngine
    from serving.engine.params import StructuredOutputsParams

    path = ensure_checkpoint(args.checkpoint)
    engine = LLMEngine.from_pretrained(path, dtype="float32", max_num_seqs=args.batch,
                                       max_model_len=args.prompt_len + args.new_tokens + 8)
    print(f"vocabulary: {engine.config.vocab_size} rows, tokenizer {len(engine.tokenizer)} tokens; "
          f"{args.batch} sequences, {args.new_tokens} new tokens, {args.threads} threads")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, BPE_SIZE, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    spec = StructuredOutputsParams(json=SCHEMA)
    t = time.perf_counter()
    engine.grammars.compile(spec)
    first = time.perf_counter() - t
    t = time.perf_counter()
    engine.grammars.compile(spec)
    cached = time.perf_counter() - t
    print(f"grammar: first compile {first * 1e3:.0f} ms, cached lookup {cached * 1e6:.0f} us")
    free, _ = decode_seconds_per_token(engine, prompts, args.new_tokens, None, args.repeats)
    constrained, n = decode_seconds_per_token(engine, prompts, args.new_tokens, spec, args.repeats)
    out = engine.generate(prompts[:1], [engine_params(spec)])[0].outputs[0].text
    print(f"free decode:        {free * 1e3:.2f} ms/token ({1 / free:.1f} tokens/s over the batch)")
    print(f"JSON-schema decode: {constrained * 1e3:.2f} ms/token ({1 / constrained:.1f} tokens/s over the batch)")
    print(f"ratio constrained/free: {constrained / free:.2f}x (target <= 1.3x)")
    print(f"sample (first {min(len(out), 120)} chars): {json.dumps(out[:120])}")
    engine.shutdown()


def engine_params(spec):
    from serving.engine import SamplingParams

    return SamplingParams(temperature=1.0, seed=0, max_tokens=24, structured_outputs=spec)


if __name__ == "__main__":
    main()
