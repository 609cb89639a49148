"""The data-quality report of a dataset: ``quality.json`` and its printed summary.

The statistics come from small aggregates over the final interactions (counts of counts, min/max),
which either engine computes; never a Python loop over rows.
:func:`format_quality` renders the dict that ``quality.json`` holds.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import math
from collections.abc import Mapping
from typing import Any

import duckdb

__all__ = [
    "COLD_THRESHOLD",
    "QUANTILES",
    "format_quality",
    "interaction_stats",
    "stats_from_counts",
]

QUANTILES = (0.25, 0.5, 0.75, 0.9, 0.99)
#: users / items with fewer interactions than this are "cold"
COLD_THRESHOLD = 5


def _distribution(hist: Mapping[int, int]) -> dict[str, float | int]:
    """min, ``quantile_disc`` at :data:`QUANTILES`, max and mean of the counts in ``hist``.

    ``hist`` maps a count to how many users (items) have it; the quantile is the value at
    position ``max(1, n - floor(n - n*q))`` of the sorted counts, DuckDB's ``quantile_disc``.
    """
    keys = sorted(hist)
    n = sum(hist.values())
    out: dict[str, float | int] = {"min": keys[0] if n else 0}
    cumulative = list(itertools.accumulate(hist[k] for k in keys))
    for q in QUANTILES:
        pos = max(1, n - math.floor(n - q * n)) if n else 0
        value = keys[bisect.bisect_left(cumulative, pos)] if n else 0
        out[f"p{round(q * 100)}"] = int(value)
    out["max"] = keys[-1] if n else 0
    out["mean"] = round(sum(k * f for k, f in hist.items()) / n, 4) if n else 0.0
    return out


def _gini(hist: Mapping[int, int]) -> float:
    """Gini of the counts: sum((2*rank - n - 1) * c) / (n * sum(c)), ranks 1..n in count order."""
    n = sum(hist.values())
    total = sum(k * f for k, f in hist.items())
    if not n or not total:
        return 0.0
    num, rank = 0, 0
    for c in sorted(hist):
        f = hist[c]
        # ranks rank+1 .. rank+f share the count c
        num += c * (2 * (f * rank + f * (f + 1) // 2) - f * (n + 1))
        rank += f
    return round(float(num) / float(n * total), 6)


def _iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).date().isoformat()


def stats_from_counts(
    n_users: int,
    n_items: int,
    per_user: Mapping[int, int],
    per_item: Mapping[int, int],
    time: tuple[int | None, int | None, int],
    value: tuple[float | None, float | None, float | None],
) -> dict[str, Any]:
    """The shape statistics of ``quality.json`` from what any engine aggregates cheaply.

    ``per_user`` / ``per_item`` map an interaction count (>= 1) to how many users / items have it
    (those with none are added here as count 0); ``time`` is (min ts, max ts, rows without ts),
    ``value`` is (min, max, mean). Both engines hand the same aggregates to this one function, so
    their reports agree to the last digit.
    """
    hists = {}
    for role, n, hist in (("user", n_users, per_user), ("item", n_items, per_item)):
        full = {int(k): int(v) for k, v in hist.items() if v}
        zeros = n - sum(full.values())
        if zeros > 0:
            full[0] = full.get(0, 0) + zeros
        hists[role] = full
    n_inter = sum(k * f for k, f in hists["user"].items())
    cold = {}
    for role, n in (("users", n_users), ("items", n_items)):
        count = sum(f for k, f in hists[role[:-1]].items() if k < COLD_THRESHOLD)
        cold[role] = {"count": int(count), "share": round(count / n, 6) if n else 0.0}
    t_min, t_max, t_missing = time
    v_min, v_max, v_mean = value
    return {
        "users": n_users,
        "items": n_items,
        "interactions": int(n_inter),
        "density": (n_inter / (n_users * n_items)) if n_users and n_items else 0.0,
        "interactions_per_user": _distribution(hists["user"]),
        "interactions_per_item": _distribution(hists["item"]),
        "item_gini": _gini(hists["item"]),
        "time": {
            "min": _iso(t_min),
            "max": _iso(t_max),
            "min_ts": t_min,
            "max_ts": t_max,
            "missing": int(t_missing),
        },
        "value": {
            "min": None if v_min is None else float(v_min),
            "max": None if v_max is None else float(v_max),
            "mean": None if v_mean is None else round(float(v_mean), 6),
        },
        "cold": {"threshold": COLD_THRESHOLD, **cold},
    }


def interaction_stats(
    con: duckdb.DuckDBPyConnection, table: str, n_users: int, n_items: int
) -> dict[str, Any]:
    """Shape statistics of the interactions in DuckDB's ``table`` (see :func:`stats_from_counts`)."""
    hists = []
    for role in ("user", "item"):
        rows = con.execute(
            f"""SELECT c, count(*) FROM (SELECT count(*) AS c FROM {table} GROUP BY {role}_idx)
            GROUP BY c"""
        ).fetchall()
        hists.append({int(c): int(f) for c, f in rows})
    t_min, t_max, t_missing, v_min, v_max, v_mean = con.execute(
        f"SELECT min(ts), max(ts), count(*) - count(ts), min(value), max(value), avg(value) "
        f"FROM {table}"
    ).fetchall()[0]
    return stats_from_counts(
        n_users, n_items, hists[0], hists[1], (t_min, t_max, t_missing), (v_min, v_max, v_mean)
    )


def _n(x: int | float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.4g}"


def _dist_line(d: dict[str, Any]) -> str:
    parts = [f"min {d['min']:,}"]
    parts += [f"{k} {d[k]:,}" for k in d if k.startswith("p")]
    parts += [f"max {d['max']:,}", f"mean {d['mean']:,.2f}"]
    return " | ".join(parts)


def format_quality(quality: dict[str, Any]) -> str:
    """The printed summary of a quality report (the dict in ``quality.json``)."""
    q = quality
    lines = [
        f"input rows = accepted + rejected: {q['rows_in']:,} = {q['accepted']:,} + "
        f"{q['rejected']:,}" + ("" if q["conservation"]["holds"] else "  (VIOLATED)"),
        f"accepted = interactions + duplicates folded: {q['accepted']:,} = "
        f"{q['interactions']:,} + {q['folded']:,}  (dedupe {q['dedupe']}, "
        f"{q['duplicates']:,} duplicates)",
    ]
    rejected = {k: v for k, v in quality["rejected_by_reason"].items() if v}
    lines.append(
        "rejected by reason: "
        + (", ".join(f"{k} {v:,}" for k, v in rejected.items()) if rejected else "none")
    )
    skipped = quality.get("skipped_lines", {})
    if any(skipped.values()):
        lines.append(
            f"skipped lines (not rows): {skipped.get('header', 0):,} header, "
            f"{skipped.get('blank', 0):,} blank"
        )
    lines.append(
        f"users {quality['users']:,}  items {quality['items']:,}  interactions "
        f"{quality['interactions']:,}  density {quality['density']:.4%}"
    )
    lines.append("interactions per user: " + _dist_line(quality["interactions_per_user"]))
    lines.append("interactions per item: " + _dist_line(quality["interactions_per_item"]))
    lines.append(f"item popularity Gini: {quality['item_gini']:.3f}")
    t = quality["time"]
    if t.get("from") == "input order":
        lines.append(
            f"time: none in the source; ts = input position {t['min_ts']:,} .. {t['max_ts']:,} "
            "(order_from_input)"
        )
    elif t["min"] is None:
        lines.append("time: no timestamps")
    else:
        missing = f", {t['missing']:,} without" if t["missing"] else ""
        lines.append(f"time: {t['min']} .. {t['max']}{missing}")
    v = quality["value"]
    if v["min"] is not None:
        lines.append(
            f"value ({quality['value_kind']}): min {_n(v['min'])}, max {_n(v['max'])}, "
            f"mean {v['mean']:.3f}"
        )
    cold = quality["cold"]
    lines.append(
        f"cold (< {cold['threshold']} interactions): users {cold['users']['count']:,} "
        f"({cold['users']['share']:.1%}), items {cold['items']['count']:,} "
        f"({cold['items']['share']:.1%})"
    )
    for src in quality.get("sources", []):
        lines.append(
            f"source {src['path']}: {src['rows_in']:,} rows, {src['accepted']:,} accepted, "
            f"{src['rejected']:,} rejected"
        )
    for warning in quality.get("warnings", []):
        lines.append(f"warning: {warning}")
    if "seconds" in quality:
        lines.append(
            f"ingested in {quality['seconds']:.2f}s ({quality.get('rows_per_second', 0):,.0f} "
            "rows/s)"
        )
    return "\n".join(lines)
