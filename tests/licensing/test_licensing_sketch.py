"""HLL registers: accuracy against exact counts and against Apache DataSketches on the same data; merging."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from datasketches import hll_sketch, tgt_hll_type

from licensing.sketch import Estimate, SketchSet, estimate, rse


def _sketch(hashes: np.ndarray, lg_k: int = 14, key: tuple = ("p", "", 0)) -> SketchSet:
    s = SketchSet(lg_k, "k")
    n = len(hashes)
    zeros = np.zeros(n, dtype=np.int64)
    s.update(hashes, [key[0]], zeros, [key[1]], zeros, zeros + key[2])
    return s


@pytest.mark.parametrize("n", [1, 100, 5_000, 30_000, 300_000])
def test_estimates_agree_with_datasketches_and_the_exact_count(n):
    rng = np.random.default_rng(n)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    ours = Estimate.of(_sketch(hashes).union(), z=3)
    ds = hll_sketch(14, tgt_hll_type.HLL_8)
    for h in hashes.tolist():
        ds.update(h)
    # Both within 3 standard errors of the truth, and of each other (two independent errors: sqrt(2) wider).
    assert ours.low <= n <= ours.high
    assert ds.get_lower_bound(3) <= n <= ds.get_upper_bound(3)
    assert abs(ours.value - ds.get_estimate()) <= 3 * math.sqrt(2) * rse(14) * n + 1


def test_error_over_many_sketches_is_the_stated_standard_error():
    rng = np.random.default_rng(5)
    n, errs = 50_000, []
    for _ in range(40):
        errs.append(estimate(_sketch(rng.integers(0, 2**64, n, dtype=np.uint64)).union()) / n - 1)
    observed = float(np.sqrt(np.mean(np.square(errs))))
    assert 0.5 * rse(14) < observed < 1.6 * rse(14)
    assert abs(np.mean(errs)) < 3 * rse(14) / math.sqrt(40)  # unbiased


def test_merge_in_any_order_gives_identical_registers_equal_to_one_pass():
    rng = np.random.default_rng(9)
    parts = [rng.integers(0, 2**64, 20_000, dtype=np.uint64) for _ in range(4)]
    parts[1][:5000] = parts[0][:5000]  # replicas see some of the same users
    whole = _sketch(np.concatenate(parts)).union()
    for order in itertools.permutations(range(4)):
        acc = SketchSet(14, "k")
        for i in order:
            acc.merge(_sketch(parts[i]))
        assert np.array_equal(acc.union(), whole)


def test_groups_are_kept_apart_and_serialise_losslessly():
    rng = np.random.default_rng(1)
    n = 100_000
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    pc, ac, day = rng.integers(0, 3, n), rng.integers(0, 2, n), rng.integers(20000, 20010, n)
    s = SketchSet(12, "k")
    s.update(h, ["a", "b", "c"], pc, ["", "x"], ac, day)
    assert len(s.groups) == 3 * 2 * 10
    mask = (pc == 1) & (ac == 0) & (day == 20003)
    assert np.array_equal(s.groups[("b", "", 20003)], _sketch(h[mask], 12).union())
    back = SketchSet.from_bytes(s.to_bytes())
    assert back.lg_k == 12 and back.key_id == "k"
    assert all(np.array_equal(back.groups[k], v) for k, v in s.groups.items()) and back.groups.keys() == s.groups.keys()


def test_sketches_from_different_keys_or_sizes_are_not_merged():
    a, b = SketchSet(14, "key-a"), SketchSet(14, "key-b")
    with pytest.raises(ValueError, match="different keys"):
        a.merge(b)
    with pytest.raises(ValueError, match="lg_k"):
        a.merge(SketchSet(12, "key-a"))


@pytest.mark.parametrize("n", [6e8, 7e8, 8e8])
def test_synthetic_registers_used_by_report_tests_look_like_real_ones(n, fake_registers):
    # The report tests fake 600M-800M users by sampling registers; check that sampler at a size we can hash too.
    rng = np.random.default_rng(2)
    real = estimate(_sketch(rng.integers(0, 2**64, 200_000, dtype=np.uint64)).union())
    fake = estimate(fake_registers(200_000, 14, rng))
    assert abs(real - fake) < 4 * rse(14) * 200_000
    assert abs(estimate(fake_registers(n, 14, rng)) / n - 1) < 3 * rse(14)
