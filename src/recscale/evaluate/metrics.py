"""Per-user ranking metrics from a hit matrix: pure functions, NumPy or PyTorch in, same kind out.

A *hit matrix* ``hits`` has one row per user and one column per rank position (column 0 is the
top recommendation); ``hits[u, i]`` is true when the item at position ``i + 1`` is one of the
user's relevant (held-out) items. ``n_relevant[u]`` is how many relevant items the user has.

Definitions follow the LightGCN evaluation protocol (kuandeng/LightGCN, and
gusye1234/LightGCN-PyTorch ``utils.py``: ``RecallPrecision_ATk``, ``NDCGatK_r``), binary relevance:

- recall@K    = hits in the top K / n_relevant
- precision@K = hits in the top K / K
- hr@K        = 1 if any hit in the top K else 0
- ndcg@K      = DCG@K / IDCG@K, DCG@K = Σ_{i=1..K} hit_i / log2(i + 1) and IDCG@K the DCG of
  min(n_relevant, K) hits at the top positions.

A user without relevant items gets 0 for recall and NDCG instead of a division by zero; evaluation
never asks for one (such users are not evaluated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import torch

__all__ = [
    "dcg_discounts",
    "hit_rate_at_k",
    "ndcg_at_k",
    "precision_at_k",
    "ranking_metrics",
    "recall_at_k",
    "reciprocal_rank",
]

Array = TypeVar("Array", np.ndarray, torch.Tensor)
F = TypeVar("F", bound=Callable[..., Any])


def _same_kind(fn: F) -> F:
    """Run a torch kernel on NumPy input too, returning NumPy float64 for NumPy input."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        numpy_in = any(isinstance(a, np.ndarray) for a in args)
        args = tuple(
            torch.from_numpy(np.asarray(a)) if isinstance(a, np.ndarray) else a for a in args
        )
        out = fn(*args, **kwargs)
        return out.numpy() if numpy_in else out

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    return cast(F, wrapper)


def _check(hits: torch.Tensor, k: int) -> torch.Tensor:
    if hits.ndim != 2:
        raise ValueError(f"hits must be a (users, positions) matrix, got shape {tuple(hits.shape)}")
    if not 1 <= k <= hits.shape[1]:
        raise ValueError(f"k must be between 1 and the {hits.shape[1]} ranked positions, got {k}")
    # float64 sums: averaging millions of users in float32 would lose digits
    return hits[:, :k].to(torch.float64)


def dcg_discounts(k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``1 / log2(i + 1)`` for positions ``i = 1..k`` (float64)."""
    return 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=device))


@_same_kind
def recall_at_k(hits: Array, n_relevant: Array, k: int) -> Array:
    """Hits in the top ``k`` over the user's number of relevant items (0 when it has none)."""
    top = _check(hits, k)
    n = n_relevant.to(torch.float64)
    return torch.where(n > 0, top.sum(1) / n.clamp(min=1), torch.zeros_like(n))


@_same_kind
def precision_at_k(hits: Array, k: int) -> Array:
    """Hits in the top ``k`` over ``k``."""
    return _check(hits, k).sum(1) / k


@_same_kind
def hit_rate_at_k(hits: Array, k: int) -> Array:
    """1.0 when at least one relevant item is in the top ``k``, else 0.0."""
    return (_check(hits, k).sum(1) > 0).to(torch.float64)


@_same_kind
def ndcg_at_k(hits: Array, n_relevant: Array, k: int) -> Array:
    """DCG of the top ``k`` over the DCG of ``min(n_relevant, k)`` hits at the top (0 if none)."""
    top = _check(hits, k)
    discounts = dcg_discounts(k, top.device)
    dcg = top @ discounts
    ideal = torch.cat([torch.zeros(1, dtype=torch.float64, device=top.device), discounts.cumsum(0)])
    idcg = ideal[n_relevant.to(torch.int64).clamp(0, k)]
    return torch.where(idcg > 0, dcg / torch.where(idcg > 0, idcg, 1.0), torch.zeros_like(dcg))


@_same_kind
def reciprocal_rank(rank: Array) -> Array:
    """``1 / rank`` of the first relevant item (ranks are 1-based)."""
    return 1.0 / rank.to(torch.float64)


def ranking_metrics(
    hits: Array, n_relevant: Array, ks: Sequence[int]
) -> dict[str, np.ndarray | torch.Tensor]:
    """Per-user ``recall@K``, ``ndcg@K``, ``hr@K`` and ``precision@K`` for every K in ``ks``."""
    out: dict[str, np.ndarray | torch.Tensor] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(hits, n_relevant, k)
        out[f"ndcg@{k}"] = ndcg_at_k(hits, n_relevant, k)
        out[f"hr@{k}"] = hit_rate_at_k(hits, k)
        out[f"precision@{k}"] = precision_at_k(hits, k)
    return out
