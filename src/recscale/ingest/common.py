"""What the ingest engines share: the counts they hand back, rule parameters, progress lines.

Each engine (:mod:`~recscale.ingest.duckdb_engine`, :mod:`~recscale.ingest.spark_engine`) reads,
checks, deduplicates and writes rows its own way; everything here is engine-free, so both fill in
the rules of :mod:`recscale.ingest.rules` with the same parameters and report the same numbers.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from recscale.config import IngestConfig
from recscale.ingest import rules
from recscale.ingest.sources import SourceSpec

__all__ = [
    "MAX_ID_LENGTH",
    "EngineResult",
    "Progress",
    "line_limit",
    "memory_bytes",
    "rule_params",
    "tally",
]

#: The longest id accepted (longer ones are ``bad_user`` / ``bad_item``).
MAX_ID_LENGTH = 512


@dataclasses.dataclass
class EngineResult:
    """Counts the engine hands back for the manifest and the quality report."""

    source_rows: list[dict[str, int]]  # per source: rows_in, accepted, rejected
    rejected_by_reason: dict[str, int]
    skipped_lines: dict[str, int]
    n_input: int
    n_rejected: int
    n_interactions: int
    n_users: int
    n_items: int
    duplicates: int  # rows that shared a (user, item) pair with an earlier one
    folded: int  # rows folded into another by the dedupe policy
    given_split: dict[str, Any] | None
    quality_stats: dict[str, Any]
    meta_columns: dict[str, list[str]]
    warnings: list[str]


class Progress:
    """``ingest: <message>`` lines on stderr, when enabled."""

    def __init__(self, enabled: bool, prefix: str = "ingest") -> None:
        self.enabled = enabled
        self.prefix = prefix

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"{self.prefix}: {message}", file=sys.stderr, flush=True)


def memory_bytes(text: str) -> int:
    """``"2GB"``, ``"500MiB"``, ``"1.8 GiB"`` in bytes (2 GiB when it cannot be read)."""
    match = re.fullmatch(r"([\d.]+)\s*([KMGT]?i?B|bytes)", text.strip())
    if not match:
        return 1 << 31
    scale = {"bytes": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    scale.update({"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12})
    return int(float(match.group(1)) * scale.get(match.group(2), 1))


def line_limit(config: IngestConfig) -> int:
    """The longest line read, in bytes; longer lines are ``bad_line``.

    DuckDB's CSV reader holds a buffer of this size per thread, so it is a small share of the
    memory limit (1 MiB to 32 MiB); the Spark engine applies the same limit so both reject the
    same lines.
    """
    threads = config.threads or os.cpu_count() or 1
    return max(1 << 20, min(1 << 25, memory_bytes(config.memory_limit) // (8 * threads)))


def rule_params(spec: SourceSpec, config: IngestConfig, expected: int | None) -> dict[str, object]:
    """The ``{name}`` parameters of :mod:`recscale.ingest.rules` for one source."""
    return {
        "expected_fields": expected,
        "user_int": spec.ids_int,
        "item_int": spec.ids_int,
        "has_time": spec.roles.get("time") is not None,
        "has_value": spec.roles.get("value") is not None,
        "positive_threshold": config.positive_threshold,
        "max_id_length": MAX_ID_LENGTH,
        "time_format": config.time_format,
        "time_expected": (
            f"in time_format {config.time_format}"
            if config.time_format
            else "unix seconds or ISO-8601"
        ),
    }


def tally(
    counts: Iterable[tuple[int, str | None, int]], sources: Sequence[tuple[int, SourceSpec]]
) -> tuple[list[dict[str, int]], dict[str, int], dict[str, int]]:
    """Per-source rows, rejected rows by reason and skipped lines from (src, reason, rows) counts.

    ``reason`` NULL is an accepted row; "blank" and "header" are lines that are not rows.
    ``sources`` are (src, spec) in input order; the per-source counts come back in that order.
    """
    per_src = {src: {"rows_in": 0, "accepted": 0, "rejected": 0} for src, _ in sources}
    by_reason = dict.fromkeys(rules.REASONS, 0)
    blank = 0
    for src, reason, n in counts:
        if reason == "header":
            continue
        if reason == "blank":
            blank += int(n)
            continue
        entry = per_src[int(src)]
        entry["rows_in"] += int(n)
        if reason is None:
            entry["accepted"] += int(n)
        else:
            entry["rejected"] += int(n)
            by_reason[reason] += int(n)
    skipped = {"header": sum(spec.skip for _, spec in sources), "blank": blank}
    return [per_src[src] for src, _ in sources], by_reason, skipped
