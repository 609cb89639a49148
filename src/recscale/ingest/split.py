"""Splitting a dataset into train / valid / test: ``splits/<name>/`` beside its interactions.

Every strategy is one DuckDB query that labels each interaction with its part; DuckDB runs it
out-of-core (window functions over Parquet, spilling to disk under ``memory_limit``), so no row ever
passes through Python. The labelled rows are written part by part in one total order
``(user_idx, ts, item_idx, value)``, which makes the files of a split a pure function of the
dataset, the strategy and the seed — whatever the number of threads.

Randomness comes from ``hash(seed, user_idx, item_idx, ts, value)``: a row's random key depends on
its content only, never on the order DuckDB happens to read rows in. Rows that are equal in all
four columns are interchangeable, so which copy lands where cannot change any part's content.

Strategies (``SplitConfig.strategy``):

``leave-last``
    Per user, in time order (ties: ``item_idx``, then ``value``, then the seeded hash), the last
    ``k`` interactions go to test and the ``k`` before them to valid; users with fewer than
    ``min_history`` interactions keep everything in train. Without timestamps the order is the
    seeded hash (``"order": "random"`` in ``split.json``); rows without a timestamp among timed
    ones count as the oldest.
``temporal``
    One global time cutoff: test is ``ts >= test cutoff``, valid is ``valid cutoff <= ts < test
    cutoff``, train is everything before — no interaction from the future is in train. Cutoffs are
    ``quantile_disc`` of the timestamps (real timestamps of the data) or explicit unix times.
``random``
    Per user, ``round(n * test_fraction)`` interactions chosen by the seeded hash go to test and
    ``round((n - n_test) * valid_fraction)`` of the rest to valid (``round`` halves up).
``given``
    The split the source files came in (``splits/given``, written at ingest, e.g. LightGCN's
    train/test files), copied to ``name``; with ``valid`` a per-user random ``valid_fraction`` of
    its train becomes valid, unless the given split already has a valid part.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from recscale.config import SplitConfig
from recscale.dataset import (
    INTERACTIONS_SCHEMA,
    Dataset,
    Manifest,
    Split,
    atomic_directory,
    open_dataset,
    write_parquet_parts,
)
from recscale.errors import ConfigError, DatasetError, SplitNotFoundError
from recscale.ingest.files import LOCAL_FILES, Files, refuse_uris

__all__ = ["make_split"]

log = logging.getLogger(__name__)

TRAIN, VALID, TEST = 0, 1, 2
_PART_NAMES = {TRAIN: "train", VALID: "valid", TEST: "test"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ROWS_PER_BATCH = 1 << 20
# the one output order: per user, in time, so sequential models can stream a user's history
_OUTPUT_ORDER = "user_idx, ts NULLS FIRST, item_idx, value"
_COLUMNS = "user_idx, item_idx, ts, value"
ENGINES = ("duckdb", "spark")


def make_split(
    dataset: str | Path | Dataset,
    config: SplitConfig = SplitConfig(),  # noqa: B008 - frozen, so a shared default is safe
    *,
    engine: str = "duckdb",
    spark: Any = None,
) -> Split:
    """Split ``dataset`` as ``config`` says and return the new :class:`Split`.

    Writes ``splits/<name>/{train,valid,test}/part-*.parquet`` and ``split.json`` atomically: on
    any failure an existing split of that name is left exactly as it was. ``valid`` is absent when
    ``config.valid`` is false (``counts.valid`` is then 0).

    ``engine="spark"`` computes the same parts with Spark (``spark``: a SparkSession, else the
    active one or a new local one); the parts hold the same rows as DuckDB's. It reads and writes
    through the session's Hadoop filesystems, so ``dataset`` may be a URI (``hdfs://``,
    ``s3a://``, ``file://``, ...), and the returned split's paths are Hadoop paths.
    """
    if engine not in ENGINES:
        raise ConfigError(
            f"split: engine {engine!r} is unknown; expected one of "
            + ", ".join(repr(e) for e in ENGINES)
        )
    if config.strategy not in _STRATEGIES:
        raise ConfigError(
            f"split: strategy {config.strategy!r} is unknown; "
            f"expected one of {', '.join(repr(s) for s in _STRATEGIES)}"
        )
    if not -(2**63) <= config.seed < 2**63:
        raise ConfigError(f"split: seed must fit in 64 bits, got {config.seed!r}")
    files: Files = LOCAL_FILES
    if engine == "spark":
        from recscale.ingest.hadoop import HadoopFS
        from recscale.ingest.spark_engine import _spark, spark_session

        _spark()
        spark = spark if spark is not None else spark_session()
        files = HadoopFS(spark)
        where = dataset.path if isinstance(dataset, Dataset) else dataset
        ds = open_dataset(files.path(str(where)))
    else:
        if not isinstance(dataset, Dataset):
            refuse_uris("split", [str(dataset)])
        ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    name = config.name if config.name is not None else config.strategy
    if config.name is None:
        log.info("split: no name given, so the split is named after its strategy: %r", name)
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"split: name {name!r} is not a valid split name; expected letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    resolved = dataclasses.replace(config, name=name)

    splits_root = ds.path / "splits"
    splits_root.mkdir(exist_ok=True)
    # the engine spills beside the dataset: the disk that holds the data has room for its sorts
    spill = files.make_temp_dir(splits_root, ".split-spill-")
    try:
        if engine == "spark":
            counts = _split_spark(ds, resolved, splits_root / name, spill, spark, files)
        else:
            counts = _split_duckdb(ds, resolved, splits_root / name, spill)
    finally:
        files.remove_tree(spill)
    log.info(
        "split %r of %s: train %d, valid %d, test %d",
        name,
        ds.path,
        counts["train"],
        counts["valid"],
        counts["test"],
    )
    return ds.split(name)


def _split_json(
    cfg: SplitConfig, counts: dict[str, int], users: dict[str, int], meta: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": cfg.name,
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "params": dataclasses.asdict(cfg),
        "counts": counts,
        "users": users,
        **meta,
        "created_at": Manifest.now(),
    }


def _split_spark(
    ds: Dataset, cfg: SplitConfig, target: Any, spill: Any, spark: Any, files: Files
) -> dict[str, int]:
    from recscale.ingest.spark_engine import spark_assign, write_split_parts

    with files.atomic_directory(target) as out:
        assigned, meta, _ = spark_assign(ds, cfg, spark)
        parts = (TRAIN, VALID, TEST) if meta.pop("has_valid") else (TRAIN, TEST)
        counts, users = write_split_parts(assigned, parts, out, spill)
        split_json = _split_json(cfg, counts, users, meta)
        (out / "split.json").write_text(json.dumps(split_json, indent=2) + "\n")
    return counts


def _split_duckdb(ds: Dataset, cfg: SplitConfig, target: Path, spill: Path) -> dict[str, int]:
    name = cfg.name
    con = _connect(cfg, spill)
    try:
        with atomic_directory(target) as out:
            meta = _STRATEGIES[cfg.strategy](con, ds, cfg)
            parts = (TRAIN, VALID, TEST) if meta.pop("has_valid") else (TRAIN, TEST)
            counts = {"train": 0, "valid": 0, "test": 0}
            for part in parts:
                reader = con.sql(
                    f"SELECT {_COLUMNS} FROM assigned WHERE part = {part} ORDER BY {_OUTPUT_ORDER}"
                ).to_arrow_reader(_ROWS_PER_BATCH)
                counts[_PART_NAMES[part]] = write_parquet_parts(
                    reader, out / _PART_NAMES[part], INTERACTIONS_SCHEMA
                )
            users = dict(
                con.execute(
                    "SELECT part, count(DISTINCT user_idx) FROM assigned GROUP BY part"
                ).fetchall()
            )
            by_part = {_PART_NAMES[p]: int(users.get(p, 0)) for p in parts}
            split_json = _split_json(cfg, counts, by_part, meta)
            (out / "split.json").write_text(json.dumps(split_json, indent=2) + "\n")
    except duckdb.OutOfMemoryException as exc:
        raise DatasetError(
            f"split {name!r} of {ds.path}: DuckDB ran out of memory under memory_limit="
            f"{cfg.memory_limit!r}; raise memory_limit (the [split] config) or free "
            f"disk for spilling: {exc}"
        ) from None
    except duckdb.Error as exc:
        raise DatasetError(f"split {name!r} of {ds.path}: DuckDB failed: {exc}") from None
    finally:
        con.close()
    return counts


def _connect(config: SplitConfig, spill: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    try:
        con.execute("SET memory_limit = ?", [config.memory_limit])
    except duckdb.Error as exc:
        con.close()
        raise ConfigError(
            f"split: memory_limit {config.memory_limit!r} is not a memory size "
            f"(expected e.g. '2GB' or '500MB'): {exc}"
        ) from None
    con.execute("SET temp_directory = ?", [str(spill)])
    con.execute("SET preserve_insertion_order = false")  # order comes from ORDER BY alone
    if config.threads is not None:
        con.execute(f"SET threads = {int(config.threads)}")
    return con


def _register(con: duckdb.DuckDBPyConnection, view: str, directory: Path) -> None:
    """Make the ``part-*.parquet`` files under ``directory`` queryable as ``view``."""
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        raise DatasetError(f"{directory}: no part-*.parquet files")
    con.read_parquet([str(f) for f in files]).create_view(view)


def _hash(seed: int) -> str:
    """The seeded random key of a row: a function of its content, stable across thread counts."""
    return f"hash({int(seed)}::BIGINT, user_idx, item_idx, ts, value)"


def _random_parts_sql(source: str, seed: int, test_fraction: float, valid_fraction: float) -> str:
    """Per user, the first round(n·test_fraction) rows in seeded-hash order to test, then
    round((n - n_test)·valid_fraction) to valid, the rest to train.

    Fractions go into the SQL as decimal literals, so n·fraction is exact decimal arithmetic and
    the half-up rounding does not depend on binary floating point.
    """
    tf, vf = _decimal(test_fraction), _decimal(valid_fraction)
    return f"""
        SELECT {_COLUMNS},
               CASE WHEN r <= n_test THEN {TEST}
                    WHEN r <= n_test + floor((n - n_test) * {vf} + 0.5) THEN {VALID}
                    ELSE {TRAIN} END::TINYINT AS part
        FROM (
            SELECT {_COLUMNS}, r, n, floor(n * {tf} + 0.5) AS n_test
            FROM (
                SELECT {_COLUMNS},
                       row_number() OVER (PARTITION BY user_idx
                                          ORDER BY {_hash(seed)}, item_idx, ts, value) AS r,
                       count(*) OVER (PARTITION BY user_idx) AS n
                FROM {source}
            )
        )
    """


def _decimal(x: float) -> str:
    text = repr(float(x))
    # repr never uses an exponent for the (0, 1) fractions a config allows, except tiny ones
    return text if "e" not in text else f"{x:.20f}"


def _leave_last(con: duckdb.DuckDBPyConnection, ds: Dataset, cfg: SplitConfig) -> dict[str, Any]:
    _register(con, "src", ds.path / "interactions")
    n_rows, n_timed = con.execute("SELECT count(*), count(ts) FROM src").fetchall()[0]
    order = "time" if n_timed > 0 else "random"
    if order == "random":
        log.warning(
            "split %r: the dataset has no timestamps, so leave-last holds out each user's last %d "
            "interaction(s) in a seeded random order (seed %d); use strategy 'random' to say so",
            cfg.name,
            cfg.k,
            cfg.seed,
        )
    k = int(cfg.k)
    valid_k = 2 * k if cfg.valid else k
    # r = 1 is the user's latest interaction; rows without time are the oldest, in random order
    con.execute(f"""
        CREATE TEMP TABLE assigned AS
        SELECT {_COLUMNS},
               CASE WHEN n < {int(cfg.min_history)} THEN {TRAIN}
                    WHEN r <= {k} THEN {TEST}
                    WHEN r <= {valid_k} THEN {VALID}
                    ELSE {TRAIN} END::TINYINT AS part
        FROM (
            SELECT {_COLUMNS},
                   row_number() OVER (
                       PARTITION BY user_idx
                       ORDER BY ts DESC NULLS LAST,
                                CASE WHEN ts IS NULL THEN h END DESC,
                                item_idx DESC, value DESC, h DESC) AS r,
                   count(*) OVER (PARTITION BY user_idx) AS n
            FROM (SELECT {_COLUMNS}, {_hash(cfg.seed)} AS h FROM src)
        )
    """)
    return {
        "has_valid": cfg.valid,
        "order": order,
        "rows_without_ts": int(n_rows - n_timed),
        "source_rows": int(n_rows),
    }


def _temporal(con: duckdb.DuckDBPyConnection, ds: Dataset, cfg: SplitConfig) -> dict[str, Any]:
    _register(con, "src", ds.path / "interactions")
    n_rows, n_timed, q_test, q_valid = con.execute(
        f"""SELECT count(*), count(ts), quantile_disc(ts, {float(cfg.test_quantile)}),
                   quantile_disc(ts, {float(cfg.valid_quantile or 0.5)})
            FROM src"""
    ).fetchall()[0]
    if n_rows == 0:
        raise DatasetError(f"{ds.path}: the dataset has no interactions to split in time")
    if n_timed < n_rows:
        raise DatasetError(
            f"{ds.path}: {n_rows - n_timed} of {n_rows} interactions have no timestamp (ts is "
            "null), so they cannot be placed before or after a time cutoff; use strategy "
            "'leave-last' (orders by time where known) or 'random'"
        )
    test_cutoff = cfg.cutoff if cfg.cutoff is not None else int(q_test)
    valid_cutoff: int | None = None
    if cfg.valid:
        if cfg.valid_cutoff is not None:
            valid_cutoff = cfg.valid_cutoff
        elif cfg.valid_quantile is not None:
            valid_cutoff = int(q_valid)
    check_cutoffs(cfg, test_cutoff, valid_cutoff)
    valid_clause = (
        f"WHEN ts >= {int(valid_cutoff)} THEN {VALID}" if valid_cutoff is not None else ""
    )
    con.execute(f"""
        CREATE TEMP TABLE assigned AS
        SELECT {_COLUMNS},
               CASE WHEN ts >= {int(test_cutoff)} THEN {TEST} {valid_clause}
                    ELSE {TRAIN} END::TINYINT AS part
        FROM src
    """)
    # users first seen in test have nothing to be scored from: worth knowing before evaluating
    (cold,) = con.execute(f"""
        SELECT count(*) FROM (SELECT DISTINCT user_idx FROM assigned WHERE part = {TEST})
        WHERE user_idx NOT IN (SELECT user_idx FROM assigned WHERE part = {TRAIN})
    """).fetchall()[0]
    return {
        "has_valid": valid_cutoff is not None,
        "test_cutoff": int(test_cutoff),
        "valid_cutoff": None if valid_cutoff is None else int(valid_cutoff),
        "test_users_without_train": int(cold),
        "source_rows": int(n_rows),
    }


def check_cutoffs(cfg: SplitConfig, test_cutoff: int, valid_cutoff: int | None) -> None:
    """A valid cutoff after the test cutoff is a ConfigError (both engines)."""
    if valid_cutoff is not None and valid_cutoff > test_cutoff:
        raise ConfigError(
            f"split: the valid cutoff ({valid_cutoff}, from "
            f"{'valid_cutoff' if cfg.valid_cutoff is not None else 'valid_quantile'}) is after the "
            f"test cutoff ({test_cutoff}, from {'cutoff' if cfg.cutoff is not None else 'test_quantile'}); "
            "set valid_cutoff earlier than cutoff"
        )


def _random(con: duckdb.DuckDBPyConnection, ds: Dataset, cfg: SplitConfig) -> dict[str, Any]:
    _register(con, "src", ds.path / "interactions")
    valid_fraction = cfg.valid_fraction if cfg.valid else 0.0
    con.execute(
        "CREATE TEMP TABLE assigned AS "
        + _random_parts_sql("src", cfg.seed, cfg.test_fraction, valid_fraction)
    )
    (n_rows,) = con.execute("SELECT count(*) FROM assigned").fetchall()[0]
    return {"has_valid": cfg.valid, "source_rows": int(n_rows)}


NO_GIVEN = (
    "dataset {path} has no split 'given': strategy 'given' reuses the train/test files a source "
    "was already split into (e.g. LightGCN's train.txt and test.txt), which ingest stores as "
    "splits/given; this dataset came from unsplit sources, so use strategy 'leave-last', "
    "'temporal' or 'random'"
)


def _given(con: duckdb.DuckDBPyConnection, ds: Dataset, cfg: SplitConfig) -> dict[str, Any]:
    try:
        given = ds.split("given")
    except SplitNotFoundError:
        raise SplitNotFoundError(NO_GIVEN.format(path=ds.path)) from None
    for part in ("train", "test"):
        if not given.has(part):
            raise DatasetError(f"{given.path}: the given split has no {part!r} part")
    _register(con, "given_train", given.path / "train")
    _register(con, "given_test", given.path / "test")
    has_source_valid = given.has("valid")
    if has_source_valid:
        _register(con, "given_valid", given.path / "valid")
    test = f"SELECT {_COLUMNS}, {TEST}::TINYINT AS part FROM given_test"
    if has_source_valid:
        # keep the valid the source came with; without a valid part it goes back into train
        valid_part = VALID if cfg.valid else TRAIN
        rest = (
            f"SELECT {_COLUMNS}, {TRAIN}::TINYINT AS part FROM given_train UNION ALL "
            f"SELECT {_COLUMNS}, {valid_part}::TINYINT AS part FROM given_valid"
        )
        valid_from = "given" if cfg.valid else None
    elif cfg.valid:
        # test_fraction 0: every user's share of given train goes to valid, none to test
        rest = _random_parts_sql("given_train", cfg.seed, 0.0, cfg.valid_fraction)
        valid_from = "train"
    else:
        rest = f"SELECT {_COLUMNS}, {TRAIN}::TINYINT AS part FROM given_train"
        valid_from = None
    # materialised before anything is written: the source may be the split being rewritten
    con.execute(f"CREATE TEMP TABLE assigned AS {test} UNION ALL {rest}")
    (n_rows,) = con.execute("SELECT count(*) FROM assigned").fetchall()[0]
    return {
        "has_valid": cfg.valid,
        "source": "splits/given",
        "valid_from": valid_from,
        "source_rows": int(n_rows),
    }


_STRATEGIES: dict[str, Callable[[duckdb.DuckDBPyConnection, Dataset, SplitConfig], dict]] = {
    "leave-last": _leave_last,
    "temporal": _temporal,
    "random": _random,
    "given": _given,
}
