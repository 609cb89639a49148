"""Vectorised negative sampling: uniform or popularity-shaped draws, known positives rejected.

A user's positives are held as sorted ``user * n_items + item`` keys (8 bytes per training pair,
:class:`Positives`) and a batch's rejection test is a binary search run for all its draws at once.
Popularity-shaped draws invert a cumulative distribution with one ``searchsorted``.
"""

from __future__ import annotations

import numpy as np

from recscale.errors import ConfigError

__all__ = [
    "MAX_REJECTION_ROUNDS",
    "NEGATIVE_SAMPLERS",
    "Positives",
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


class Positives:
    """Each user's known items as sorted ``user * n_items + item`` keys, 8 bytes per pair.

    Membership is a binary search inside the user's own slice of the keys, run for all queries
    at once: ``ceil(log2(largest degree + 1))`` vectorised steps whose memory reads overlap,
    where one ``searchsorted`` call per query over all the keys waits on each read in turn.
    """

    def __init__(self, keys: np.ndarray, n_items: int) -> None:
        self.keys = np.asarray(keys, dtype=np.int64)
        self.n_items = int(n_items)
        n_users = int(self.keys[-1]) // self.n_items + 1 if len(self.keys) else 0
        # the user's keys are keys[start[u] : start[u + 1]]
        self.start = np.searchsorted(
            self.keys, np.arange(n_users + 1, dtype=np.int64) * self.n_items
        )
        degree = int(np.diff(self.start).max()) if n_users else 0
        self.steps = int(np.ceil(np.log2(degree + 1)))

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether each (user, item) pair (broadcast together) is a known positive."""
        users, items = np.broadcast_arrays(np.asarray(users), np.asarray(items))
        shape = users.shape
        users = users.astype(np.int64).ravel()
        query = users * self.n_items + items.astype(np.int64).ravel()
        known = (users >= 0) & (users < len(self.start) - 1)
        u = np.where(known, users, 0)
        lo = np.where(known, self.start[np.minimum(u, len(self.start) - 1)], 0)
        hi = np.where(known, self.start[np.minimum(u + 1, len(self.start) - 1)], 0)
        last = max(len(self.keys) - 1, 0)
        for _ in range(self.steps):
            mid = (lo + hi) >> 1
            less = self.keys[np.minimum(mid, last)] < query
            lo = np.where(less, mid + 1, lo)
            hi = np.where(less, hi, mid)
        if not len(self.keys):
            return np.zeros(shape, dtype=bool)
        # past the user's slice lies another user's key, which never equals the query
        return (known & (self.keys[np.minimum(lo, last)] == query)).reshape(shape)


def positive_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> Positives:
    """The known (user, item) pairs, ready for :func:`is_positive` and :func:`sample_negatives`."""
    return Positives(np.unique(users.astype(np.int64) * n_items + items.astype(np.int64)), n_items)


def is_positive(users: np.ndarray, items: np.ndarray, positives: Positives) -> np.ndarray:
    """Whether each (user, item) pair (broadcast together) is among ``positives``."""
    return positives.contains(users, items)


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
    size: int | tuple[int, ...],
    n_items: int,
    rng: np.random.Generator,
    cdf: np.ndarray | None,
    dtype: type[np.integer] = np.int64,
) -> np.ndarray:
    if cdf is None:
        return rng.integers(0, n_items, size=size, dtype=dtype)
    return np.searchsorted(cdf, rng.random(size), side="right").astype(dtype)


def sample_negatives(
    users: np.ndarray,
    n_negatives: int,
    n_items: int,
    rng: np.random.Generator,
    positives: Positives | None = None,
    cdf: np.ndarray | None = None,
    dtype: type[np.integer] = np.int64,
) -> np.ndarray:
    """Negative items, ``(len(users), n_negatives)`` of ``dtype``: uniform, or from ``cdf``.

    With ``positives`` (see :func:`positive_keys`) the draws that hit one of the user's positives are
    redrawn, only those, for at most ``MAX_REJECTION_ROUNDS`` rounds. ``cdf`` (see
    :func:`popularity_cdf`) shapes the draws by popularity; without it they are uniform.
    """
    neg = _draw((len(users), n_negatives), n_items, rng, cdf, dtype)
    if positives is None:
        return neg
    rows, cols = np.nonzero(positives.contains(users[:, None], neg))
    for _ in range(MAX_REJECTION_ROUNDS):
        if len(rows) == 0:
            break
        neg[rows, cols] = _draw(len(rows), n_items, rng, cdf, dtype)
        still = positives.contains(users[rows], neg[rows, cols])
        rows, cols = rows[still], cols[still]
    return neg
