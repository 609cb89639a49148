"""``ingest()``: raw interaction logs -> a dataset directory (see ``dataset/README.md``)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from recscale.config import IngestConfig
from recscale.dataset import Dataset, Manifest, SourceFile
from recscale.dataset.store import open_dataset
from recscale.errors import ConfigError, DatasetError, InputError
from recscale.ingest.common import EngineResult
from recscale.ingest.duckdb_engine import run_duckdb
from recscale.ingest.files import LOCAL_FILES, Files, refuse_uris
from recscale.ingest.quality import format_quality
from recscale.ingest.sources import Plan, plan_sources

__all__ = ["ENGINES", "IngestResult", "format_quality", "ingest"]

#: The engines ingest and split run on: one machine (DuckDB, out-of-core) or a cluster (Spark).
ENGINES = ("duckdb", "spark")


@dataclasses.dataclass(frozen=True)
class IngestResult:
    """What :func:`ingest` made: the opened dataset and its quality report (``quality.json``)."""

    dataset: Dataset
    quality: dict[str, Any]


def _version() -> str:
    try:
        return metadata.version("recscale")
    except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
        return "0+unknown"


def _check_out(out: Any, append: bool) -> Dataset | None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"out {str(out)!r} is a file; expected a dataset directory")
    is_dataset = (out / "manifest.json").is_file()
    if append and is_dataset:
        return open_dataset(out)
    if out.exists() and not is_dataset and any(out.iterdir()):
        raise DatasetError(
            f"refusing to write the dataset to {str(out)!r}: the folder exists, is not empty and "
            "is not a recscale dataset (no manifest.json); choose another --out"
        )
    return None


def ingest(
    sources: Sequence[str | Path],
    out: str | Path,
    config: IngestConfig = IngestConfig(),  # noqa: B008 - frozen, so a shared default is safe
    *,
    append: bool = False,
    progress: bool = True,
    engine: str = "duckdb",
    spark: Any = None,
) -> IngestResult:
    """Read ``sources`` (files, globs, folders) into the dataset directory ``out``.

    Every input row is either accepted (an interaction, or a duplicate folded into one by
    ``config.dedupe``) or rejected into ``rejected/`` with its file, line, raw text and reason;
    ``quality.json`` states ``input rows = accepted + rejected`` with the numbers. The directory
    is written beside ``out`` and renamed into place at the end, so on any error an existing
    dataset at ``out`` is left untouched. With ``append=True`` the new sources are added to the
    dataset at ``out``: existing user and item indices are kept, new ids are numbered after
    them, and ``config.dedupe`` applies across old and new interactions; existing splits are
    dropped (they no longer cover the data) and must be made again.

    ``progress`` prints one line per source (rows and rows/s) to stderr; with ``False`` nothing
    is printed.

    ``engine`` is ``"duckdb"`` (one machine, out-of-core) or ``"spark"`` (PySpark: ``spark`` is a
    SparkSession, else the active one, else a new local one); both write the same dataset. With
    ``"spark"`` every path (sources, metadata files, ``out``) is read and written through the
    session's Hadoop filesystems, so ``hdfs://``, ``s3a://``, ``file://`` and other URIs work
    there; ``"duckdb"`` takes local paths only.
    """
    if engine not in ENGINES:
        raise ConfigError(
            f"ingest: engine {engine!r} is unknown; expected one of "
            + ", ".join(repr(e) for e in ENGINES)
        )
    start = time.perf_counter()
    if isinstance(sources, (str, Path)):
        sources = [sources]
    files: Files = LOCAL_FILES
    if engine == "spark":
        from recscale.ingest.hadoop import HadoopFS
        from recscale.ingest.spark_engine import _spark, spark_session

        _spark()  # a missing pyspark is reported before any file is read
        spark = spark if spark is not None else spark_session()
        files = HadoopFS(spark)
    else:
        refuse_uris("ingest", [*map(str, sources), str(out), config.items_file, config.users_file])
    out = files.path(str(out))
    plan = plan_sources(sources, config, files=files)
    existing = _check_out(out, append)
    hashing = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        # hashing reads every byte once, on a thread beside the engine
        hashes = {spec.path: hashing.submit(files.sha256, spec.path) for spec in plan.sources}
        if existing is not None:
            known = {s.sha256: s.path for s in existing.manifest.sources}
            for path, digest in hashes.items():
                if digest.result() in known:
                    raise InputError(
                        f"{path} was already ingested into {out} (same sha256 as "
                        f"{known[digest.result()]}); appending it again would count its rows twice"
                    )
        out.parent.mkdir(parents=True, exist_ok=True)
        workdir = files.make_temp_dir(out.parent, f".{out.name}.ingest-")
        try:
            with files.atomic_directory(out) as tmp:
                if engine == "spark":
                    from recscale.ingest.spark_engine import run_spark

                    result = run_spark(
                        plan,
                        config,
                        tmp,
                        workdir,
                        existing=existing,
                        progress=progress,
                        spark=spark,
                    )
                else:
                    result = run_duckdb(
                        plan, config, tmp, workdir, existing=existing, progress=progress
                    )
                seconds = time.perf_counter() - start
                sources_meta = [
                    SourceFile(
                        path=str(spec.path),
                        sha256=hashes[spec.path].result(),
                        bytes=spec.path.stat().st_size,
                        format=spec.format,
                        rows=rows["rows_in"],
                    )
                    for spec, rows in zip(plan.sources, result.source_rows, strict=True)
                ]
                quality = _quality(plan, config, result, existing, seconds)
                manifest = _manifest(plan, config, result, existing, sources_meta, quality, engine)
                if existing is not None:
                    _carry_rejected(existing.path / "rejected", tmp / "rejected")
                if result.given_split is not None:
                    _write_given(tmp / "splits" / "given", plan, result.given_split)
                (tmp / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
                manifest.write(tmp)
        finally:
            files.remove_tree(workdir)
    finally:
        hashing.shutdown(wait=True, cancel_futures=True)
    if progress:
        print(
            f"ingest: wrote {out}: {result.n_interactions:,} interactions, "
            f"{result.n_users:,} users, {result.n_items:,} items in {seconds:.2f}s "
            f"({quality['rows_per_second']:,.0f} rows/s)",
            file=sys.stderr,
            flush=True,
        )
    return IngestResult(dataset=open_dataset(out), quality=quality)


def _engine_version(engine: str) -> str:
    if engine == "spark":
        import pyspark

        return f"spark {pyspark.__version__}"
    return f"duckdb {duckdb.__version__}"


def _carry_rejected(old: Path, new: Path) -> None:
    """Existing rejected parts come first; the new ones are renumbered after them.

    Empty parts are dropped (one is kept if all are empty), so appends do not pile them up.
    """

    def rows(part: Path) -> int:
        return pq.ParquetFile(part).metadata.num_rows

    old_parts = [p for p in sorted(old.glob("part-*.parquet")) if rows(p)]
    new_all = sorted(new.glob("part-*.parquet"))
    new_parts = [p for p in new_all if rows(p)] or ([] if old_parts else new_all[:1])
    staging = new.parent / "rejected.new"
    new.rename(staging)
    new.mkdir()
    for i, part in enumerate(old_parts):
        shutil.copyfile(part, new / f"part-{i:05d}.parquet")
    for j, part in enumerate(new_parts):
        (staging / part.name).rename(new / f"part-{len(old_parts) + j:05d}.parquet")
    shutil.rmtree(staging)


def _write_given(directory: Any, plan: Plan, given: dict[str, Any]) -> None:
    split = {
        "name": "given",
        "strategy": "given",
        "seed": None,
        "params": {"source": "ingest"},
        "counts": given["counts"],
        "users": given["users"],
        "source": "ingest",
        "files": {s.part: str(s.path) for s in plan.sources if s.part},
        "created_at": Manifest.now(),
    }
    (directory / "split.json").write_text(json.dumps(split, indent=2) + "\n")


def _quality(
    plan: Plan,
    config: IngestConfig,
    result: EngineResult,
    existing: Dataset | None,
    seconds: float,
) -> dict[str, Any]:
    old = existing.quality if existing is not None else {}
    accepted_new = sum(s["accepted"] for s in result.source_rows)
    # counts are cumulative over every ingest into the directory
    rows = {
        "rows_in": old.get("rows_in", 0) + result.n_input,
        "accepted": old.get("accepted", 0) + accepted_new,
        "rejected": old.get("rejected", 0) + result.n_rejected,
        "duplicates": old.get("duplicates", 0) + result.duplicates,
        "folded": old.get("folded", 0) + result.folded,
    }
    by_reason = dict(result.rejected_by_reason)
    for reason, n in old.get("rejected_by_reason", {}).items():
        by_reason[reason] = by_reason.get(reason, 0) + n
    skipped = dict(result.skipped_lines)
    for key, n in old.get("skipped_lines", {}).items():
        skipped[key] = skipped.get(key, 0) + n
    holds = rows["rows_in"] == rows["accepted"] + rows["rejected"] and rows["accepted"] == (
        result.n_interactions + rows["folded"]
    )
    sources = list(old.get("sources", [])) + [
        {"path": str(spec.path), "format": spec.format, **counts}
        for spec, counts in zip(plan.sources, result.source_rows, strict=True)
    ]
    value_kind = plan.value_kind(config)
    if existing is not None and existing.manifest.value_kind != value_kind:
        value_kind = "mixed"
    quality: dict[str, Any] = {
        **rows,
        "conservation": {
            "holds": holds,
            "statement": (
                f"input rows {rows['rows_in']:,} = accepted {rows['accepted']:,} + rejected "
                f"{rows['rejected']:,}; accepted {rows['accepted']:,} = interactions "
                f"{result.n_interactions:,} + duplicates folded {rows['folded']:,}"
            ),
        },
        "rejected_by_reason": by_reason,
        "skipped_lines": skipped,
        "dedupe": config.dedupe,
        "value_kind": value_kind,
        **result.quality_stats,
        "positive_threshold": config.positive_threshold,
        "kcore": {
            "min_user_interactions": config.min_user_interactions,
            "min_item_interactions": config.min_item_interactions,
            "removed_rows": result.rejected_by_reason.get("kcore", 0),
        },
        "sources": sources,
        "seconds": round(seconds, 3),
        "rows_per_second": round(result.n_input / seconds) if seconds > 0 else 0,
    }
    if config.order_from_input:
        # ts are input positions, not times: dates made from them would be 1970 nonsense
        quality["time"] = {**quality["time"], "min": None, "max": None, "from": "input order"}
    warnings = list(old.get("warnings", [])) + result.warnings
    if warnings:
        quality["warnings"] = warnings
    if existing is not None:
        quality["appended"] = True
        dropped = existing.split_names()
        if dropped:
            quality["dropped_splits"] = dropped
    return quality


def _manifest(
    plan: Plan,
    config: IngestConfig,
    result: EngineResult,
    existing: Dataset | None,
    sources: list[SourceFile],
    quality: dict[str, Any],
    engine: str,
) -> Manifest:
    first = plan.sources[0]
    columns: dict[str, str | None] = dict(first.roles)
    old_sources: tuple[SourceFile, ...] = ()
    resolved = [s.describe() for s in plan.sources]
    if existing is not None:
        columns = dict(existing.manifest.columns)
        old_sources = existing.manifest.sources
        resolved = list(existing.manifest.options.get("resolved_sources", [])) + resolved
    options: dict[str, Any] = dataclasses.asdict(config)
    options["engine"] = engine
    options["resolved_sources"] = resolved
    options["items_metadata"] = [str(m.path) for m in plan.items_meta]
    options["users_metadata"] = [str(m.path) for m in plan.users_meta]
    options["feature_columns"] = result.meta_columns
    return Manifest(
        n_users=result.n_users,
        n_items=result.n_items,
        n_interactions=result.n_interactions,
        n_rejected=quality["rejected"],
        n_input_rows=quality["rows_in"],
        columns=columns,
        value_kind=quality["value_kind"],
        sources=old_sources + tuple(sources),
        options=options,
        created_by=f"recscale {_version()} ingest ({_engine_version(engine)})",
        created_at=Manifest.now(),
    )
