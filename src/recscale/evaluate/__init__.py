"""Evaluation: pure per-user metric kernels and batched full ranking over the whole catalogue.

Imports only the dataset contract, NumPy, SciPy and PyTorch: training calls evaluation for its
validation, never the other way round.
"""

from recscale.evaluate.metrics import (
    dcg_discounts,
    hit_rate_at_k,
    ndcg_at_k,
    precision_at_k,
    ranking_metrics,
    recall_at_k,
    reciprocal_rank,
)
from recscale.evaluate.ranking import (
    Scorer,
    by_user_activity,
    evaluate_model,
    item_popularity,
    top_k,
)
from recscale.evaluate.table import format_metrics_table

__all__ = [
    "Scorer",
    "by_user_activity",
    "dcg_discounts",
    "evaluate_model",
    "format_metrics_table",
    "hit_rate_at_k",
    "item_popularity",
    "ndcg_at_k",
    "precision_at_k",
    "ranking_metrics",
    "recall_at_k",
    "reciprocal_rank",
    "top_k",
]
