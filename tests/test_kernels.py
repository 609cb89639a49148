"""The stream loader's compiled kernels: the window shuffle and the uniform draws, checked against
a plain-Python Fisher–Yates and against the distributions they must have."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from recscale.loader.kernels import shuffle_pairs, swap_positions, uniform_draws

# chi-square critical values at p = 0.001, so a correct kernel fails about once in 1,000 seeds
# (the seeds are fixed, so a passing test keeps passing)
CHI2_999 = {6: 22.46, 23: 49.73, 99: 148.23}


def chi2(counts: np.ndarray, expected: float) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def reference_shuffle(values: list[int], positions: np.ndarray) -> list[int]:
    """Fisher–Yates as textbooks write it: row n-1-s swaps with positions[s]."""
    out = list(values)
    n = len(out)
    for s, k in enumerate(positions.tolist()):
        i = n - 1 - s
        out[i], out[k] = out[k], out[i]
    return out


def test_positions_are_in_range_and_a_pure_function_of_the_seed() -> None:
    n = 10_000
    a = swap_positions(7, np.empty(n - 1, np.uint32))
    b = swap_positions(7, np.empty(n - 1, np.uint32))
    c = swap_positions(8, np.empty(n - 1, np.uint32))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    bounds = n - np.arange(n - 1)  # entry s is uniform on 0 .. n - 1 - s
    assert (a.astype(np.int64) < bounds).all()
    # the last partner (for row 1) is 0 or 1; the first ranges over all rows
    assert set(a[-1:].tolist()) <= {0, 1}


@pytest.mark.parametrize("out_dtype", [np.int32, np.int64])
def test_shuffle_is_fisher_yates_over_the_pairs(out_dtype: type) -> None:
    rng = np.random.default_rng(0)
    n = 5_000
    users = rng.integers(0, 2**31 - 1, n, dtype=np.int32)
    items = rng.integers(0, 2**31 - 1, n, dtype=np.int32)
    positions = swap_positions(3, np.empty(n - 1, np.uint32))
    out_users, out_items = np.empty(n, out_dtype), np.empty(n, out_dtype)
    shuffle_pairs(users, items, positions, out_users, out_items, np.empty(n, np.uint64))
    order = reference_shuffle(list(range(n)), positions)
    assert out_users.tolist() == users[order].tolist()
    assert out_items.tolist() == items[order].tolist()


def test_shuffle_reads_arrow_buffers_in_place() -> None:
    column = pa.array(np.arange(1_000, dtype=np.int32)).to_numpy(zero_copy_only=True)
    assert not column.flags.writeable
    positions = swap_positions(1, np.empty(999, np.uint32))
    out = np.empty(1_000, np.int32), np.empty(1_000, np.int32)
    shuffle_pairs(column, column, positions, *out, np.empty(1_000, np.uint64))
    assert np.array_equal(out[0], out[1])
    assert sorted(out[0].tolist()) == list(range(1_000))
    assert out[0].tolist() != list(range(1_000))


def test_every_order_of_four_rows_is_equally_likely() -> None:
    rows = np.arange(4, dtype=np.int32)
    positions, scratch = np.empty(3, np.uint32), np.empty(4, np.uint64)
    counts: Counter[tuple[int, ...]] = Counter()
    seeds = 24_000
    for seed in range(seeds):
        out = np.empty(4, np.int32)
        shuffle_pairs(rows, rows, swap_positions(seed, positions), out, out.copy(), scratch)
        counts[tuple(out.tolist())] += 1
    assert set(counts) == set(itertools.permutations(range(4)))
    observed = np.array([counts[p] for p in itertools.permutations(range(4))])
    assert chi2(observed, seeds / 24) < CHI2_999[23]


def test_a_row_lands_anywhere_in_a_long_window_equally_often() -> None:
    # where row 0 of a 100-row window ends up, over 50,000 shuffles
    n, seeds = 100, 50_000
    rows = np.arange(n, dtype=np.int32)
    positions, scratch = np.empty(n - 1, np.uint32), np.empty(n, np.uint64)
    landed = np.zeros(n, np.int64)
    out, out2 = np.empty(n, np.int32), np.empty(n, np.int32)
    for seed in range(seeds):
        shuffle_pairs(rows, rows, swap_positions(seed, positions), out, out2, scratch)
        landed[int(np.flatnonzero(out == 0)[0])] += 1
    assert chi2(landed, seeds / n) < CHI2_999[99]


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("n, per_row", [(1, 1), (999, 1), (1_000, 1), (999, 2), (1_000, 3)])
def test_negatives_drawn_with_the_shuffle_are_uniform_draws(
    dtype: type, n: int, per_row: int
) -> None:
    rows = np.arange(n, dtype=np.int32)
    positions = swap_positions(2, np.empty(n - 1, np.uint32))
    out_users, out_items, scratch = np.empty(n, dtype), np.empty(n, dtype), np.empty(n, np.uint64)
    shuffle_pairs(rows, rows, positions, out_users, out_items, scratch)
    alone = out_users.copy()
    # bounds where a quarter of the values is rejected and redrawn: redraws come in one order
    high = 3 * 2**29 if dtype == np.int32 else 3 * 2**30
    negatives = np.empty((n, per_row), dtype)
    shuffle_pairs(rows, rows, positions, out_users, out_items, scratch, (9, high, negatives))
    assert np.array_equal(out_users, alone) and np.array_equal(out_items, alone)
    assert np.array_equal(negatives, uniform_draws(9, high, np.empty((n, per_row), dtype)))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 1_000, 1_001])
def test_partners_drawn_while_packing_are_swap_positions(n: int) -> None:
    rows = np.arange(n, dtype=np.int32)
    drawn = np.empty(max(n - 1, 0), np.uint32)
    out = np.empty(n, np.int64), np.empty(n, np.int64)
    shuffle_pairs(rows, rows, drawn, *out, np.empty(n, np.uint64), order_seed=4)
    positions = swap_positions(4, np.empty(max(n - 1, 0), np.uint32))
    assert np.array_equal(drawn, positions)
    assert out[0].tolist() == reference_shuffle(list(range(n)), positions)
    with pytest.raises(TypeError, match="positions must be uint32"):
        shuffle_pairs(
            rows, rows, drawn.astype(np.int64), *out, np.empty(n, np.uint64), order_seed=4
        )


def splitmix_words(seed: int, count: int) -> np.ndarray:
    """Words 0 .. count - 1 of ``seed``'s stream, computed with NumPy (wrapping uint64)."""
    z = np.uint64(seed) + (np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def rejected(values: np.ndarray, bounds: np.ndarray) -> int:
    """How many 32-bit ``values`` Lemire's method rejects for their ``bounds``."""
    values, bounds = values.astype(np.uint64), bounds.astype(np.uint64)
    low = (values * bounds) & np.uint64(0xFFFFFFFF)
    return int((low < (np.uint64(2**32) - bounds) % bounds).sum())


def test_partners_of_a_million_rows_with_redraws_are_swap_positions() -> None:
    # a window this long has partners that are redrawn (counted independently below), in
    # blocks of draws that are otherwise vectorised: the redraws still come in order
    n, seed = 1_000_003, 4
    words = splitmix_words(seed, (n - 1) // 2 + 1)
    halves = np.stack([words & np.uint64(0xFFFFFFFF), words >> np.uint64(32)], 1).ravel()
    assert rejected(halves[: n - 1], n - np.arange(n - 1)) > 10
    rows = np.arange(n, dtype=np.int32)
    drawn = np.empty(n - 1, np.uint32)
    out = np.empty(n, np.int64), np.empty(n, np.int64)
    shuffle_pairs(rows, rows[::-1].copy(), drawn, *out, np.empty(n, np.uint64), order_seed=seed)
    positions = swap_positions(seed, np.empty(n - 1, np.uint32))
    assert np.array_equal(drawn, positions)
    order = np.arange(n)
    for s, k in enumerate(positions.tolist()):  # the textbook shuffle, on indices
        i = n - 1 - s
        order[i], order[k] = order[k], order[i]
    assert np.array_equal(out[0], order) and np.array_equal(out[1], n - 1 - order)


@pytest.mark.parametrize(
    "n, per_row, high",
    [
        (5_000, 1, 3 * 2**29),  # every block redraws some, and the last block is partial
        (5_001, 3, 3 * 2**29),
        (1_000_000, 1, 200_000),  # a few blocks redraw, most do not
    ],
)
def test_long_runs_of_negatives_are_uniform_draws(n: int, per_row: int, high: int) -> None:
    words = splitmix_words(9, n * per_row // 2 + 1)
    halves = np.stack([words & np.uint64(0xFFFFFFFF), words >> np.uint64(32)], 1).ravel()
    assert rejected(halves[: n * per_row], np.full(n * per_row, high)) > 0
    rows = np.arange(n, dtype=np.int32)
    positions = swap_positions(2, np.empty(n - 1, np.uint32))
    out = np.empty(n, np.int64), np.empty(n, np.int64)
    negatives = np.empty((n, per_row), np.int64)
    shuffle_pairs(rows, rows, positions, *out, np.empty(n, np.uint64), (9, high, negatives))
    assert np.array_equal(negatives, uniform_draws(9, high, np.empty((n, per_row), np.int64)))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_uniform_draws_cover_the_range_evenly(dtype: type) -> None:
    out = uniform_draws(5, 7, np.empty((70_000, 2), dtype))
    assert out.dtype == dtype and out.min() == 0 and out.max() == 6
    counts = np.bincount(out.ravel(), minlength=7)
    assert chi2(counts, out.size / 7) < CHI2_999[6]
    again = uniform_draws(5, 7, np.empty((70_000, 2), dtype))
    assert np.array_equal(out, again)


def test_uniform_draws_near_the_32_bit_limit() -> None:
    # three quarters of 2**32: the bound where Lemire's rejection matters most
    high = 3 * 2**30
    out = uniform_draws(1, high, np.empty(200_000, np.int64))
    assert out.min() >= 0 and out.max() < high
    # each quarter of the range holds a third of the draws
    thirds = np.bincount(out // 2**30, minlength=3)
    assert chi2(thirds, len(out) / 3) < 13.8  # 2 degrees of freedom, p = 0.001


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="uint32"):
        swap_positions(0, np.empty(3, np.int64))
    with pytest.raises(ValueError, match="high must be in 1"):
        uniform_draws(0, 0, np.empty(3, np.int64))
    with pytest.raises(ValueError, match="high must be in 1"):
        uniform_draws(0, 2**31 + 1, np.empty(3, np.int32))
    rows = np.arange(4, dtype=np.int32)
    with pytest.raises(ValueError, match="4 users, 4 items and 2 positions"):
        shuffle_pairs(
            rows, rows, np.zeros(2, np.uint32), rows.copy(), rows.copy(), np.empty(4, np.uint64)
        )
    with pytest.raises(ValueError, match="high must be in 1"):
        shuffle_pairs(*args4(rows), (0, 0, np.empty((4, 1), np.int64)))
    with pytest.raises(ValueError, match=r"4 contiguous rows, got \(3, 1\)"):
        shuffle_pairs(*args4(rows), (0, 5, np.empty((3, 1), np.int64)))
    with pytest.raises(ValueError, match="outputs of 3 and 4"):
        shuffle_pairs(
            rows, rows, np.zeros(3, np.uint32), rows[:3].copy(), rows.copy(), np.empty(4, np.uint64)
        )


def args4(rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """shuffle_pairs's arguments for the 4 rows ``rows``."""
    positions = swap_positions(0, np.empty(3, np.uint32))
    return rows, rows, positions, rows.copy(), rows.copy(), np.empty(4, np.uint64)
