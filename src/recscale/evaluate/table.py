"""Plain-text comparison tables: one row per model, one column per metric."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["format_metrics_table"]

DEFAULT_METRICS = ("recall", "ndcg", "hr", "precision", "coverage", "popularity")


def _cell(name: str, value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if name == "users":
        return str(int(value))
    if name.startswith("popularity"):
        return f"{value:.1f}"  # a mean interaction count, not a fraction
    return f"{value:.4f}"


def format_metrics_table(
    rows: Sequence[tuple[str, Mapping[str, float]]],
    ks: Sequence[int],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> str:
    """A fixed-width table of ``rows`` (model name, metrics dict) for every ``metric@K``.

    Columns are ``metric@K`` for each metric then each K in ``ks``, followed by ``mrr`` and
    ``users`` when any row has them; a column no row has is left out, a value a row lacks
    shows as ``-``. Fractions print with 4 decimals, popularity (a count) with 1.
    """
    candidates = [f"{m}@{k}" for m in metrics for k in ks] + ["mrr", "users"]
    columns = [c for c in candidates if any(c in r for _, r in rows)]
    header = ["model", *columns]
    body = [[name, *(_cell(c, r.get(c)) for c in columns)] for name, r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        first = line[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(line[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)]) + "\n"
