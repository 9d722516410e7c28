"""Training data: rows read with Ray Data, rendered with the checkpoint's chat template, loss on assistant tokens.

Rows are OpenAI-style `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "completion"}`. Ray Data reads
them (JSONL or Parquet, local or s3:// through pyarrow's filesystem) and tokenises them in parallel tasks; each
tokenised example carries a key (a hash of its content) so every worker sees the same global order however
the read was split. The worker then keeps its share (`rank::world`), optionally packs, and walks it in a seeded
per-epoch order. That order plus (epoch, batch index) is the data position a checkpoint stores, so a resumed run
sees exactly the batches the lost one would have.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass

IGNORE = -100  # label value the loss skips (prompt, system and padding tokens)


# ---------------------------------------------------------------------------------------------------------
# One row -> token ids and labels
# ---------------------------------------------------------------------------------------------------------
def to_messages(row: dict) -> list[dict]:
    """The conversation of one row; raises ValueError naming what is wrong with it."""
    messages = row.get("messages")
    if messages is not None:
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    elif row.get("prompt") is not None and row.get("completion") is not None:
        msgs = [{"role": "user", "content": str(row["prompt"])},
                {"role": "assistant", "content": str(row["completion"])}]
    else:
        raise ValueError(f"row has neither 'messages' nor 'prompt'/'completion': keys {sorted(row)}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("row has no assistant message, so nothing to learn from it")
    return msgs


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenize_messages(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only assistant replies (and their <|eot|>).

    The chat template has no generation markers, so assistant spans are found by rendering the conversation up
    to each reply: the tokens between "prompt for reply i" and "conversation through reply i" are the reply.
    """
    def ids(msgs, gen):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(messages, False)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(ids(messages[:i], True)), len(ids(messages[: i + 1], False))
        labels[start:end] = full[start:end]
    return full[:max_len], labels[:max_len]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tokenize_batch(batch: dict, base_model: str, s3: dict, max_len: int, credentials=None) -> dict:
    """Ray Data `map_batches` function (numpy batch format): rows -> input_ids, labels, key.

    Runs on any node: it fetches the checkpoint's tokenizer files there (cached per node).
    """
    from finetune.schema import S3Settings
    from finetune.storage import fetch_dir

    if credentials:
        credentials.apply()
    tok = load_tokenizer(str(fetch_dir(base_model, S3Settings(**s3), names=TOKENIZER_FILES)))
    cols = list(batch)
    n = len(batch[cols[0]])
    out: dict[str, list] = {"input_ids": [], "labels": [], "key": []}
    for i in range(n):
        row = {c: _plain(batch[c][i]) for c in cols}
        msgs = to_messages(row)
        input_ids, labels = tokenize_messages(tok, msgs, max_len)
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        out["key"].append(hashlib.sha256(json.dumps(msgs, sort_keys=True).encode()).hexdigest())
    import numpy as np

    return {"input_ids": _ragged(out["input_ids"]), "labels": _ragged(out["labels"]), "key": np.array(out["key"])}


def _ragged(rows: list[list[int]]):
    """A 1-D object array of int64 arrays: Ray Data's numpy format for variable-length columns."""
    import numpy as np

    arr = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        arr[i] = np.asarray(r, dtype=np.int64)
    return arr


def _plain(v):
    """numpy/pyarrow values from a Ray Data batch -> plain Python (lists of dicts for `messages`)."""
    import numpy as np

    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v.item() if isinstance(v, np.generic) else v


# ---------------------------------------------------------------------------------------------------------
# The Ray Data pipeline (driver side)
# ---------------------------------------------------------------------------------------------------------
def read_rows(spec, s3):
    """Ray Data dataset of raw rows from the job's dataset spec."""
    import ray.data

    from finetune.storage import filesystem

    fs, path = filesystem(spec.path, s3)
    if spec.format == "parquet":
        return ray.data.read_parquet(path, filesystem=fs)
    return ray.data.read_json(path, filesystem=fs)  # pyarrow reads JSON Lines; `lines=True` refuses a filesystem


def tokenized_dataset(job):
    """Ray Data dataset of tokenised examples (input_ids, labels, key), tokenised in parallel tasks."""
    from finetune.storage import Credentials

    ds = read_rows(job.dataset, job.s3)
    return ds.map_batches(tokenize_batch, batch_format="numpy", batch_size=64, num_cpus=0.25,
                          fn_kwargs={"base_model": job.base_model, "s3": job.s3.model_dump(),
                                     "max_len": job.training.sequence_length,
                                     "credentials": Credentials.from_env()})


# ---------------------------------------------------------------------------------------------------------
# Worker side: share, packing, deterministic batches
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def worker_share(rows: list[dict], rank: int, world: int) -> list[Example]:
    """This rank's examples: the global order is by content key; every rank gets the same count."""
    # An example cut by sequence_length before its first assistant token has no labelled token: its loss would be
    # 0/0 (NaN) and poison the step. Every rank drops the same ones (same rows), so shares stay equal.
    labelled = [r for r in rows if any(int(x) != IGNORE for x in r["labels"])]
    if rows and not labelled:
        raise ValueError(f"all {len(rows)} examples were cut by training.sequence_length before their first "
                         "assistant token; raise training.sequence_length or shorten the prompts")
    rows = sorted(labelled, key=lambda r: (r["key"], list(r["input_ids"])))
    per_rank = len(rows) // world
    if per_rank == 0:
        raise ValueError(f"the dataset has {len(rows)} examples, fewer than the {world} workers; "
                         "add data or lower resources.workers")
    mine = rows[rank * per_rank: (rank + 1) * per_rank]
    return [Example([int(x) for x in r["input_ids"]], [int(x) for x in r["labels"]]) for r in mine]


def pack(examples: list[Example], seq_len: int, eos_id: int) -> list[Example]:
    """Concatenate consecutive examples into sequences of at most `seq_len` tokens.

    Packed examples attend to earlier ones in the same sequence (no per-document mask, as in most packing
    trainers without variable-length attention kernels); labels still cover assistant tokens only.
    """
    out, ids, labels = [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > seq_len:
            out.append(Example(ids, labels))
            ids, labels = [], []
        ids = ids + ex.input_ids
        labels = labels + ex.labels
    if ids:
        out.append(Example(ids[:seq_len], labels[:seq_len]))
    return out


class BatchOrder:
    """Batches of this rank's examples in a seeded order per epoch; position = (epoch, batch index)."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.batches_per_epoch = -(-len(examples) // batch_size)

    def batch(self, step: int) -> list[Example]:
        """The examples of global step `step` (0-based): epoch = step // batches_per_epoch."""
        epoch, index = divmod(step, self.batches_per_epoch)
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        chosen = order[index * self.batch_size: (index + 1) * self.batch_size]
        return [self.examples[i] for i in chosen]


def collate(batch: list[Example], pad_id: int):
    """Right-padded tensors input_ids, attention_mask, labels [B, T]."""
    import torch

    T = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
