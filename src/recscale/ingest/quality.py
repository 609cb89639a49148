"""The data-quality report of a dataset: ``quality.json`` and its printed summary.

The statistics are SQL aggregates over the final interactions (never a Python loop over rows);
:func:`format_quality` renders the dict that ``quality.json`` holds.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import duckdb

__all__ = ["COLD_THRESHOLD", "QUANTILES", "format_quality", "interaction_stats"]

QUANTILES = (0.25, 0.5, 0.75, 0.9, 0.99)
#: users / items with fewer interactions than this are "cold"
COLD_THRESHOLD = 5


def _distribution(con: duckdb.DuckDBPyConnection, counts: str) -> dict[str, float | int]:
    q = ", ".join(str(x) for x in QUANTILES)
    row = con.execute(
        f"SELECT min(c), quantile_disc(c, [{q}]), max(c), avg(c) FROM ({counts})"
    ).fetchall()[0]
    lo, qs, hi, mean = row
    out: dict[str, float | int] = {"min": int(lo or 0)}
    for p, v in zip(QUANTILES, qs or [0] * len(QUANTILES), strict=True):
        out[f"p{round(p * 100)}"] = int(v)
    out["max"] = int(hi or 0)
    out["mean"] = round(float(mean or 0.0), 4)
    return out


def _iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).date().isoformat()


def interaction_stats(
    con: duckdb.DuckDBPyConnection, table: str, n_users: int, n_items: int
) -> dict[str, Any]:
    """Shape statistics of the interactions in ``table`` (users/items with none count as 0)."""
    for role, n in (("user", n_users), ("item", n_items)):
        # one count per index 0..n-1, zeros included (appended users may have none)
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE q_{role} AS
            SELECT coalesce(x.c, 0) AS c FROM range({n}) r(idx) LEFT JOIN
                (SELECT {role}_idx, count(*) AS c FROM {table} GROUP BY {role}_idx) x
                ON x.{role}_idx = r.idx"""
        )
    n_inter = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    gini = con.execute(
        """SELECT sum((2.0 * rn - n - 1) * c) / (n * sum(c)) FROM (
            SELECT c, row_number() OVER (ORDER BY c) AS rn, count(*) OVER () AS n FROM q_item)
        GROUP BY n"""
    ).fetchall()
    t_min, t_max, t_missing, v_min, v_max, v_mean = con.execute(
        f"SELECT min(ts), max(ts), count(*) - count(ts), min(value), max(value), avg(value) "
        f"FROM {table}"
    ).fetchall()[0]
    cold = {}
    for role, n in (("users", n_users), ("items", n_items)):
        count = con.execute(
            f"SELECT count(*) FROM q_{role[:-1]} WHERE c < {COLD_THRESHOLD}"
        ).fetchall()[0][0]
        cold[role] = {"count": int(count), "share": round(count / n, 6) if n else 0.0}
    stats = {
        "users": n_users,
        "items": n_items,
        "interactions": int(n_inter),
        "density": (n_inter / (n_users * n_items)) if n_users and n_items else 0.0,
        "interactions_per_user": _distribution(con, "SELECT c FROM q_user"),
        "interactions_per_item": _distribution(con, "SELECT c FROM q_item"),
        "item_gini": round(float(gini[0][0]), 6) if gini and gini[0][0] is not None else 0.0,
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
    con.execute("DROP TABLE q_user")
    con.execute("DROP TABLE q_item")
    return stats


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
