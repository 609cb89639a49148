"""The Spark engine on Hadoop filesystem URIs: ``file://`` through the same code as hdfs:// or s3a://.

Every path of the Spark engine goes through the session's Hadoop ``FileSystem``; ``file://`` URIs
exercise exactly that code (no mocks), and a dataset made from URIs must hold what the plain-path
run holds. (The DuckDB engine's refusal of URIs is in test_ingest_errors.py.)
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recscale.cli import main
from recscale.config import IngestConfig, SplitConfig
from recscale.dataset import open_dataset, read_parts
from recscale.errors import DatasetError, InputError, SourceNotFoundError
from recscale.ingest import ingest, make_split
from recscale.testing import assert_dataset_equal

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def uri(path: Path) -> str:
    return path.resolve().as_uri()  # file:///...


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """Two CSV files, a gzipped JSON Lines file and a titles file, with rejected rows in each."""
    import gzip

    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "a.csv").write_text(
        "user,item,rating,ts\n"
        "u1,i10,5,100\n"
        "u2,i20,x,200\n"  # bad_value
        "u1,i20,3,2020-01-01T00:00:00Z\n"
        "u3,i10,4,300\n"
        "u1,i10,2,400\n"  # a later duplicate of line 2
    )
    (folder / "b.csv").write_text("user,item,rating,ts\nu2,i10,5,100\n,i20,1,200\nu3,i20,2,150\n")
    (folder / "c.jsonl.gz").write_bytes(
        gzip.compress(b'{"user": "u4", "item": "i10", "rating": 1, "ts": 5}\nnot json\n')
    )
    (tmp_path / "titles.csv").write_text("item,title\ni10,Ten\ni20,Twenty\n")
    return folder


def test_file_uris_give_the_plain_path_dataset(tmp_path: Path, spark, logs: Path) -> None:
    config = dict(dedupe="keep-last", items_file=str(tmp_path / "titles.csv"))
    plain = ingest(
        [str(logs / "*.csv"), logs / "c.jsonl.gz"],
        tmp_path / "plain",
        IngestConfig(**config),  # type: ignore[arg-type]
        progress=False,
        engine="spark",
        spark=spark,
    )
    remote = ingest(
        [uri(logs) + "/*.csv", uri(logs / "c.jsonl.gz")],
        uri(tmp_path) + "/remote",
        IngestConfig(**{**config, "items_file": uri(tmp_path / "titles.csv")}),  # type: ignore[arg-type]
        progress=False,
        engine="spark",
        spark=spark,
    )
    assert str(remote.dataset.path) == uri(tmp_path) + "/remote"
    # the sources are recorded as they were named
    assert [s.path for s in remote.dataset.manifest.sources] == [
        uri(logs / "a.csv"),
        uri(logs / "b.csv"),
        uri(logs / "c.jsonl.gz"),
    ]
    assert [s.sha256 for s in remote.dataset.manifest.sources] == [
        s.sha256 for s in plain.dataset.manifest.sources
    ]
    assert remote.quality["rejected_by_reason"]["bad_value"] == 1
    assert remote.quality["rows_in"] == 10
    assert remote.dataset.items.column("title").to_pylist() == ["Ten", "Twenty"]
    # the same rows, ids, rejected lines and report as the plain-path run, but for the names
    local = open_dataset(tmp_path / "remote")
    for table in ("interactions_table",):
        assert getattr(local, table)().equals(getattr(plain.dataset, table)())
    assert local.users.equals(plain.dataset.users)
    assert local.items.equals(plain.dataset.items)
    names = {uri(logs / n): str(logs / n) for n in ("a.csv", "b.csv", "c.jsonl.gz")}
    rejected = read_parts(local.path / "rejected").to_pylist()
    for row in rejected:
        row["source"] = names[row["source"]]
    assert rejected == read_parts(plain.dataset.path / "rejected").to_pylist()
    assert [r["line"] for r in rejected] == [3, 3, 2]
    without = {"seconds", "rows_per_second", "sources"}
    assert {k: v for k, v in remote.quality.items() if k not in without} == {
        k: v for k, v in plain.quality.items() if k not in without
    }

    # a split of the URI dataset, by URI, is the split of the plain one
    for where in (uri(tmp_path) + "/remote", plain.dataset):
        split = make_split(
            where,
            SplitConfig(strategy="leave-last", k=1, valid=False, min_history=2),
            engine="spark",
            spark=spark,
        )
        assert split.meta["counts"] == {"train": 4, "valid": 0, "test": 2}
    assert str(split.path) == str(tmp_path / "plain" / "splits" / "leave-last")
    remote_split = open_dataset(tmp_path / "remote").split("leave-last")
    for part in ("train", "test"):
        assert remote_split.table(part).equals(plain.dataset.split("leave-last").table(part))

    # the dataset folder holds its own files only: no Hadoop .crc files, no work folders beside it
    assert not [p for p in (tmp_path / "remote").rglob("*") if p.name.endswith(".crc")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "plain", "remote", "titles.csv"]
    names_written = sorted(p.name for p in (tmp_path / "remote" / "interactions").iterdir())
    assert names_written == ["part-00000.parquet"]
    assert pq.read_schema(tmp_path / "remote" / "interactions" / "part-00000.parquet").equals(
        plain.dataset.interactions_table().schema
    )


def test_a_uri_dataset_from_plain_sources_is_the_plain_dataset(
    tmp_path: Path, spark, logs: Path
) -> None:
    results = [
        ingest(
            [str(logs / "*.csv")],
            out,
            IngestConfig(min_user_interactions=2),
            progress=False,
            engine="spark",
            spark=spark,
        )
        for out in (tmp_path / "plain", uri(tmp_path) + "/remote")
    ]
    assert results[1].quality["rejected_by_reason"]["kcore"] > 0
    for result in results:
        make_split(
            result.dataset, SplitConfig(strategy="random", seed=3), engine="spark", spark=spark
        )
    assert_dataset_equal(results[0].dataset, results[1].dataset)
    # the whole of both, HadoopPath and pathlib readers alike
    assert_dataset_equal(tmp_path / "plain", tmp_path / "remote")


def test_cli_with_uris(tmp_path: Path, spark, logs: Path, capsys) -> None:
    out = uri(tmp_path) + "/cli"
    assert main(["ingest", uri(logs / "a.csv"), "--out", out, "--engine", "spark", "--quiet"]) == 0
    assert main(["split", out, "--engine", "spark", "--k", "1", "--no-valid"]) == 0
    printed = capsys.readouterr().out
    assert "input rows = accepted + rejected: 5 = 4 + 1" in printed
    assert f"wrote {out}\n" in printed
    assert f"-> {out}/splits/leave-last\n" in printed


def test_hadoop_glob_is_pythons_glob(tmp_path: Path, spark) -> None:
    from recscale.ingest.hadoop import HadoopFS

    for name in ("a.csv", ".hidden.csv", "b/c.csv", "b/d/e.csv", "b/.x/f.csv", "g.txt", "b/h.gz"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    files = HadoopFS(spark)
    for pattern in ("*.csv", "**/*.csv", "*/*.csv", "b/[cd]*", ".h*", "**/*.gz", "**", "b/?.csv"):
        # (glob spells the folder that "**" starts from with a trailing "/")
        expected = sorted(p.rstrip("/") for p in glob.glob(str(tmp_path / pattern), recursive=True))
        assert sorted(str(p) for p in files.glob(str(tmp_path / pattern))) == expected, pattern
    # a URI pattern keeps its spelling
    assert [str(p) for p in files.glob(uri(tmp_path) + "/b/*.csv")] == [uri(tmp_path / "b/c.csv")]


def test_bad_uris_and_missing_files_name_the_path(tmp_path: Path, spark, logs: Path) -> None:
    def run(sources: list[str], out: str, **config: object) -> None:
        ingest(
            sources,
            out,
            IngestConfig(**config),  # type: ignore[arg-type]
            progress=False,
            engine="spark",
            spark=spark,
        )

    good, out = uri(logs / "a.csv"), uri(tmp_path) + "/ds"
    with pytest.raises(InputError, match=r"^nosuch://host/a\.csv: No FileSystem for scheme"):
        run(["nosuch://host/a.csv"], out)
    with pytest.raises(InputError, match=r"connector .*hadoop-aws"):
        run(["nosuch://host/a.csv"], out)
    with pytest.raises(InputError, match=r"^nosuch://host/ds: No FileSystem for scheme"):
        run([good], "nosuch://host/ds")
    missing = uri(tmp_path) + "/nope.csv"
    with pytest.raises(SourceNotFoundError, match=rf"^source '{missing}' does not exist$"):
        run([missing], out)
    with pytest.raises(
        SourceNotFoundError, match=r"^source 'file:///.*/\*\.parquet' matches no file$"
    ):
        run([uri(logs) + "/*.parquet"], out)
    titles = uri(tmp_path) + "/titles-missing.csv"
    with pytest.raises(SourceNotFoundError, match=rf"^items_file '{titles}' does not exist$"):
        run([good], out, items_file=titles)
    with pytest.raises(DatasetError, match=r"^dataset 'file:///.*/no-dataset' does not exist"):
        make_split(uri(tmp_path) + "/no-dataset", engine="spark", spark=spark)
    assert not (tmp_path / "ds").exists()
    assert sorted(os.listdir(tmp_path)) == ["logs", "titles.csv"]
