"""The Spark engine of ingest and split: the DuckDB engine's outputs, from PySpark DataFrames.

Every row-level step is a Spark SQL expression or a DataFrame operator; no Python function runs per
row. The validation rules are the ones of :mod:`recscale.ingest.rules`, rendered with the same
parameters as for DuckDB and translated by :func:`recscale.ingest.rules.to_spark`. What makes the
two engines agree row for row:

- **lines**: text is read with ``spark.read.text`` (``\\n`` line ends, a trailing ``\\r`` cut), one
  row a physical line. Spark keeps no line numbers, so each row carries its file block
  (``_metadata.file_block_start``) and its position in the block (``monotonically_increasing_id``);
  a line number is the lines of the blocks before it plus its position. Lines that are not UTF-8
  are ``bad_encoding`` with DuckDB's rendering of the bytes (each byte of a broken sequence ``?``).
- **ids**: indices follow DuckDB's rule (ascending integers when every id is one, else ascending
  text); a dense, ordered index is a global sort, then each sorted partition's row offsets.
- **dedupe**: the same tie order (time, then input order) as a window per (user, item) pair.
- **casts**: text becomes an integer by the non-ANSI ``CAST`` (see ``rules.to_spark``): Spark's
  ``TRY_CAST`` raises and catches a Java exception for every text that is not a number.
- **splits**: DuckDB's seeded row hash (``hash(seed, user_idx, item_idx, ts, value)``, a
  murmur-style mix of 64-bit words) is rebuilt from 64-bit arithmetic, so the same rows are drawn.
- **reports**: the quality statistics come from the same counts of counts
  (:func:`recscale.ingest.quality.stats_from_counts`).

Where the time goes, and how it is kept down: staging (the rules over every line) is the one pass
over the raw text and is saved as Parquet; the id maps are a sort of the distinct ids; dedupe
range-partitions the rows by (user_idx, item_idx) once, so the per-pair window and the final order
share one shuffle and the final rows are written as they come out of it (the report's figures
observed on the way). Splits likewise range-partition by user once for the per-user windows and
the ordered parts.

Final files are written by the executors in the dataset's schema, row groups and file sizes, and
the driver only renames them into ``part-00000.parquet``, ... in order: no table passes through
the driver but the id maps. Every path goes through the session's Hadoop filesystems
(:mod:`recscale.ingest.hadoop`), so sources and datasets may be ``hdfs://``, ``s3a://``,
``file://`` or any other URI the session can read, or plain paths on its default filesystem.
Metadata files (titles, genres, demographics: small side tables) are copied to the driver and
joined by DuckDB, so their column types are the same whichever engine ingested the interactions.

pyspark is imported only here, and only when the engine is used; without it the error names the
extra to install.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from recscale.config import IngestConfig, SplitConfig
from recscale.dataset import (
    INTERACTIONS_SCHEMA,
    REJECTED_SCHEMA,
    Dataset,
)
from recscale.dataset.files import ROWS_PER_GROUP
from recscale.errors import ConfigError, DatasetError, FormatError, InputError
from recscale.ingest import quality, rules
from recscale.ingest.common import EngineResult, Progress, line_limit, rule_params, tally
from recscale.ingest.sources import MetaSpec, Plan, SourceSpec

if TYPE_CHECKING:  # pragma: no cover - types only
    from pyspark.sql import Column, DataFrame, SparkSession

    from recscale.ingest.hadoop import HadoopPath

__all__ = ["SPARK_INSTALL", "run_spark", "spark_assign", "spark_session"]

SPARK_INSTALL = "pip install 'recscale[spark]'"
_OLD_SRC = -1
# DuckDB's hash: the murmur finaliser constant and the hash of NULL, as signed 64-bit words
_MIX = 0xD6E8FEB86659FD93 - (1 << 64)
_NULL_HASH = 0xBF58476D1CE4E5B9 - (1 << 64)


def _spark() -> Any:
    """``pyspark.sql`` (imported on first use), or a ConfigError naming the extra."""
    try:
        import pyspark.sql
    except ImportError:
        raise ConfigError(
            f"engine 'spark' needs pyspark, which is not installed; install it with "
            f"{SPARK_INSTALL} (it also needs Java 17), or use engine 'duckdb'"
        ) from None
    return pyspark.sql


def spark_session(master: str | None = None, *, shuffle_partitions: int | None = None) -> Any:
    """The active Spark session, else a new one: on ``master``, else spark-submit's, else ``local[*]``.

    A new session has the UI off and warnings only in the log.
    """
    sql = _spark()
    active = sql.SparkSession.getActiveSession()
    if active is not None and master is None:
        session = active
    else:
        builder = sql.SparkSession.builder.appName("recscale")
        # under spark-submit the master is already in the JVM's configuration: keep it
        from pyspark import SparkConf

        if master is not None or not SparkConf().contains("spark.master"):
            builder = builder.master(master or "local[*]")
        builder = builder.config("spark.ui.enabled", "false").config(
            "spark.ui.showConsoleProgress", "false"
        )
        if shuffle_partitions is not None:
            builder = builder.config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        session = builder.getOrCreate()
        session.sparkContext.setLogLevel("WARN")
    if shuffle_partitions is not None:
        session.conf.set("spark.sql.shuffle.partitions", str(shuffle_partitions))
    return session


@contextlib.contextmanager
def _settings(spark: SparkSession) -> Iterator[None]:
    """Session settings the rules rely on, restored afterwards.

    UTC (times without a zone are UTC, as in DuckDB), non-ANSI arithmetic (64-bit multiplication
    wraps, which DuckDB's hash needs), ``size(NULL)`` NULL as DuckDB's ``len``, and generated code
    the JVM will compile.
    """
    wanted = {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.ansi.enabled": "false",
        "spark.sql.legacy.sizeOfNull": "false",
        # the rules make one long generated method; past 8,000 bytes the JVM will not compile it
        # to machine code (25x slower), so such stages use Spark's smaller per-expression code
        "spark.sql.codegen.hugeMethodLimit": "8000",
    }
    old = {k: spark.conf.get(k, None) for k in wanted}
    for k, v in wanted.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


def _lit(value: str) -> str:
    """A Spark SQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


# DuckDB renders the bytes of a line that is not UTF-8 by replacing each byte of a broken
# sequence (from its lead byte to the first byte that does not continue it, or to the end when the
# line is too short for it) with '?'. The state machine below does the same over the line's bytes,
# as Latin-1 characters (one character a byte); it only runs on the rare lines that are not UTF-8.
_MAKE_VALID = """decode(encode(aggregate(
    sequence(1, octet_length(b)),
    named_struct('out', '', 'pend', '', 'need', 0, 'cp', 0L, 'dead', false),
    (acc, i) -> CASE
      WHEN acc.dead THEN named_struct('out', acc.out || '?', 'pend', '', 'need', 0, 'cp', 0L,
                                      'dead', true)
      WHEN acc.need > 0 AND (ascii(substr(l1, i, 1)) & 192) = 128 THEN
        CASE WHEN acc.need > 1 THEN named_struct('out', acc.out,
                  'pend', acc.pend || substr(l1, i, 1), 'need', acc.need - 1,
                  'cp', acc.cp * 64 + (ascii(substr(l1, i, 1)) & 63), 'dead', false)
        ELSE named_struct('out', acc.out || CASE
              WHEN (length(acc.pend) = 1 AND acc.cp * 64 + (ascii(substr(l1, i, 1)) & 63) >= 128)
                OR (length(acc.pend) = 2 AND acc.cp * 64 + (ascii(substr(l1, i, 1)) & 63) >= 2048
                    AND NOT (acc.cp * 64 + (ascii(substr(l1, i, 1)) & 63) BETWEEN 55296 AND 57343))
                OR (length(acc.pend) = 3
                    AND acc.cp * 64 + (ascii(substr(l1, i, 1)) & 63) BETWEEN 65536 AND 1114111)
              THEN acc.pend || substr(l1, i, 1)
              ELSE repeat('?', length(acc.pend) + 1) END,
            'pend', '', 'need', 0, 'cp', 0L, 'dead', false) END
      WHEN acc.need > 0 THEN named_struct('out', acc.out || repeat('?', length(acc.pend) + 1),
                                          'pend', '', 'need', 0, 'cp', 0L, 'dead', false)
      WHEN ascii(substr(l1, i, 1)) < 128 THEN named_struct('out', acc.out || substr(l1, i, 1),
                                          'pend', '', 'need', 0, 'cp', 0L, 'dead', false)
      WHEN (ascii(substr(l1, i, 1)) & 248) = 240 OR (ascii(substr(l1, i, 1)) & 240) = 224
           OR (ascii(substr(l1, i, 1)) & 224) = 192 THEN
        CASE WHEN octet_length(b) - i < CASE WHEN (ascii(substr(l1, i, 1)) & 224) = 192 THEN 1
                                          WHEN (ascii(substr(l1, i, 1)) & 240) = 224 THEN 2
                                          ELSE 3 END
          THEN named_struct('out', acc.out || '?', 'pend', '', 'need', 0, 'cp', 0L, 'dead', true)
          ELSE named_struct('out', acc.out, 'pend', substr(l1, i, 1),
            'need', CASE WHEN (ascii(substr(l1, i, 1)) & 224) = 192 THEN 1
                         WHEN (ascii(substr(l1, i, 1)) & 240) = 224 THEN 2 ELSE 3 END,
            'cp', CAST(CASE WHEN (ascii(substr(l1, i, 1)) & 224) = 192
                              THEN ascii(substr(l1, i, 1)) & 31
                            WHEN (ascii(substr(l1, i, 1)) & 240) = 224
                              THEN ascii(substr(l1, i, 1)) & 15
                            ELSE ascii(substr(l1, i, 1)) & 7 END AS BIGINT),
            'dead', false) END
      ELSE named_struct('out', acc.out || '?', 'pend', '', 'need', 0, 'cp', 0L, 'dead', false)
    END,
    acc -> acc.out || repeat('?', length(acc.pend))), 'ISO-8859-1'), 'UTF-8')"""


def _fin(x: str) -> str:
    """The murmur finaliser of DuckDB's ``hash`` on the 64-bit word in column ``x`` (one step)."""
    return f"(({x}) ^ shiftrightunsigned({x}, 32))"


def _with_duckdb_hash(df: DataFrame, seed: int) -> DataFrame:
    """``df`` with ``h``: DuckDB's ``hash(seed::BIGINT, user_idx, item_idx, ts, value)``, unsigned.

    ``hash(x)`` finalises the 64-bit word of ``x`` (a FLOAT: its IEEE bits, -0.0 as 0.0; NULL: a
    constant) and ``hash(a, b) = mix(hash(a)) xor hash(b)``. Each step is a column of its own, so
    the expression stays linear in size; multiplication wraps (non-ANSI), as in C.
    """
    F = _spark().functions

    def finalise(col: str, word: str) -> DataFrame:
        nonlocal df
        df = df.withColumn(col, F.expr(word))
        df = df.withColumn(col, F.expr(f"{_fin(col)} * {_MIX}L"))
        df = df.withColumn(col, F.expr(f"{_fin(col)} * {_MIX}L"))
        df = df.withColumn(col, F.expr(_fin(col)))
        return df

    finalise("_h", f"CAST({int(seed)} AS BIGINT)")
    words = {
        "_hu": "CAST(user_idx AS BIGINT)",
        "_hi": "CAST(item_idx AS BIGINT)",
        "_ht": "ts",
        "_hv": _float_bits("value"),
    }
    for col, word in words.items():
        finalise(col, word)
        df = df.withColumn(col, F.expr(f"coalesce({col}, {_NULL_HASH}L)"))
        df = df.withColumn("_h", F.expr(f"({_fin('_h')} * {_MIX}L) ^ {col}"))
    # DuckDB compares the hash as an unsigned 64-bit integer
    df = df.withColumn(
        "h",
        F.expr(
            "CASE WHEN _h < 0 THEN CAST(_h AS DECIMAL(20, 0)) + 18446744073709551616 "
            "ELSE CAST(_h AS DECIMAL(20, 0)) END"
        ),
    )
    return df.drop("_h", *words)


def _float_bits(col: str) -> str:
    """The IEEE-754 bits of a FLOAT column as a BIGINT (0 for +-0.0), from exact arithmetic."""
    a = f"abs(CAST({col} AS DOUBLE))"
    e0 = f"floor(log2({a}))"
    # log2 can be off by one at powers of two; pow(2, e) is exact, so correct it
    e = f"({e0} - CASE WHEN pow(2D, {e0}) > {a} THEN 1 ELSE 0 END + CASE WHEN pow(2D, {e0} + 1) <= {a} THEN 1 ELSE 0 END)"
    normal = f"(CAST({e} + 127 AS BIGINT) * 8388608 + CAST(({a} / pow(2D, {e}) - 1) * 8388608 AS BIGINT))"
    sub = f"CAST({a} * pow(2D, 149) AS BIGINT)"
    sign = f"CASE WHEN {col} < 0 THEN 2147483648 ELSE 0 END"
    return (
        f"CASE WHEN {col} IS NULL THEN NULL WHEN {col} = 0 THEN 0L ELSE {sign} + "
        f"CASE WHEN {a} < pow(2D, -126) THEN {sub} ELSE {normal} END END"
    )


@dataclasses.dataclass
class _Source:
    spec: SourceSpec
    src: int
    lines: int = 0
    seconds: float = 0.0


class SparkIngest:
    """One ingest run on a Spark session, with its intermediate tables under ``workdir``."""

    def __init__(
        self, spark: SparkSession, config: IngestConfig, workdir: HadoopPath, progress: bool
    ) -> None:
        self.spark = spark
        self.files = workdir.fs
        self.F = _spark().functions
        self.W = _spark().Window
        self.config = config
        self.workdir = workdir
        self.say = Progress(progress)
        self.limit = line_limit(config)
        self.sources: list[_Source] = []
        self.warnings: list[str] = []
        self._n = 0

    # ----------------------------------------------------------------- helpers

    def save(self, df: DataFrame, name: str) -> DataFrame:
        """Write ``df`` under the work directory and read it back: a fixed point for the plan."""
        self._n += 1
        path = self.workdir / f"{self._n:03d}-{name}"
        df.write.mode("overwrite").parquet(str(path))
        return self.spark.read.parquet(str(path))

    def values(self, rows: Sequence[tuple[Any, ...]], schema: str) -> DataFrame:
        """A small DataFrame of literal rows (SQL VALUES: no Python-side conversion)."""
        names = [c.split()[0] for c in schema.split(",")]
        types = [c.split()[1] for c in schema.split(",")]
        if not rows:
            return self.spark.sql(
                "SELECT "
                + ", ".join(f"CAST(NULL AS {t}) AS {n}" for n, t in zip(names, types, strict=True))
            ).limit(0)

        def lit(v: Any, t: str) -> str:
            return f"CAST({_lit(v) if isinstance(v, str) else int(v)} AS {t})"

        body = ", ".join(
            "(" + ", ".join(lit(v, t) for v, t in zip(row, types, strict=True)) + ")"
            for row in rows
        )
        return self.spark.sql(f"SELECT * FROM VALUES {body} AS t({', '.join(names)})")

    def expr(self, sql: str) -> Column:
        return self.F.expr(sql)

    def add(self, df: DataFrame, columns: dict[str, str]) -> DataFrame:
        """``df`` with ``columns`` (name: Spark SQL), in as few projections as their uses allow.

        Each ``withColumn`` is one more projection copying every column of every row (the rules
        are too big for whole-stage code generation, so nothing fuses them) and one more analysis
        of the whole plan on the driver; columns that do not use one another share one.
        """
        pending = dict(columns)
        while pending:
            ready = {
                name: sql
                for name, sql in pending.items()
                if not any(re.search(rf"\b{re.escape(o)}\b", sql) for o in pending if o != name)
            }
            if not ready:  # pragma: no cover - a bug in the engine's own expressions
                raise ValueError(f"columns that use one another: {sorted(pending)}")
            df = df.withColumns({name: self.expr(sql) for name, sql in ready.items()})
            for name in ready:
                del pending[name]
        return df

    def dense_index(
        self, df: DataFrame, order: Sequence[Column], name: str
    ) -> tuple[DataFrame, int]:
        """``df`` with ``idx``: 0.. in ``order``, from a sort and partition offsets; and its rows.

        A global sort leaves partition p's rows before partition p+1's; each row's index is the rows
        of the partitions before it plus its place in its own, so no single task sees all rows.
        """
        F = self.F
        tagged = self.save(
            df.orderBy(*order)
            .withColumn("_p", F.spark_partition_id())
            .withColumn("_k", F.monotonically_increasing_id()),
            name,
        )
        parts = sorted(
            (r["_p"], r["k0"], r["n"])
            for r in tagged.groupBy("_p")
            .agg(F.min("_k").alias("k0"), F.count("*").alias("n"))
            .collect()
        )
        shift, total = [], 0
        for p, k0, n in parts:
            shift += [F.lit(p), F.lit(total - k0)]
            total += n
        # the offsets are a literal map, not a join: the planner then sizes the index as the
        # table it reads, and broadcasts it to the joins that use it when it is small
        offset = F.element_at(F.create_map(*shift), F.col("_p")) if shift else F.lit(0)
        indexed = tagged.withColumn("idx", (F.col("_k") + offset).cast("int")).drop("_p", "_k")
        return indexed, total

    def write_parts(
        self,
        df: DataFrame,
        directory: HadoopPath,
        schema: pa.Schema,
        *,
        rows_per_group: int,
        rows_per_file: int,
    ) -> int:
        """``df`` (already in output order) as the dataset's ``part-*.parquet`` files."""
        self._n += 1
        staging = self.workdir / f"{self._n:03d}-out"
        _write_ordered(
            df, staging, schema, rows_per_group=rows_per_group, rows_per_file=rows_per_file
        )
        return _adopt_parts(self.spark, staging, directory, schema)

    # ----------------------------------------------------------------- staging

    def _lines(self, spec: SourceSpec) -> DataFrame:
        """One row a physical line: ``b`` (bytes, ``\\r`` cut), ``_b`` (block), ``_m`` (position)."""
        F = self.F
        df = self.spark.read.option("lineSep", "\n").text(str(spec.path))
        df = df.select(
            F.col("value").cast("binary").alias("b0"),
            F.col("_metadata.file_block_start").alias("_b"),
            F.monotonically_increasing_id().alias("_m"),
        )
        # the first line: block 0, the first row of its partition
        first = "(_b = 0 AND _m = shiftleft(CAST(spark_partition_id() AS BIGINT), 33))"
        cut = (
            "CASE WHEN octet_length(b0) > 0 AND substr(b0, -1, 1) = X'0D' "
            "THEN substr(b0, 1, octet_length(b0) - 1) ELSE b0 END"
        )
        bom = (
            "CASE WHEN _first AND substr(b1, 1, 3) = X'EFBBBF' "
            "THEN substr(b1, 4, octet_length(b1)) ELSE b1 END"
        )
        df = self.add(df, {"_first": first, "b1": cut, "b": bom})
        return df.drop("b0", "b1")

    def _reader_checks(self, df: DataFrame, skip: int) -> DataFrame:
        """``line`` (text or NULL when empty), ``reason``/``detail``/``raw`` of the reader refusals."""
        limit = self.limit
        reason = (
            f"CASE WHEN {'_first' if skip else 'FALSE'} THEN 'header' "
            "WHEN NOT is_valid_utf8(l0) THEN 'bad_encoding' "
            f"WHEN octet_length(b) > {limit} THEN 'bad_line' "
            "WHEN instr(l0, '\\u0001') > 0 THEN 'bad_line' END"
        )
        detail = (
            "CASE rreason WHEN 'bad_encoding' THEN 'not valid UTF-8' "
            f"WHEN 'bad_line' THEN CASE WHEN octet_length(b) > {limit} "
            f"THEN 'longer than {limit} bytes' ELSE 'contains the control byte 0x01' END END"
        )
        raw = (
            "CASE rreason WHEN 'bad_encoding' THEN "
            + _MAKE_VALID.replace("l1", "decode(b, 'ISO-8859-1')")
            # DuckDB keeps the first 10,000 characters of a line longer than its buffer
            + f" WHEN 'bad_line' THEN CASE WHEN octet_length(b) > {limit} THEN substr(l0, 1, 10000) "
            "ELSE l0 END END"
        )
        checks = {
            "l0": "CAST(b AS STRING)",
            "rreason": reason,
            "rdetail": detail,
            "rraw": raw,
            "raw": "CASE WHEN rreason IS NULL AND l0 <> '' THEN l0 END",
        }
        # the line's bytes and text are carried no further than their last use
        return self.add(df, checks).drop("b", "l0", "_first")

    def _rules(
        self,
        base: DataFrame,
        spec: SourceSpec,
        *,
        blank: str,
        expected: int | None = None,
        overrides: dict[str, str] | None = None,
        raw: str = "raw",
    ) -> DataFrame:
        """The canonical columns, the rules and the reason of each row of ``base``."""
        params = rule_params(spec, self.config, expected)
        if self.config.time_format:
            try:
                params["time_format"] = rules.strptime_to_java(self.config.time_format)
            except ValueError as exc:
                raise ConfigError(f"ingest (engine 'spark'): {exc}") from None
        overrides = overrides or {}
        columns = {
            name: overrides.get(name) or rules.to_spark(rules.render(sql, params))
            for name, sql in rules.DERIVED
        }
        if self.config.order_from_input:
            ts = "_pos"
        elif "ts" in overrides:
            ts = overrides["ts"]
        elif self.config.time_format:
            ts = (
                "CASE WHEN time_text IS NULL OR trim(time_text) = '' THEN NULL ELSE "
                + rules.to_spark(rules.render(rules.TIME_FORMAT_SQL, params))
                + " END"
            )
        else:
            ts = rules.to_spark(rules.TIME_SQL)
        value = overrides.get(
            "value",
            rules.to_spark(rules.VALUE_SQL) if params["has_value"] else "CAST(1.0 AS DOUBLE)",
        )
        columns["ts"] = ts
        columns["value"] = value
        own = {"delimited": "field_count", "jsonl": "bad_json"}.get(spec.kind)
        active = [
            r for r in rules.RULES if r.reason not in ("field_count", "bad_json") or r.reason == own
        ]
        whens = " ".join(
            f"WHEN {rules.to_spark(rules.render(r.when, params))} THEN '{r.reason}'" for r in active
        )
        details = " ".join(
            f"WHEN '{r.reason}' THEN {rules.to_spark(rules.render(r.detail, params))}"
            for r in active
        )
        columns["reason"] = (
            f"CASE WHEN rreason IS NOT NULL THEN rreason WHEN {blank} THEN 'blank' {whens} END"
        )
        columns["detail"] = (
            "CASE WHEN rreason IS NOT NULL THEN rdetail "
            f"WHEN reason IS NOT NULL AND reason <> 'blank' THEN CASE reason {details} END END"
        )
        columns["raw_out"] = (
            "CASE WHEN rreason IS NOT NULL THEN rraw "
            f"WHEN reason IS NOT NULL AND reason <> 'blank' THEN {raw} END"
        )
        return self.add(base, columns)

    def _with_pos(self, df: DataFrame, skip: int) -> DataFrame:
        """order_from_input: ``_pos``, the row's place among the rows the reader kept (+ header)."""
        F, W = self.F, self.W
        kept = df.filter("rreason IS NULL OR rreason = 'header'")
        refused = df.filter("rreason IS NOT NULL AND rreason <> 'header'")
        order = W.orderBy("_b", "_m", "_sub")
        # the header is among the kept rows, so it counts as the skipped line DuckDB adds back
        kept = kept.withColumn("_pos", F.row_number().over(order) + F.lit(self.ts_offset))
        return kept.unionByName(refused.withColumn("_pos", F.lit(None).cast("bigint")))

    def stage(self, spec: SourceSpec, src: int) -> DataFrame:
        F = self.F
        start = time.perf_counter()
        self.ts_offset = 0
        if self.config.order_from_input:
            time_col = spec.roles.get("time")
            if time_col is not None:
                raise ConfigError(
                    f"ingest: {spec.path} has a time column {time_col!r} and order_from_input is "
                    "set; order_from_input is for sources without one (drop it to use the column)"
                )
            if self.staged_parts:
                self.ts_offset = int(
                    self.spark.read.parquet(*self.staged_parts).agg(F.max("ts")).first()[0] or 0
                )
        df = self._parquet(spec) if spec.kind == "parquet" else self._text(spec)
        df = df.withColumn("src", F.lit(src).cast("int"))
        cols = ["src", "_b", "_m", "_sub", "raw_out", "reason", "detail"]
        cols += ["u_int", "u_str", "i_int", "i_str", "ts", "value"]
        path = self.workdir / f"staged-{src:04d}"
        try:
            df.select(*cols).write.mode("overwrite").parquet(str(path))
        except Exception as exc:  # pyspark raises its own tree; name the file
            if spec.kind == "parquet":
                raise FormatError(f"{spec.path}: not a readable Parquet file: {exc}") from None
            raise FormatError(f"{spec.path}: cannot be read as {spec.format}: {exc}") from None
        self.staged_parts.append(str(path))
        run = _Source(spec, src, seconds=time.perf_counter() - start)
        self.sources.append(run)
        return self.spark.read.parquet(str(path))

    def _text(self, spec: SourceSpec) -> DataFrame:
        F = self.F
        lines = self._reader_checks(self._lines(spec), spec.skip)
        if spec.kind == "lightgcn":
            f = (
                "CASE WHEN raw IS NULL THEN array('') "
                "WHEN instr(raw, '  ') > 0 OR instr(raw, '\\t') > 0 "
                "THEN split(trim(raw), '[ \\t\\n\\f\\r]+', -1) "
                "ELSE split(trim(raw), ' ', -1) END"
            )
            df = lines.withColumn("f", self.expr(f))
            items = (
                "CASE WHEN size(f) <= 1 THEN array(CAST(NULL AS STRING)) "
                "ELSE slice(f, 2, size(f) - 1) END"
            )
            df = df.select(
                "*",
                F.posexplode(self.expr(items)).alias("_sub", "item_text"),
            )
            df = self.add(
                df,
                {
                    "is_blank": "get(f, 0) = ''",
                    "user_text": "get(f, 0)",
                    "n_fields": "CAST(NULL AS INT)",
                    "json_ok": "TRUE",
                    "time_text": "CAST(NULL AS STRING)",
                    "value_text": "CAST(NULL AS STRING)",
                },
            ).drop("f")
            if self.config.order_from_input:
                df = self._with_pos(df, 0)
            return self._rules(df, spec, blank="is_blank")
        lines = lines.withColumn("_sub", F.lit(0))
        if self.config.order_from_input:
            lines = self._with_pos(lines, spec.skip)
        if spec.kind == "jsonl":
            lines = lines.withColumn("obj", self.expr("from_json(raw, 'MAP<STRING,STRING>')"))
            lines = lines.withColumn(
                "json_ok",
                self.expr("coalesce(obj IS NOT NULL AND startswith(ltrim(raw), '{'), false)"),
            )

            def field(role: str) -> Column:
                name = spec.roles.get(role)
                if name is None:
                    return F.lit(None).cast("string")
                return self.expr(f"CASE WHEN json_ok THEN element_at(obj, {_lit(name)}) END")

            df = lines.select(
                "*",
                F.lit(None).cast("int").alias("n_fields"),
                field("user").alias("user_text"),
                field("item").alias("item_text"),
                field("time").alias("time_text"),
                field("value").alias("value_text"),
            )
            return self._rules(df, spec, blank="raw IS NULL OR (NOT json_ok AND trim(raw) = '')")
        delim = spec.delimiter or ","
        if delim == " ":
            split = "split(trim(raw), '[ \\t\\n\\f\\r]+', -1)"
        elif spec.quoted:
            d = re.escape(delim) if delim != "\t" else "\t"
            pattern = _lit(f'{d}("(?:[^"]|"")*"|[^{d}]*)')
            unquote = (
                "x -> CASE WHEN length(x) >= 2 AND startswith(x, '\"') AND endswith(x, '\"') "
                "THEN replace(substr(x, 2, length(x) - 2), '\"\"', '\"') ELSE x END"
            )
            # DuckDB's fast path: every field quote-free or one quoted run without a quote inside.
            # Then no delimiter hides in a quoted field and unquoting drops every '"' (a regular
            # expression here, not a lambda per field: Spark runs lambdas interpreted).
            dc = "\\t" if delim == "\t" else re.escape(delim)
            field = f'(?:[^"{dc}]*|"[^"{dc}]*")'
            simple = f"raw RLIKE {_lit(f'^{field}(?:{dc}{field})*$')}"
            plain = f"split(raw, {_lit(re.escape(delim))}, -1)"
            split = (
                f"CASE WHEN instr(raw, '\"') = 0 THEN {plain} "
                f"WHEN {simple} THEN split(replace(raw, '\"', ''), {_lit(re.escape(delim))}, -1) "
                f"ELSE transform(regexp_extract_all({_lit(delim)} || raw, {pattern}, 1), "
                f"{unquote}) END"
            )
        else:
            split = f"split(raw, {_lit(re.escape(delim))}, -1)"

        def pick(role: str) -> Column:
            pos = spec.position(role)
            if pos is None:
                return F.lit(None).cast("string")
            return self.expr(f"get(f, {pos})")

        df = lines.withColumn("f", self.expr(split))
        df = df.select(
            "*",
            self.expr("size(f)").alias("n_fields"),
            F.lit(True).alias("json_ok"),
            pick("user").alias("user_text"),
            pick("item").alias("item_text"),
            pick("time").alias("time_text"),
            pick("value").alias("value_text"),
        ).drop("f")
        expected = len(spec.columns)
        return self._rules(
            df,
            spec,
            blank=f"raw IS NULL OR (n_fields <> {expected} AND trim(raw) = '')",
            expected=expected,
        )

    def _json_row(self, spec: SourceSpec, alias: dict[str, str]) -> str:
        """A Parquet row as JSON text, as DuckDB writes it (nulls kept, NaN/Infinity bare)."""
        fields = ", ".join(f"{_lit(c)}, {alias[c]}" for c in spec.columns)
        out = f"to_json(named_struct({fields}), map('ignoreNullFields', 'false'))"
        for c in spec.columns:
            if spec.column_types.get(c) == "float":
                key = json.dumps(c)
                pattern = _lit("([{,])" + re.escape(key) + ':"(NaN|-?Infinity)"')
                replacement = _lit("$1" + key.replace("$", "\\$") + ":$2")
                out = f"regexp_replace({out}, {pattern}, {replacement})"
        return out

    def _parquet(self, spec: SourceSpec) -> DataFrame:
        F = self.F
        types = spec.column_types
        alias = {c: f"_c{j}" for j, c in enumerate(spec.columns)}
        df = self.spark.read.parquet(str(spec.path))
        df = df.select(
            *(F.col(_ident(c)).alias(a) for c, a in alias.items()),
            F.col("_metadata.row_index").alias("_m"),
        )
        df = df.withColumn("_b", F.lit(0).cast("bigint")).withColumn("_sub", F.lit(0))

        def col(role: str) -> str | None:
            name = spec.roles.get(role)
            return None if name is None else alias[name]

        def text(role: str) -> Column:
            c = col(role)
            if c is None:
                return F.lit(None).cast("string")
            if types.get(spec.roles[role] or "") == "float":
                # DuckDB's spellings of the special values (Spark's are NaN, Infinity)
                return self.expr(
                    f"CASE WHEN isnan({c}) THEN 'nan' WHEN {c} = double('inf') THEN 'inf' "
                    f"WHEN {c} = double('-inf') THEN '-inf' ELSE CAST({c} AS STRING) END"
                )
            return self.expr(f"CAST({c} AS STRING)")

        overrides: dict[str, str] = {}
        for role, p in (("user", "u"), ("item", "i")):
            name = spec.roles[role]
            if name is not None and types.get(name) == "int":
                overrides[f"{p}_cast"] = f"CAST({alias[name]} AS BIGINT)"
                overrides[f"{p}_int"] = f"{p}_cast"
                overrides[f"{p}_str"] = "CAST(NULL AS STRING)"
        time_name = spec.roles.get("time")
        if time_name is not None:
            kind, c = types.get(time_name), alias[time_name]
            if kind == "int":
                overrides["ts"] = f"CAST({c} AS BIGINT)"
            elif kind == "float":
                overrides["ts"] = f"CASE WHEN abs({c}) < 9.0e18 THEN CAST(floor({c}) AS BIGINT) END"
            elif kind == "timestamp":
                overrides["ts"] = (
                    f"CAST(floor(unix_micros(CAST({c} AS TIMESTAMP)) / 1000000.0D) AS BIGINT)"
                )
        value_name = spec.roles.get("value")
        if value_name is not None and types.get(value_name) in ("int", "float"):
            overrides["value"] = f"CAST({alias[value_name]} AS DOUBLE)"
        if self.config.order_from_input:
            df = df.withColumn("_pos", self.expr(f"_m + 1 + {self.ts_offset}"))
        df = df.select(
            "*",
            F.lit(None).cast("int").alias("n_fields"),
            F.lit(True).alias("json_ok"),
            text("user").alias("user_text"),
            text("item").alias("item_text"),
            text("time").alias("time_text"),
            text("value").alias("value_text"),
            F.lit(None).cast("string").alias("rreason"),
            F.lit(None).cast("string").alias("rdetail"),
            F.lit(None).cast("string").alias("rraw"),
        )
        return self._rules(
            df, spec, blank="FALSE", overrides=overrides, raw=self._json_row(spec, alias)
        )

    # ----------------------------------------------------------------- the pipeline

    def run(self, plan: Plan, out: HadoopPath) -> EngineResult:
        F = self.F
        cfg = self.config
        self.staged_parts: list[str] = []
        for src, spec in enumerate(plan.sources):
            self.stage(spec, src)
        staged = self.spark.read.parquet(*self.staged_parts)
        # one pass for the tally and for whether any accepted id is text (then ids map as text)
        counts = (
            staged.groupBy("src", "reason")
            .agg(
                F.count("*").alias("n"),
                F.count("u_str").alias("u_text"),
                F.count("i_str").alias("i_text"),
            )
            .collect()
        )
        per_source, by_reason, skipped = tally(
            ((r["src"], r["reason"], r["n"]) for r in counts),
            [(run.src, run.spec) for run in self.sources],
        )
        has_str = {
            p: any(r[f"{p}_text"] for r in counts if r["reason"] is None) for p in ("u", "i")
        }
        per_src = {run.src: entry for run, entry in zip(self.sources, per_source, strict=True)}
        for run in self.sources:
            run.lines = per_src[run.src]["rows_in"]
            rate = run.lines / run.seconds if run.seconds > 0 else float("inf")
            self.say(
                f"{run.spec.path}: {run.lines:,} rows in {run.seconds:.2f}s ({rate:,.0f} rows/s)"
            )
        n_input = sum(s["rows_in"] for s in per_source)
        if n_input == 0:
            files = ", ".join(str(s.path) for s in plan.sources)
            raise InputError(f"no input rows: the sources hold no data rows ({files})")
        n_accepted = sum(s["accepted"] for s in per_source)
        if n_accepted == 0:
            examples = (
                staged.filter("reason IS NOT NULL AND reason NOT IN ('blank', 'header')")
                .orderBy("src", "_b", "_m", "_sub")
                .select("src", "reason", "detail")
                .limit(3)
                .collect()
            )
            reasons = ", ".join(f"{k} {v:,}" for k, v in by_reason.items() if v)
            first = "; ".join(
                f"{plan.sources[r['src']].path}: {r['reason']} ({r['detail']})" for r in examples
            )
            raise InputError(
                f"none of the {n_input:,} input rows was accepted (rejected: {reasons}); "
                f"for example {first}"
            )
        accepted = staged.filter("reason IS NULL")

        # id maps: ascending integers when every id of the role is one, else ascending text
        keys = {
            p: f"CAST(coalesce({p}_str, CAST({p}_int AS STRING)) AS STRING)"
            if has_str[p]
            else f"{p}_int"
            for p in ("u", "i")
        }
        maps = {
            p: self.dense_index(
                accepted.select(self.expr(keys[p]).alias("k")).distinct(), [F.col("k")], f"{p}map"
            )
            for p in ("u", "i")
        }
        joined = (
            accepted.withColumn("_uk", self.expr(keys["u"]))
            .withColumn("_ik", self.expr(keys["i"]))
            .join(
                maps["u"][0].select(F.col("k").alias("_uk"), F.col("idx").alias("user_idx")),
                "_uk",
            )
            .join(
                maps["i"][0].select(F.col("k").alias("_ik"), F.col("idx").alias("item_idx")),
                "_ik",
            )
            .select("user_idx", "item_idx", "ts", "value", "src", "_b", "_m", "_sub")
        )
        kcore = cfg.min_user_interactions > 1 or cfg.min_item_interactions > 1
        rows = cfg.rows_per_group
        (out / "interactions").mkdir()
        inter_dir = out / "interactions"
        stats = self.F.count("*").alias("n"), *_STAT_AGGS(self.F)
        removed, n_kcore, kc = 0, 0, None
        given = None
        if not kcore and not plan.given_split:
            # the common path: dedupe and the final order share one shuffle, and the final rows
            # are written as they come out of it (the report's figures observed on the way)
            observed = _spark().Observation("final")
            final = self.dedupe(joined).observe(observed, *stats)
            n_inter = self.write_parts(
                final.select(*INTERACTIONS_SCHEMA.names),
                inter_dir,
                INTERACTIONS_SCHEMA,
                rows_per_group=rows,
                rows_per_file=4 * rows,
            )
            figures = observed.get
            umap, n_users = maps["u"]
            imap, n_items = maps["i"]
            written = self.spark.read.parquet(str(inter_dir))
        else:
            if kcore:
                joined = self.save(joined, "joined")
            pairs = self.save(
                self.dedupe(joined).withColumn("removed", F.lit(None).cast("int")), "pairs-0"
            )
            removed, pairs = self.kcore(pairs)
            if removed and removed == pairs.count():
                raise InputError(
                    f"the k-core filter (min_user_interactions={cfg.min_user_interactions}, "
                    f"min_item_interactions={cfg.min_item_interactions}) removed all "
                    f"{removed:,} interactions; lower the minimums"
                )
            final, (umap, n_users), (imap, n_items) = self.finalize(
                pairs, maps["u"], maps["i"], removed
            )
            order = [F.col("user_idx"), F.col("item_idx")]
            if cfg.dedupe == "none":
                order += [F.col("ts").asc_nulls_first(), *map(F.col, ("src", "_b", "_m", "_sub"))]
            else:
                # unique pairs: the rest of the order only makes it total
                order += [F.col("ts").asc_nulls_first(), F.col("value")]
            n_inter = self.write_parts(
                final.orderBy(*order).select(*INTERACTIONS_SCHEMA.names),
                inter_dir,
                INTERACTIONS_SCHEMA,
                rows_per_group=rows,
                rows_per_file=4 * rows,
            )
            figures = final.agg(*stats).first().asDict()
            written = final
            if plan.given_split:
                given = {"counts": {"train": 0, "valid": 0, "test": 0}, "users": {}}
                for run in self.sources:
                    part = run.spec.part
                    if part:
                        sub = final.filter(F.col("src") == run.src)
                        given["counts"][part] = self.write_parts(
                            sub.orderBy(*order).select(*INTERACTIONS_SCHEMA.names),
                            out / "splits" / "given" / part,
                            INTERACTIONS_SCHEMA,
                            rows_per_group=rows,
                            rows_per_file=4 * rows,
                        )
                        given["users"][part] = sub.select("user_idx").distinct().count()
            if removed:
                kc = self.kcore_rows(joined, pairs)
                n_kcore = kc.count()
                by_reason["kcore"] = n_kcore
                for row in kc.groupBy("src").count().collect():
                    entry = per_src[int(row["src"])]
                    entry["accepted"] -= int(row["count"])
                    entry["rejected"] += int(row["count"])
        if n_inter != figures["n"]:  # pragma: no cover - an engine bug, never user input
            raise RuntimeError(f"interactions written {n_inter} != counted {figures['n']}")
        meta_cols = self.id_tables(plan, umap, imap, out)
        n_rej = self.rejected(staged, kc, out / "rejected")
        n_rejected = sum(by_reason.values())
        if n_rej != n_rejected:  # pragma: no cover - an engine bug, never user input
            raise RuntimeError(f"rejected rows written {n_rej} != counted {n_rejected}")
        folded = (n_accepted - n_kcore) - n_inter
        duplicates = folded
        if cfg.dedupe == "none":
            duplicates = n_inter - written.select("user_idx", "item_idx").distinct().count()
        return EngineResult(
            source_rows=per_source,
            rejected_by_reason=by_reason,
            skipped_lines=skipped,
            n_input=n_input,
            n_rejected=n_rejected,
            n_interactions=n_inter,
            n_users=n_users,
            n_items=n_items,
            duplicates=duplicates,
            folded=folded,
            given_split=given,
            quality_stats=self.stats(written, n_users, n_items, figures),
            meta_columns=meta_cols,
            warnings=self.warnings,
        )

    def dedupe(self, joined: DataFrame) -> DataFrame:
        """One row per (user, item) pair as the policy says, in (user_idx, item_idx) order.

        The rows are range-partitioned by (user_idx, item_idx) once: the window or aggregate per
        pair needs no other shuffle, and each task's rows, sorted, follow the previous task's, so
        the result is in the final order without a second sort.
        """
        F, W = self.F, self.W
        policy = self.config.dedupe
        ranged = joined.repartitionByRange("user_idx", "item_idx")
        if policy in ("keep-last", "keep-first"):
            tie = (
                [
                    F.col("ts").desc_nulls_last(),
                    *(F.col(c).desc() for c in ("src", "_b", "_m", "_sub")),
                ]
                if policy == "keep-last"
                else [
                    F.col("ts").asc_nulls_first(),
                    *(F.col(c).asc() for c in ("src", "_b", "_m", "_sub")),
                ]
            )
            w = W.partitionBy("user_idx", "item_idx").orderBy(*tie)
            pairs = ranged.withColumn("_r", F.row_number().over(w)).filter("_r = 1")
        elif policy == "none":
            pairs = ranged.sortWithinPartitions(
                "user_idx",
                "item_idx",
                F.col("ts").asc_nulls_first(),
                *map(F.col, ("src", "_b", "_m", "_sub")),
            )
        else:
            weight = F.col("value") if policy == "sum" else F.lit(1.0)
            pairs = ranged.groupBy("user_idx", "item_idx").agg(
                F.max("ts").alias("ts"),
                F.sum(weight).cast("double").alias("value"),
                F.max_by("src", F.struct("src", "_b", "_m", "_sub")).alias("src"),
                F.max(F.struct("src", "_b", "_m", "_sub")).alias("_last"),
            )
            pairs = pairs.select(
                "user_idx",
                "item_idx",
                "ts",
                "value",
                "src",
                F.col("_last._b").alias("_b"),
                F.col("_last._m").alias("_m"),
                F.col("_last._sub").alias("_sub"),
            ).sortWithinPartitions("user_idx", "item_idx")
        return pairs.select("user_idx", "item_idx", "ts", "value", "src", "_b", "_m", "_sub")

    def kcore(self, pairs: DataFrame) -> tuple[int, DataFrame]:
        """Mark pairs removed by the k-core filter, round by round; how many, and the pairs."""
        F = self.F
        min_u, min_i = self.config.min_user_interactions, self.config.min_item_interactions
        if min_u <= 1 and min_i <= 1:
            return 0, pairs
        removed, round_ = 0, 0
        while True:
            round_ += 1
            alive = pairs.filter("removed IS NULL")
            low_u = (
                alive.groupBy("user_idx")
                .count()
                .filter(F.col("count") < min_u)
                .select("user_idx", F.lit(True).alias("_lu"))
            )
            low_i = (
                alive.groupBy("item_idx")
                .count()
                .filter(F.col("count") < min_i)
                .select("item_idx", F.lit(True).alias("_li"))
            )
            marked = (
                pairs.join(low_u, "user_idx", "left")
                .join(low_i, "item_idx", "left")
                .withColumn(
                    "removed",
                    F.when(
                        F.col("removed").isNull() & (F.col("_lu") | F.col("_li")),
                        F.lit(round_),
                    ).otherwise(F.col("removed")),
                )
                .drop("_lu", "_li")
            )
            pairs = self.save(marked, f"pairs-{round_}")
            changed = pairs.filter(F.col("removed") == round_).count()
            if changed == 0:
                break
            removed += changed
        self.say(f"k-core: {removed:,} (user, item) pairs removed in {round_ - 1} rounds")
        return removed, pairs

    def finalize(
        self,
        pairs: DataFrame,
        umap: tuple[DataFrame, int],
        imap: tuple[DataFrame, int],
        removed: int,
    ) -> tuple[DataFrame, tuple[DataFrame, int], tuple[DataFrame, int]]:
        """The final interactions (unordered) and the id maps with their final indices."""
        F = self.F
        alive = pairs.filter("removed IS NULL")
        if not removed:
            return alive, umap, imap
        finals = []
        for (m, _), role in ((umap, "user"), (imap, "item")):
            kept = alive.select(F.col(f"{role}_idx").alias("idx")).distinct()
            survivors = m.join(kept, "idx", "left_semi").withColumnRenamed("idx", "old")
            finals.append(self.dense_index(survivors, [F.col("old")], f"{role}final"))
        ufinal, ifinal = finals
        final = (
            alive.join(
                ufinal[0].select(F.col("old").alias("user_idx"), F.col("idx").alias("u2")),
                "user_idx",
            )
            .join(
                ifinal[0].select(F.col("old").alias("item_idx"), F.col("idx").alias("i2")),
                "item_idx",
            )
            .drop("user_idx", "item_idx")
            .withColumnRenamed("u2", "user_idx")
            .withColumnRenamed("i2", "item_idx")
        )
        return self.save(final, "final"), ufinal, ifinal

    def id_tables(
        self, plan: Plan, umap: DataFrame, imap: DataFrame, out: HadoopPath
    ) -> dict[str, list[str]]:
        """users.parquet / items.parquet: the maps, joined with the metadata files by DuckDB.

        The maps come to the driver as Arrow (one row an id; the tables are built in memory
        anyway), metadata files are copied to a local folder for DuckDB, and the two tables are
        copied to ``out`` when written.
        """
        from recscale.ingest.duckdb_engine import DuckDBIngest

        with (
            tempfile.TemporaryDirectory(prefix="recscale-ids-") as tmp,
            contextlib.ExitStack() as stack,
        ):
            local = Path(tmp)
            names: dict[str, str] = {}

            def fetch(meta: MetaSpec) -> MetaSpec:
                copy = stack.enter_context(self.files.local_copy(meta.path))
                names[str(copy)] = str(meta.path)
                return dataclasses.replace(meta, path=copy)

            users_meta = [fetch(m) for m in plan.users_meta]
            items_meta = [fetch(m) for m in plan.items_meta]
            duck = DuckDBIngest(self.config, local, progress=False)
            try:
                for m, name in ((umap, "ufinal"), (imap, "ifinal")):
                    duck.con.register(name, m.select("k", "idx").toArrow())
                columns = {
                    "users": duck.write_id_table(
                        "users", users_meta, None, local / "users.parquet"
                    ),
                    "items": duck.write_id_table(
                        "items", items_meta, None, local / "items.parquet"
                    ),
                }
            except FormatError as exc:
                message = str(exc)
                for copy, original in names.items():
                    message = message.replace(copy, original)
                raise FormatError(message) from None
            finally:
                duck.close()
            for name in ("users", "items"):
                self.files.copy_from_local(local / f"{name}.parquet", out / f"{name}.parquet")
        return columns

    def _line_numbers(self, rows: DataFrame) -> DataFrame:
        """``line`` of rows of text sources from their block and position; Parquet: row + 1."""
        F = self.F
        staged = self.spark.read.parquet(*self.staged_parts)
        blocks = (
            staged.groupBy("src", "_b")
            .agg(F.min("_m").alias("_m0"), (F.max("_m") - F.min("_m") + 1).alias("_n"))
            .collect()
        )
        offsets = []
        by_src: dict[int, list[tuple[int, int, int]]] = {}
        for r in blocks:
            by_src.setdefault(int(r["src"]), []).append((int(r["_b"]), int(r["_m0"]), int(r["_n"])))
        for src, bs in by_src.items():
            total = 0
            for b, m0, n in sorted(bs):
                offsets.append((src, b, m0, total))
                total += n
        offs = self.values(offsets, "src INT, _b BIGINT, _m0 BIGINT, _off BIGINT")
        return rows.join(F.broadcast(offs), ["src", "_b"]).withColumn(
            "line", F.col("_off") + F.col("_m") - F.col("_m0") + 1
        )

    def kcore_rows(self, joined: DataFrame, pairs: DataFrame) -> DataFrame:
        """Every accepted row of a removed pair, with its raw text read from its file again."""
        F = self.F
        min_u, min_i = self.config.min_user_interactions, self.config.min_item_interactions
        detail = (
            f"(user, item) pair removed by the k-core filter (min_user_interactions={min_u}, "
            f"min_item_interactions={min_i}) in round "
        )
        gone = pairs.filter("removed IS NOT NULL").select("user_idx", "item_idx", "removed")
        rows = joined.join(gone, ["user_idx", "item_idx"]).select(
            "src",
            "_b",
            "_m",
            "_sub",
            F.lit("kcore").alias("reason"),
            F.concat(F.lit(detail), F.col("removed").cast("string")).alias("detail"),
        )
        raws = []
        for run in self.sources:
            spec = run.spec
            if spec.kind == "parquet":
                alias = {c: f"_c{j}" for j, c in enumerate(spec.columns)}
                df = self.spark.read.parquet(str(spec.path)).select(
                    *(F.col(_ident(c)).alias(a) for c, a in alias.items()),
                    F.col("_metadata.row_index").alias("_m"),
                )
                df = df.select(
                    F.lit(run.src).alias("src"),
                    F.lit(0).cast("bigint").alias("_b"),
                    "_m",
                    self.expr(self._json_row(spec, alias)).alias("raw_out"),
                )
            else:
                df = self._reader_checks(self._lines(spec), spec.skip).select(
                    F.lit(run.src).alias("src"), "_b", "_m", F.col("raw").alias("raw_out")
                )
            raws.append(df)
        allraw = raws[0]
        for df in raws[1:]:
            allraw = allraw.unionByName(df)
        return self.save(rows.join(allraw, ["src", "_b", "_m"]), "kcore")

    def rejected(self, staged: DataFrame, kc: DataFrame | None, directory: HadoopPath) -> int:
        F = self.F
        rows = staged.filter("reason IS NOT NULL AND reason NOT IN ('blank', 'header')").select(
            "src", "_b", "_m", "_sub", "raw_out", "reason", "detail"
        )
        if kc is not None:
            rows = rows.unionByName(kc.select(*rows.columns))
        parquet_src = [s.src for s in self.sources if s.spec.kind == "parquet"]
        text = self._line_numbers(rows.filter(~F.col("src").isin(parquet_src)))
        text = text.select(*rows.columns, "line")
        pq_rows = rows.filter(F.col("src").isin(parquet_src)).withColumn("line", F.col("_m") + 1)
        paths = self.values(
            [(s.src, str(s.spec.path)) for s in self.sources], "src INT, source STRING"
        )
        out = (
            text.unionByName(pq_rows)
            .join(F.broadcast(paths), "src")
            .orderBy("src", "line", "_sub")
            .select(
                "source",
                "line",
                F.col("raw_out").alias("raw"),
                "reason",
                "detail",
            )
        )
        return self.write_parts(
            out, directory, REJECTED_SCHEMA, rows_per_group=1 << 20, rows_per_file=4 << 20
        )

    def stats(
        self, final: DataFrame, n_users: int, n_items: int, figures: dict[str, Any]
    ) -> dict[str, Any]:
        """The report's shape statistics: counts of counts from ``final``, the rest ``figures``."""
        F = self.F
        hists = []
        for role in ("user", "item"):
            rows = (
                final.groupBy(f"{role}_idx").count().groupBy("count").agg(F.count("*").alias("f"))
            ).collect()
            hists.append({int(r["count"]): int(r["f"]) for r in rows})
        f = figures
        return quality.stats_from_counts(
            n_users,
            n_items,
            hists[0],
            hists[1],
            (f["ts_min"], f["ts_max"], int(f["ts_missing"])),
            (f["v_min"], f["v_max"], f["v_mean"]),
        )


def _STAT_AGGS(F: Any) -> tuple[Column, ...]:
    """The report's figures of the final interactions, as aggregates (observed or computed)."""
    return (
        F.min("ts").alias("ts_min"),
        F.max("ts").alias("ts_max"),
        (F.count(F.lit(1)) - F.count("ts")).alias("ts_missing"),
        F.min("value").alias("v_min"),
        F.max("value").alias("v_max"),
        F.avg("value").alias("v_mean"),
    )


_SPARK_TYPES = {
    pa.int32(): "INT",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.string(): "STRING",
}


def _write_ordered(
    df: DataFrame,
    staging: HadoopPath,
    schema: pa.Schema,
    *,
    rows_per_group: int,
    rows_per_file: int,
    partition_by: str | None = None,
) -> None:
    """``df`` as Parquet files under ``staging`` in the dataset's schema, row groups and sizes.

    Each task writes its rows in order, in files of ``rows_per_file`` rows with row groups of
    ``rows_per_group`` (zstd); the files' names sort in task order. Columns the schema declares
    non-null never hold NULL here (inner joins to the id maps; the rules reject a missing value),
    and a ``coalesce`` with a constant lets Spark write them as required, as the schema says.
    """
    F = _spark().functions
    cols = []
    for field in schema:
        c = F.col(field.name).cast(_SPARK_TYPES[field.type])
        if not field.nullable:
            zero = "" if pa.types.is_string(field.type) else 0
            c = F.coalesce(c, F.lit(zero).cast(_SPARK_TYPES[field.type]))
        cols.append(c.alias(field.name))
    if partition_by is not None:
        cols.append(F.col(partition_by))
    writer = (
        df.select(*cols)
        .write.mode("overwrite")
        .option("compression", "zstd")
        .option("parquet.block.row.count.limit", str(rows_per_group))
        # row groups are cut by rows, never by bytes
        .option("parquet.block.size", str(1 << 40))
        .option("maxRecordsPerFile", str(rows_per_file))
    )
    if partition_by is not None:
        writer = writer.partitionBy(partition_by)
    writer.parquet(str(staging))


def _adopt_parts(
    spark: SparkSession, staging: HadoopPath, directory: HadoopPath, schema: pa.Schema
) -> int:
    """Move the files Spark wrote under ``staging`` to ``directory/part-00000.parquet``, ... in
    order; returns their rows. A part with no rows still gets one (empty) file."""
    files = staging.fs
    found = sorted(staging.glob("part-*.parquet")) if staging.is_dir() else []
    directory.mkdir(parents=True, exist_ok=True)
    if not found:
        with tempfile.TemporaryDirectory(prefix="recscale-empty-") as tmp:
            empty = Path(tmp) / "part-00000.parquet"
            pq.write_table(schema.empty_table(), empty, compression="zstd")
            files.copy_from_local(empty, directory / "part-00000.parquet")
        return 0
    n = spark.read.parquet(*map(str, found)).count()
    for i, f in enumerate(found):
        files.rename(f, directory / f"part-{i:05d}.parquet")
    return int(n)


def run_spark(
    plan: Plan,
    config: IngestConfig,
    out: HadoopPath,
    workdir: HadoopPath,
    *,
    existing: Dataset | None,
    progress: bool,
    spark: SparkSession | None = None,
) -> EngineResult:
    """Ingest ``plan`` into the (empty) directory ``out`` with Spark; see the module docstring.

    ``out`` and ``workdir`` are paths of :class:`recscale.ingest.hadoop.HadoopFS` (the work
    directory must be visible to every executor: it holds the intermediate tables).
    """
    if existing is not None:
        raise ConfigError(
            "ingest: append is not available with engine 'spark'; append with engine 'duckdb', "
            "or ingest every source again into a new dataset"
        )
    session = spark if spark is not None else spark_session()
    with _settings(session):
        engine = SparkIngest(session, config, workdir, progress)
        return engine.run(plan, out)


# --------------------------------------------------------------------------- split


def spark_assign(
    ds: Dataset, config: SplitConfig, spark: SparkSession | None = None
) -> tuple[Any, dict[str, Any], Any]:
    """The split's rows labelled with their part (0 train, 1 valid, 2 test), as Spark computes them.

    Returns ``(assigned DataFrame, split.json fields, the session)``; the labels are those of the
    DuckDB queries in :mod:`recscale.ingest.split`, row for row. The rows are range-partitioned by
    ``user_idx`` (what :func:`write_split_parts` needs): the per-user windows use that partitioning,
    so assigning and ordering the parts take one shuffle.
    """
    from recscale.errors import SplitNotFoundError
    from recscale.ingest import split as sp

    session = spark if spark is not None else spark_session()
    sql = _spark()
    F = sql.functions

    def read(directory: Any) -> DataFrame:
        files = sorted(directory.glob("part-*.parquet"))
        if not files:
            raise DatasetError(f"{directory}: no part-*.parquet files")
        return session.read.parquet(*map(str, files))

    def hashed(df: DataFrame, seed: int) -> DataFrame:
        return _with_duckdb_hash(df, seed)

    def random_parts(df: DataFrame, seed: int, tf: float, vf: float) -> DataFrame:
        W = sql.Window
        df = hashed(df.repartitionByRange("user_idx"), seed)
        w = W.partitionBy("user_idx").orderBy(
            "h", "item_idx", F.col("ts").asc_nulls_last(), "value"
        )
        df = df.withColumn("r", F.row_number().over(w)).withColumn(
            "n", F.count("*").over(W.partitionBy("user_idx"))
        )
        df = df.withColumn("n_test", F.expr(f"floor(n * {sp._decimal(tf)} + 0.5)"))
        part = (
            f"CASE WHEN r <= n_test THEN {sp.TEST} "
            f"WHEN r <= n_test + floor((n - n_test) * {sp._decimal(vf)} + 0.5) THEN {sp.VALID} "
            f"ELSE {sp.TRAIN} END"
        )
        return df.withColumn("part", F.expr(part).cast("tinyint")).select(*_COLS, "part")

    with _settings(session):
        strategy = config.strategy
        if strategy == "leave-last":
            src = read(ds.path / "interactions")
            n_rows, n_timed = src.agg(F.count("*"), F.count("ts")).first()
            k = int(config.k)
            valid_k = 2 * k if config.valid else k
            W = sql.Window
            df = hashed(src.repartitionByRange("user_idx"), config.seed)
            w = W.partitionBy("user_idx").orderBy(
                F.col("ts").desc_nulls_last(),
                F.expr("CASE WHEN ts IS NULL THEN h END").desc_nulls_last(),
                F.col("item_idx").desc(),
                F.col("value").desc(),
                F.col("h").desc(),
            )
            df = df.withColumn("r", F.row_number().over(w)).withColumn(
                "n", F.count("*").over(W.partitionBy("user_idx"))
            )
            part = (
                f"CASE WHEN n < {int(config.min_history)} THEN {sp.TRAIN} "
                f"WHEN r <= {k} THEN {sp.TEST} WHEN r <= {valid_k} THEN {sp.VALID} "
                f"ELSE {sp.TRAIN} END"
            )
            assigned = df.withColumn("part", F.expr(part).cast("tinyint")).select(*_COLS, "part")
            meta = {
                "has_valid": config.valid,
                "order": "time" if n_timed > 0 else "random",
                "rows_without_ts": int(n_rows - n_timed),
                "source_rows": int(n_rows),
            }
        elif strategy == "temporal":
            src = read(ds.path / "interactions")
            n_rows, n_timed = src.agg(F.count("*"), F.count("ts")).first()
            if n_rows == 0:
                raise DatasetError(f"{ds.path}: the dataset has no interactions to split in time")
            if n_timed < n_rows:
                raise DatasetError(
                    f"{ds.path}: {n_rows - n_timed} of {n_rows} interactions have no timestamp (ts "
                    "is null), so they cannot be placed before or after a time cutoff; use "
                    "strategy 'leave-last' (orders by time where known) or 'random'"
                )
            test_cutoff = (
                config.cutoff
                if config.cutoff is not None
                else _quantile_disc(src, "ts", float(config.test_quantile), n_rows)
            )
            valid_cutoff = None
            if config.valid:
                if config.valid_cutoff is not None:
                    valid_cutoff = config.valid_cutoff
                elif config.valid_quantile is not None:
                    valid_cutoff = _quantile_disc(src, "ts", float(config.valid_quantile), n_rows)
            sp.check_cutoffs(config, test_cutoff, valid_cutoff)
            valid_clause = (
                f"WHEN ts >= {int(valid_cutoff)} THEN {sp.VALID}"
                if valid_cutoff is not None
                else ""
            )
            part = f"CASE WHEN ts >= {int(test_cutoff)} THEN {sp.TEST} {valid_clause} ELSE {sp.TRAIN} END"
            assigned = (
                src.repartitionByRange("user_idx")
                .withColumn("part", F.expr(part).cast("tinyint"))
                .select(*_COLS, "part")
            )
            test_users = assigned.filter(F.col("part") == sp.TEST).select("user_idx").distinct()
            train_users = assigned.filter(F.col("part") == sp.TRAIN).select("user_idx").distinct()
            cold = test_users.join(train_users, "user_idx", "left_anti").count()
            meta = {
                "has_valid": valid_cutoff is not None,
                "test_cutoff": int(test_cutoff),
                "valid_cutoff": None if valid_cutoff is None else int(valid_cutoff),
                "test_users_without_train": int(cold),
                "source_rows": int(n_rows),
            }
        elif strategy == "random":
            src = read(ds.path / "interactions")
            vf = config.valid_fraction if config.valid else 0.0
            assigned = random_parts(src, config.seed, config.test_fraction, vf)
            meta = {"has_valid": config.valid, "source_rows": int(src.count())}
        else:
            try:
                given = ds.split("given")
            except SplitNotFoundError:
                raise SplitNotFoundError(sp.NO_GIVEN.format(path=ds.path)) from None
            for part_name in ("train", "test"):
                if not given.has(part_name):
                    raise DatasetError(f"{given.path}: the given split has no {part_name!r} part")
            train, test = read(given.path / "train"), read(given.path / "test")
            test = test.select(*_COLS, F.lit(sp.TEST).cast("tinyint").alias("part"))
            if given.has("valid"):
                valid_part = sp.VALID if config.valid else sp.TRAIN
                rest = train.select(
                    *_COLS, F.lit(sp.TRAIN).cast("tinyint").alias("part")
                ).unionByName(
                    read(given.path / "valid").select(
                        *_COLS, F.lit(valid_part).cast("tinyint").alias("part")
                    )
                )
                valid_from = "given" if config.valid else None
            elif config.valid:
                rest = random_parts(train, config.seed, 0.0, config.valid_fraction)
                valid_from = "train"
            else:
                rest = train.select(*_COLS, F.lit(sp.TRAIN).cast("tinyint").alias("part"))
                valid_from = None
            assigned = test.unionByName(rest).repartitionByRange("user_idx")
            meta = {
                "has_valid": config.valid,
                "source": "splits/given",
                "valid_from": valid_from,
                "source_rows": int(assigned.count()),
            }
        return assigned, meta, session


_COLS = ("user_idx", "item_idx", "ts", "value")


def _quantile_disc(df: DataFrame, col: str, q: float, n: int) -> int:
    """DuckDB's ``quantile_disc(col, q)``: the value at position max(1, n - floor(n - n*q)).

    Found without a global sort: count rows per coarse bucket of the value, keep the bucket that
    holds the position, and narrow it (each pass collects at most 65,536 small rows).
    """
    F = _spark().functions
    pos = max(1, n - math.floor(n - q * n))
    lo, hi = df.agg(F.min(col), F.max(col)).first()
    shift = max(0, (int(hi) - int(lo)).bit_length() - 16)
    base = int(lo)
    before = 0
    sub = df.select(F.col(col).alias("v"))
    while True:
        buckets = (
            sub.groupBy(F.shiftright(F.col("v") - F.lit(base), shift).alias("k"))
            .count()
            .orderBy("k")
            .collect()
        )
        for row in buckets:
            if before + row["count"] >= pos:
                k = int(row["k"])
                break
            before += row["count"]
        if shift == 0:
            return base + k
        start = base + (k << shift)
        sub = sub.filter((F.col("v") >= start) & (F.col("v") < start + (1 << shift)))
        base = start
        shift = max(0, shift - 16)


def write_split_parts(
    assigned: DataFrame, parts: Sequence[int], out: HadoopPath, workdir: HadoopPath
) -> tuple[dict[str, int], dict[str, int]]:
    """Each part of ``assigned`` in the split's one output order; (rows, users) per part name.

    ``assigned`` is range-partitioned by ``user_idx`` (as :func:`spark_assign` returns it), so
    sorting each task's rows by (part, user_idx, ts, item_idx, value) puts every part in its
    global order across the tasks' files; one write makes all parts (a folder each).
    """
    from recscale.ingest import split as sp

    F = _spark().functions
    spark = assigned.sparkSession
    counts = {"train": 0, "valid": 0, "test": 0}
    with _settings(spark):
        staged = workdir / "assigned"
        ordered = assigned.sortWithinPartitions(
            "part", "user_idx", F.col("ts").asc_nulls_first(), "item_idx", "value"
        )
        _write_ordered(
            ordered,
            staged,
            INTERACTIONS_SCHEMA,
            rows_per_group=ROWS_PER_GROUP,
            rows_per_file=4 * ROWS_PER_GROUP,
            partition_by="part",
        )
        users = {
            int(r["part"]): int(r["n"])
            for r in spark.read.parquet(str(staged))
            .groupBy("part")
            .agg(F.countDistinct("user_idx").alias("n"))
            .collect()
        }
        for part in parts:
            name = sp._PART_NAMES[part]
            counts[name] = _adopt_parts(
                spark, staged / f"part={part}", out / name, INTERACTIONS_SCHEMA
            )
    return counts, {sp._PART_NAMES[p]: users.get(p, 0) for p in parts}
