"""Tokenisation with the checkpoint's chat template, assistant-only labels, worker shares, packing, batch order."""
from __future__ import annotations

import pytest

from finetune.data import IGNORE, BatchOrder, Example, collate, load_tokenizer, pack, to_messages, \
    tokenize_messages, worker_share


@pytest.fixture(scope="module")
def tok(maverick_tiny):
    return load_tokenizer(str(maverick_tiny))


def _labelled_text(tok, ids, labels) -> list[str]:
    """The decoded runs of labelled tokens, in order."""
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l == IGNORE:
            if cur:
                runs.append(tok.decode(cur))
                cur = []
        else:
            assert l == i
            cur.append(i)
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_only_assistant_replies_and_their_end_token_carry_loss(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who built the tower?"}, {"role": "assistant", "content": "Mira."},
            {"role": "user", "content": "And the bridge?"}, {"role": "assistant", "content": "Her son."}]
    ids, labels = tokenize_messages(tok, msgs, max_len=512)
    assert ids == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert _labelled_text(tok, ids, labels) == ["Mira.<|eot|>", "Her son.<|eot|>"]


def test_prompt_completion_rows_become_a_user_assistant_turn(tok):
    msgs = to_messages({"prompt": "2+2?", "completion": "4"})
    assert msgs == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, labels = tokenize_messages(tok, msgs, 512)
    assert _labelled_text(tok, ids, labels) == ["4<|eot|>"]


def test_rows_without_something_to_learn_are_refused():
    with pytest.raises(ValueError, match="neither 'messages' nor 'prompt'/'completion'"):
        to_messages({"text": "hello"})
    with pytest.raises(ValueError, match="no assistant message"):
        to_messages({"messages": [{"role": "user", "content": "hi"}]})


def test_long_conversations_are_cut_to_the_sequence_length(tok):
    msgs = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    ids, labels = tokenize_messages(tok, msgs, 32)
    assert len(ids) == len(labels) == 32


def _rows(n):
    return [{"key": f"{i:04x}", "input_ids": [i, i + 1], "labels": [IGNORE, i + 1]} for i in range(n)]


def test_worker_shares_are_disjoint_equal_and_independent_of_read_order():
    rows = _rows(9)
    shares = [worker_share(rows, r, 2) for r in range(2)]
    again = [worker_share(list(reversed(rows)), r, 2) for r in range(2)]
    assert [[e.input_ids for e in s] for s in shares] == [[e.input_ids for e in s] for s in again]
    assert len(shares[0]) == len(shares[1]) == 4  # the odd one out is dropped so ranks step together
    assert not {tuple(e.input_ids) for e in shares[0]} & {tuple(e.input_ids) for e in shares[1]}
    with pytest.raises(ValueError, match="fewer than the 4 workers"):
        worker_share(_rows(3), 0, 4)


def test_packing_fills_sequences_without_splitting_examples():
    exs = [Example([1] * 5, [1] * 5), Example([2] * 4, [IGNORE] * 4), Example([3] * 6, [3] * 6)]
    packed = pack(exs, seq_len=10, eos_id=0)
    assert [p.input_ids for p in packed] == [[1] * 5 + [2] * 4, [3] * 6]
    assert packed[0].labels == [1] * 5 + [IGNORE] * 4


def test_batch_order_is_a_seeded_permutation_per_epoch_and_resumable():
    exs = [Example([i], [i]) for i in range(6)]
    order = BatchOrder(exs, batch_size=2, seed=7)
    epoch0 = [e.input_ids[0] for s in range(3) for e in order.batch(s)]
    epoch1 = [e.input_ids[0] for s in range(3, 6) for e in order.batch(s)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(6)) and epoch0 != epoch1
    # A fresh object (a restarted worker) gives the same batch for the same step.
    assert [e.input_ids for e in BatchOrder(exs, 2, 7).batch(4)] == [e.input_ids for e in order.batch(4)]


def test_collate_pads_right_and_masks_padding():
    b = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]

