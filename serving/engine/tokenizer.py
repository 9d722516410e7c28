"""Loading a checkpoint's tokenizer, with an error that names the missing files instead of transformers' guess.

Without `tokenizer.json` transformers falls back to converting a slow tokenizer and says "You need to have
sentencepiece or tiktoken installed", which hides the cause. herd checks the files first. vLLM's
`skip_tokenizer_init` (engine built without a tokenizer: token ids in, token ids out) is the other way out.
"""
from __future__ import annotations

from pathlib import Path

# What a Llama 4 checkpoint's tokenizer needs (the released checkpoints ship both).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class TokenizerFilesError(ValueError):
    """The checkpoint folder lacks the tokenizer files."""


def load_tokenizer(path: str | Path):
    """transformers' fast tokenizer from `path`, after checking its files are there."""
    path = Path(path)
    missing = [f for f in TOKENIZER_FILES if not (path / f).is_file()]
    if missing:
        raise TokenizerFilesError(
            f"{path}: the tokenizer files {', '.join(missing)} are missing; copy them from the released checkpoint "
            "(with special_tokens_map.json and the chat template), or build the engine with skip_tokenizer_init=True "
            "to serve token ids only")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
