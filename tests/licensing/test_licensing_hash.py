"""Keyed hashing: exactly SipHash-2-4 (reference vectors), the vectorised path equals the scalar one, key rules."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from herd.errors import UserError
from licensing.keyed_hash import hash_ids, hash_one, key_id, load_key, siphash24

REF_KEY = bytes(range(16))


def test_siphash_matches_the_reference_vectors():
    # From the SipHash paper (Aumasson & Bernstein), appendix A, and the reference implementation's vectors.h.
    assert siphash24(REF_KEY, bytes(range(15))) == 0xA129CA6149BE45E5
    assert siphash24(REF_KEY, b"") == 0x726FDB47DD0E0E31


def test_vectorised_equals_scalar_for_every_length_and_mixed_batches():
    rng = np.random.default_rng(3)
    msgs = [bytes(range(n)) for n in range(70)] + [rng.bytes(int(n)) for n in rng.integers(0, 300, 300)]
    got = hash_ids(REF_KEY, pa.array(msgs, pa.binary()))
    assert [int(x) for x in got] == [siphash24(REF_KEY, m) for m in msgs]
    # Sliced arrays (non-zero offset) and large_string inputs give the same hashes.
    sliced = pa.array(msgs, pa.large_binary()).slice(5, 50)
    assert [int(x) for x in hash_ids(REF_KEY, sliced)] == [siphash24(REF_KEY, m) for m in msgs[5:55]]


def test_text_and_integer_ids_hash_like_the_live_path():
    key = load_key()
    ids = ["alice@example.com", "ünïcödé-user", "42", ""]
    assert [int(x) for x in hash_ids(key, pa.array(ids))] == [hash_one(key, s) for s in ids]
    assert int(hash_ids(key, pa.array([42], pa.int64()))[0]) == hash_one(key, "42")
    assert int(hash_ids(key, pa.array(["bob"]).dictionary_encode())[0]) == hash_one(key, "bob")


def test_key_changes_every_hash_and_key_id_does_not_reveal_the_key():
    a, b = load_key("00" * 16), load_key("11" * 16)
    ids = pa.array([f"user-{i}" for i in range(1000)])
    assert not np.any(hash_ids(a, ids) == hash_ids(b, ids))
    assert key_id(a) != key_id(b) and "00" * 16 not in key_id(a)


def test_missing_or_weak_key_is_refused(monkeypatch):
    monkeypatch.delenv("HERD_LICENSING_KEY")
    with pytest.raises(UserError, match="HERD_LICENSING_KEY"):
        load_key()
    with pytest.raises(UserError, match="16\\+ characters"):
        load_key("short")
    # A passphrase of 16+ characters is stretched to 128 bits; 32 hex digits are the key itself.
    assert len(load_key("a long enough passphrase")) == 16
    assert load_key("0f" * 16) == bytes([15] * 16)


def test_null_user_ids_are_refused():
    with pytest.raises(UserError, match="no user ID"):
        hash_ids(REF_KEY, pa.array(["a", None]))
