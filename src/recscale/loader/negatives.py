"""Vectorised negative sampling: uniform or popularity-shaped draws, known positives rejected.

A user's positives are held as sorted ``user * n_items + item`` keys (8 bytes per training pair)
and tested by binary search, so a batch's rejection test is one ``searchsorted`` call whatever its
size. Popularity-shaped draws invert a cumulative distribution, also one ``searchsorted``.
"""

from __future__ import annotations

import numpy as np

from recscale.errors import ConfigError

__all__ = [
    "MAX_REJECTION_ROUNDS",
    "NEGATIVE_SAMPLERS",
    "is_positive",
    "popularity_cdf",
    "positive_keys",
    "sample_negatives",
]

# Resampling rounds before giving up on a collision: a user who has interacted with a fraction p of
# the catalogue keeps a positive after r rounds with probability p**r, so only users who have seen
# nearly every item can be left with one, and looping on them forever would hang training.
MAX_REJECTION_ROUNDS = 50

NEGATIVE_SAMPLERS = ("uniform", "popularity")


def positive_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted unique ``user * n_items + item`` keys: membership tests by binary search."""
    return np.unique(users.astype(np.int64) * n_items + items.astype(np.int64))


def is_positive(users: np.ndarray, items: np.ndarray, keys: np.ndarray, n_items: int) -> np.ndarray:
    """Whether each (user, item) pair (broadcast together) is among ``keys``."""
    query = users.astype(np.int64) * n_items + items.astype(np.int64)
    if len(keys) == 0:
        return np.zeros(query.shape, dtype=bool)
    at = np.searchsorted(keys, query)
    return keys[np.minimum(at, len(keys) - 1)] == query


def popularity_cdf(item_counts: np.ndarray, exponent: float = 0.75) -> np.ndarray:
    """Cumulative distribution of drawing item ``i`` with probability ∝ ``count_i ** exponent``.

    0.75 is word2vec's smoothing: popular items are drawn more often than uniformly, but less
    than in proportion to their counts, so the long tail still shows up as negatives.
    """
    weights = np.asarray(item_counts, dtype=np.float64) ** exponent
    total = weights.sum()
    if not np.isfinite(total) or total <= 0:
        raise ConfigError(
            "negatives: popularity sampling needs at least one item with a positive count"
        )
    cdf = np.cumsum(weights / total)
    cdf[-1] = 1.0  # rounding must not leave a gap above the last item
    return cdf


def _draw(
    size: int | tuple[int, ...], n_items: int, rng: np.random.Generator, cdf: np.ndarray | None
) -> np.ndarray:
    if cdf is None:
        return rng.integers(0, n_items, size=size, dtype=np.int64)
    return np.searchsorted(cdf, rng.random(size), side="right").astype(np.int64)


def sample_negatives(
    users: np.ndarray,
    n_negatives: int,
    n_items: int,
    rng: np.random.Generator,
    keys: np.ndarray | None = None,
    cdf: np.ndarray | None = None,
) -> np.ndarray:
    """Negative items, ``(len(users), n_negatives)`` int64: uniform, or from ``cdf``.

    With ``keys`` (see :func:`positive_keys`) the draws that hit one of the user's positives are
    redrawn, only those, for at most ``MAX_REJECTION_ROUNDS`` rounds. ``cdf`` (see
    :func:`popularity_cdf`) shapes the draws by popularity; without it they are uniform.
    """
    neg = _draw((len(users), n_negatives), n_items, rng, cdf)
    if keys is None:
        return neg
    rows, cols = np.nonzero(is_positive(users[:, None], neg, keys, n_items))
    for _ in range(MAX_REJECTION_ROUNDS):
        if len(rows) == 0:
            break
        neg[rows, cols] = _draw(len(rows), n_items, rng, cdf)
        still = is_positive(users[rows], neg[rows, cols], keys, n_items)
        rows, cols = rows[still], cols[still]
    return neg
