"""Llama 4 tokenizer files for small checkpoints: a byte-level BPE trained on text shipped with herd, plus
every Llama 4 special token in a block of 2048 ids after the BPE ids (as the real 202048-token vocabulary has).

Nothing in herd hard-codes a special-token id: code reads them from the tokenizer or config. The chat template
is the one transformers ships for Llama 4, so prompts render exactly as for the released models.
"""
from __future__ import annotations

import json
from pathlib import Path

from llama4.presets import SPECIAL_SLOTS

CORPUS = Path(__file__).parent / "data" / "corpus.txt"

# Llama 4's pre-tokenizer split (o200k-style): letters with case runs and contractions, 1-3 digit groups,
# punctuation runs, newlines and spaces.
PRETOKENIZE_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BOS, EOS_TEXT, EOM, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eom|>", "<|eot|>", "<|finetune_right_pad|>"
IMAGE, IMAGE_START, IMAGE_END, PATCH = "<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>"
TILE_X, TILE_Y = "<|tile_x_separator|>", "<|tile_y_separator|>"


def special_tokens() -> list[str]:
    """All 2048 special tokens in id order (offsets from the first special id), named as in Llama 4."""
    named: dict[int, str] = {
        0: BOS, 1: EOS_TEXT, 2: "<|fim_prefix|>", 3: "<|fim_middle|>", 4: "<|fim_suffix|>",
        5: "<|header_start|>", 6: "<|header_end|>", 7: EOM, 8: EOT, 9: "<|step|>",
        16: "<|python_start|>", 17: "<|python_end|>", 18: PAD,
        80: IMAGE_START, 81: IMAGE_END, 84: TILE_X, 85: TILE_Y,
        90: IMAGE, 92: PATCH,  # as released: <|image|> 200090, <|patch|> 200092 (config image_token_index)
        1990: "<|reasoning_thinking_start|>", 1991: "<|reasoning_thinking_end|>",
    }
    out, text_i, vision_i, reason_i = [], 0, 0, 0
    for off in range(SPECIAL_SLOTS):
        if off in named:
            out.append(named[off])
        elif off < 80:
            out.append(f"<|text_post_train_reserved_special_token_{text_i}|>")
            text_i += 1
        elif off < 1200:
            out.append(f"<|vision_reserved_special_token_{vision_i}|>")
            vision_i += 1
        else:
            out.append(f"<|reasoning_reserved_special_token_{reason_i}|>")
            reason_i += 1
    return out


def llama4_chat_template() -> str:
    """The Llama 4 chat template, as transformers ships it for the released models."""
    from transformers.models.llama4 import processing_llama4

    return processing_llama4.chat_template


def train_tokenizer(bpe_vocab_size: int):
    """Train the byte-level BPE on the shipped corpus and append the special-token block (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    text = CORPUS.read_text(encoding="utf-8")
    tok.train_from_iterator([line for line in text.splitlines(keepends=True)], trainer=trainer)
    n_bpe = tok.get_vocab_size()
    if n_bpe > bpe_vocab_size:
        raise RuntimeError(f"BPE produced {n_bpe} tokens, more than the {bpe_vocab_size} asked for")
    # Pad the BPE block to its nominal size with unreachable placeholder tokens so that special ids start at a
    # fixed offset (like the real tokenizer's 200000), whatever the corpus yields.
    if n_bpe < bpe_vocab_size:
        tok.add_tokens([f"<|bpe_unused_{i}|>" for i in range(bpe_vocab_size - n_bpe)])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens()])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
        ),
    ])
    return tok


def write_tokenizer_files(tok, out_dir: Path, model_max_length: int) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the key special ids."""
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {name: tok.token_to_id(name)
           for name in (BOS, EOS_TEXT, EOM, EOT, PAD, IMAGE, IMAGE_START, IMAGE_END, PATCH, TILE_X, TILE_Y)}
    added = {}
    for t in special_tokens():
        added[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
    config = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "chat_template": llama4_chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "padding_side": "left",
        "processor_class": "Llama4Processor",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return ids
