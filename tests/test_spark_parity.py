"""The Spark engine against the DuckDB engine: the same sources give the same dataset, file by file.

One local Spark session (``local[2]``) serves the module. Every test ingests (or splits) with both
engines and compares the results with :func:`recscale.testing.assert_dataset_equal`, after checking
a few exact numbers so that two equally wrong datasets cannot pass.
"""

from __future__ import annotations

import gzip
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recscale.cli import main
from recscale.config import IngestConfig, SplitConfig
from recscale.dataset import read_parts
from recscale.errors import ConfigError
from recscale.ingest import REASONS, ingest, make_split
from recscale.testing import assert_dataset_equal

pytestmark = [pytest.mark.spark, pytest.mark.slow]

ENGINES = ("duckdb", "spark")


def both(tmp_path: Path, sources: list[Path], spark, name: str = "ds", **config: object):
    """Ingest ``sources`` with each engine; returns {engine: IngestResult}."""
    return {
        engine: ingest(
            sources,
            tmp_path / f"{name}-{engine}",
            IngestConfig(**config),  # type: ignore[arg-type]
            progress=False,
            engine=engine,
            spark=spark,
        )
        for engine in ENGINES
    }


def reasons(result) -> dict[str, int]:
    return {k: v for k, v in result.quality["rejected_by_reason"].items() if v}


# one line per reason code of the rules, plus lines the reader refuses
DIRTY = b"".join(
    [
        b"user,item,rating,ts\n",
        b"1,10,5,100\n",
        b"\n",
        b"2,20,4,2020-01-02T00:00:00Z\n",
        b"3,30\n",  # field_count
        b"4,40,3,400,9\n",  # field_count
        b"5,5\xff0,2,500\n",  # bad_encoding
        b"2,\xe2\x82,1,1\n",  # bad_encoding: a cut sequence swallows the comma
        b"3,\xf0\x9f\x98,1\n",  # bad_encoding
        b"4,a\xc0\xafb,1,1\n",  # bad_encoding: overlong
        b"5,\xed\xa0\x80,1,1\n",  # bad_encoding: surrogate
        b"6,ok\xef\xbf\xbd\xff,1,1\n",  # bad_encoding after a valid U+FFFD
        b"7,x\xf0\x9f\n",  # bad_encoding at the end of the line
        b",80,1,800\n",  # missing_user
        b"9,,1,900\n",  # missing_item
        b"10,100,abc,1000\n",  # bad_value
        b"11,110,2,yesterday\n",  # bad_timestamp
        b"12,120,nan,1200\n",  # bad_value
        b"13,130,,1300\n",  # bad_value (missing)
        b"a\x02b,140,1,1400\n",  # bad_user (a control character)
        b"15," + b"x" * 600 + b",1,1500\n",  # bad_item (too long)
        b"16," + b"y" * 2_100_000 + b",1,16\n",  # bad_line: longer than the 2 MB limit
        b"17,170,inf,1700\n",  # bad_value
        b"18,180,0.5,1800\n",  # below_threshold
        b"   \n",
        b'"19",190,1,1900\n',
        b"20,200,2,2021-03-04 05:06:07.5\n",
        b"21,210,3,1614834367.9\n",
        b"1,10,3,50\n",  # an older duplicate of line 2
        b"1,20,4,60\n",
        b"2,10,4,70\n",
        b"2,30,4,70\n",
        b"3,20,4,70\n",
        b"3,10,2,80\n",
        b"99,990,5,90\n",  # removed by the k-core filter with its item
    ]
)


def test_every_format_and_reason_code(tmp_path: Path, spark) -> None:
    (tmp_path / "dirty.csv").write_bytes(DIRTY)
    (tmp_path / "more.tsv").write_text(
        "user_id\titem_id\trating\ttimestamp\n"
        "1\t10\t4\t2020-05-06 07:08:09\n"
        "u7\t20\t5\t1600000000\n"
        "u7\t30\t4.5\t1600000001\n"
        "3\t30\t3\t1600000002\n"
    )
    (tmp_path / "events.jsonl").write_text(
        '{"user": "1", "item": "30", "rating": 5, "ts": 100}\n'
        '{"user": "u7", "item": "10"}\n'
        "not json\n"
        "[1, 2]\n"
        '{"user": null, "item": "z", "rating": 1}\n'
        "\n"
        '{"user": "2", "item": "20", "rating": "4.5", "ts": "2021-03-04 05:06:07"}\n'
        '{"user": 3, "item": 10, "rating": 4, "ts": 1614834368}\n'
    )
    pq.write_table(
        pa.table(
            {
                "user_id": ["1", "2", None, "3", "u7", "2"],
                "item_id": ["20", "30", "c", "", "20", "10"],
                "rating": [1.5, float("nan"), 3.0, 4.0, None, 5.0],
                "ts": [1_000_000_000, 2_500_000_000, 3, 4, 5, 6],
            }
        ),
        tmp_path / "events.parquet",
    )
    sources = [tmp_path / n for n in ("dirty.csv", "more.tsv", "events.jsonl", "events.parquet")]
    # 16MB on one thread: lines up to 2,000,000 bytes
    results = both(
        tmp_path,
        sources,
        spark,
        positive_threshold=1.0,
        min_user_interactions=2,
        min_item_interactions=2,
        memory_limit="16MB",
        threads=1,
    )
    duck = results["duckdb"]
    assert reasons(duck) == {
        "bad_encoding": 7,
        "bad_line": 1,
        "bad_json": 2,
        "field_count": 2,
        "missing_user": 3,
        "missing_item": 2,
        "bad_user": 1,
        "bad_item": 1,
        "bad_timestamp": 1,
        "bad_value": 7,
        "below_threshold": 1,
        "kcore": 4,
    }
    # every reason a row of these formats can have (all but those of the LightGCN test)
    assert set(reasons(duck)) == set(REASONS)
    assert duck.quality["rows_in"] == 49
    assert duck.dataset.manifest.n_interactions == 11
    assert results["spark"].dataset.manifest.options["engine"] == "spark"
    assert "spark" in results["spark"].dataset.manifest.created_by
    raw = {
        r["line"]: r["raw"]
        for r in read_parts(results["spark"].dataset.path / "rejected").to_pylist()
        if r["source"].endswith("dirty.csv") and r["reason"] == "bad_encoding"
    }
    assert raw[8] == "2,???1,1"
    assert raw[12] == "6,ok\ufffd?,1,1"
    assert_dataset_equal(duck.dataset, results["spark"].dataset)


@pytest.mark.parametrize(
    ("policy", "options"),
    [
        ("keep-first", {"order_from_input": True}),
        ("sum", {}),
        ("count", {"time_format": "%d/%m/%Y %H:%M"}),
        ("none", {"id_type": "int"}),
    ],
)
def test_every_dedupe_policy(tmp_path: Path, spark, policy: str, options: dict) -> None:
    rows = [
        ("1", "10", "5", 1580551200),
        ("2", "20", "3", 1580551260),
        ('"1"', "10", "4", 1580547600),
        ("2", "20", "2", 1580551260),
        ("1", '"30"', "1", 1580641200),
        ("007", "10", "1", None),
        ("x", "40", "2", 1580731200),
        ("3", "10", "1", 1580731200),
    ]

    def when(ts: int | None) -> str:
        if ts is None:
            return "bad"
        if "time_format" in options:
            return time.strftime("%d/%m/%Y %H:%M", time.gmtime(ts))
        return str(ts)

    lines = [",".join([u, i, v, when(ts)]) for u, i, v, ts in rows]
    if options.get("order_from_input"):
        lines = [",".join(line.split(",")[:3]) for line in lines]
    src = tmp_path / "log.csv.gz"
    src.write_bytes(gzip.compress(("\r\n".join(lines) + "\r\n").encode()))
    results = both(tmp_path, [src], spark, dedupe=policy, header=False, **options)
    duck = results["duckdb"].quality
    expected = {"keep-first": 6, "sum": 5, "count": 5, "none": 6}[policy]
    assert duck["interactions"] == expected
    assert duck["rows_in"] == 8
    assert_dataset_equal(results["duckdb"].dataset, results["spark"].dataset)


def test_lightgcn_folder_given_split_and_unordered_splits(tmp_path: Path, spark) -> None:
    folder = tmp_path / "lg"
    folder.mkdir()
    (folder / "train.txt").write_bytes(
        b"0 1 2 5\n1 \xff 3\n\xfe\n2 x 4\n3\n\n q 5\n4 5 6\n5  1\t2 3\n6 1 2 3 4\n"
    )
    (folder / "test.txt.gz").write_bytes(gzip.compress(b"0 3\n4 1\n5 4\n6 5\n"))
    results = both(tmp_path, [folder], spark)
    duck = results["duckdb"]
    assert reasons(duck) == {"bad_encoding": 2, "bad_item": 1, "missing_item": 1, "bad_user": 1}
    assert duck.dataset.split("given").meta["counts"] == {"train": 13, "valid": 0, "test": 4}
    for engine, result in results.items():
        make_split(
            result.dataset,
            SplitConfig(strategy="given", name="given-valid", seed=3, valid_fraction=0.5),
            engine=engine,
            spark=spark,
        )
        # no timestamps: the last items are drawn by the seeded hash
        make_split(
            result.dataset,
            SplitConfig(strategy="leave-last", seed=11, min_history=2),
            engine=engine,
            spark=spark,
        )
    assert results["duckdb"].dataset.split("given-valid").meta["counts"]["valid"] == 8
    assert_dataset_equal(duck.dataset, results["spark"].dataset)


@pytest.fixture(scope="module")
def timed_dataset(tmp_path_factory) -> Path:
    """A DuckDB-ingested log of 3,000 rows, every one with a time (ties included)."""
    rng = random.Random(5)
    root = tmp_path_factory.mktemp("timed")
    rows = [
        (
            f"u{rng.randrange(60)}",
            f"i{rng.randrange(90)}",
            1_600_000_000 + rng.randrange(500),
            rng.choice([0.5, 1.0, 2.5, 4.0, -0.0, 1e-40, 3.4e38]),
        )
        for _ in range(3000)
    ]
    pq.write_table(
        pa.table(
            dict(
                zip(
                    ("user", "item", "ts", "rating"),
                    map(list, zip(*rows, strict=True)),
                    strict=True,
                )
            )
        ),
        root / "log.parquet",
    )
    ingest([root / "log.parquet"], root / "ds", IngestConfig(dedupe="none"), progress=False)
    return root / "ds"


@pytest.mark.parametrize(
    "config",
    [
        SplitConfig(strategy="leave-last", k=2, seed=7),
        SplitConfig(strategy="temporal", test_quantile=0.8, valid_quantile=0.6),
        SplitConfig(strategy="random", seed=-3, test_fraction=0.25, valid_fraction=0.2),
    ],
    ids=lambda c: c.strategy,
)
def test_every_split_strategy(tmp_path: Path, spark, timed_dataset: Path, config) -> None:
    copies = {}
    for engine in ENGINES:
        copies[engine] = tmp_path / engine
        shutil.copytree(timed_dataset, copies[engine])
        split = make_split(copies[engine], config, engine=engine, spark=spark)
        counts = split.meta["counts"]
        assert counts["train"] + counts["valid"] + counts["test"] == 3000
        assert counts["test"] > 0 and counts["valid"] > 0
    assert_dataset_equal(copies["duckdb"], copies["spark"])


def test_split_hash_is_duckdbs(tmp_path: Path, spark) -> None:
    from recscale.ingest.spark_engine import _settings, _with_duckdb_hash

    rng = random.Random(1)
    floats = [0.0, -0.0, 1.0, -2.5, 1e-45, 1e-40, 3.4e38, 0.1, 123456.789]
    rows = [
        (
            rng.randrange(2**31),
            rng.randrange(2**31),
            rng.choice([None, rng.randrange(-(2**62), 2**62)]),
            rng.choice(floats),
        )
        for _ in range(300)
    ]
    schema = pa.schema(
        [
            ("user_idx", pa.int32()),
            ("item_idx", pa.int32()),
            ("ts", pa.int64()),
            ("value", pa.float32()),
        ]
    )
    table = pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in rows], schema)
    pq.write_table(table, tmp_path / "rows.parquet")
    # the hash needs wrapping 64-bit multiplication, which the engine's settings turn on
    with _settings(spark):
        df = spark.read.parquet(str(tmp_path / "rows.parquet"))
        hashed = _with_duckdb_hash(df, -12345).orderBy("user_idx", "item_idx").collect()
    got = [int(r["h"]) for r in hashed]
    con = duckdb.connect()
    con.execute("CREATE TABLE t (user_idx INT, item_idx INT, ts BIGINT, value FLOAT)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", rows)
    want = [
        int(h)
        for (h,) in con.execute(
            "SELECT hash(-12345::BIGINT, user_idx, item_idx, ts, value) FROM t "
            "ORDER BY user_idx, item_idx"
        ).fetchall()
    ]
    assert got == want


def test_cli_engine_flag(tmp_path: Path, spark, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "log.csv"
    src.write_text("user,item,timestamp\na,x,1\na,y,2\na,z,3\nb,x,1\nb,y,5\nb,z,6\nc,x,9\n")
    for engine in ENGINES:
        out = tmp_path / engine
        assert main(["ingest", str(src), "--out", str(out), "--engine", engine, "--quiet"]) == 0
        assert main(["split", str(out), "--engine", engine, "--k", "1", "--no-valid"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("input rows = accepted + rejected: 7 = 7 + 0") == 2
    assert printed.count("split 'leave-last' (leave-last): train 5  valid 0  test 2") == 2
    assert_dataset_equal(tmp_path / "duckdb", tmp_path / "spark")


def test_unknown_engine_and_spark_only_flags(tmp_path: Path, capsys) -> None:
    src = tmp_path / "log.csv"
    src.write_text("user,item\na,x\n")
    with pytest.raises(
        ConfigError, match="engine 'flink' is unknown; expected one of 'duckdb', 'spark'"
    ):
        ingest([src], tmp_path / "ds", engine="flink")
    ingest([src], tmp_path / "ds", progress=False)
    with pytest.raises(ConfigError, match="engine 'flink' is unknown"):
        make_split(tmp_path / "ds", engine="flink")
    assert main(["ingest", str(src), "--out", str(tmp_path / "x"), "--engine", "flink"]) == 2
    assert "invalid choice: 'flink'" in capsys.readouterr().err
    assert (
        main(["ingest", str(src), "--out", str(tmp_path / "x"), "--spark-master", "local[2]"]) == 1
    )
    assert "--spark-master is for --engine spark" in capsys.readouterr().err


def test_without_pyspark_recscale_imports_and_the_error_names_the_extra(tmp_path: Path) -> None:
    src = tmp_path / "log.csv"
    src.write_text("user,item\na,x\n")
    # a None entry in sys.modules makes `import pyspark` fail, as it does where it is not installed
    code = f"""
import sys
sys.modules["pyspark"] = None
import recscale, recscale.ingest, recscale.cli
from recscale.errors import ConfigError
from recscale.ingest import ingest
try:
    ingest([{str(src)!r}], {str(tmp_path / "ds")!r}, engine="spark", progress=False)
except ConfigError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'recscale[spark]'" in out.stdout
    assert "engine 'spark' needs pyspark" in out.stdout
    assert not (tmp_path / "ds").exists()
