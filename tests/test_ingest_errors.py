"""recscale.ingest: bad input gives a clear error from recscale.errors and loses nothing stored."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recscale.config import IngestConfig
from recscale.errors import (
    ConfigError,
    DatasetError,
    FormatError,
    InputError,
    SchemaError,
    SourceNotFoundError,
)
from recscale.ingest import ingest, make_split


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def csv(path: Path, text: str = "user,item,rating\n1,1,5\n2,1,4\n") -> Path:
    path.write_text(text)
    return path


def test_missing_file_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match=r"source '.*nope\.csv' does not exist"):
        ingest([tmp_path / "nope.csv"], tmp_path / "ds", progress=False)
    with pytest.raises(SourceNotFoundError, match=r"source '.*/\*\.parquet' matches no file"):
        ingest([str(tmp_path / "*.parquet")], tmp_path / "ds", progress=False)
    with pytest.raises(SourceNotFoundError, match="no source given"):
        ingest([], tmp_path / "ds", progress=False)
    with pytest.raises(SourceNotFoundError, match=r"items_file '.*items\.csv' does not exist"):
        ingest(
            [csv(tmp_path / "a.csv")],
            tmp_path / "ds",
            IngestConfig(items_file=str(tmp_path / "items.csv")),
            progress=False,
        )
    assert not (tmp_path / "ds").exists()


def test_undetectable_format(tmp_path: Path) -> None:
    junk = tmp_path / "blob.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(
        FormatError,
        match=r"blob\.bin: cannot detect the format; the file looks binary; formats allowed: "
        r"csv, tsv, jsonl, parquet, movielens, lightgcn",
    ):
        ingest([junk], tmp_path / "ds", progress=False)
    prose = tmp_path / "notes.txt"
    prose.write_text("Dear-diary\nno-fields-here\n")
    with pytest.raises(FormatError, match=r"notes\.txt: cannot detect the format; formats allowed"):
        ingest([prose], tmp_path / "ds", progress=False)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.md").write_text("hello\n")
    with pytest.raises(FormatError, match=r"folder: cannot tell the format of this folder"):
        ingest([folder], tmp_path / "ds", progress=False)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_named_column_not_in_file(tmp_path: Path, kind: str) -> None:
    if kind == "csv":
        src = csv(tmp_path / "log.csv")
    elif kind == "jsonl":
        src = tmp_path / "log.jsonl"
        src.write_text('{"user": 1, "item": 1, "rating": 5}\n')
    else:
        src = tmp_path / "log.parquet"
        pq.write_table(pa.table({"user": [1], "item": [1], "rating": [5.0]}), src)
    with pytest.raises(
        SchemaError,
        match=rf"log\.{kind}: no column 'uid' \(from user_col\); the file's columns are: "
        r"user, item, rating",
    ):
        ingest([src], tmp_path / "ds", IngestConfig(user_col="uid"), progress=False)


def test_no_user_column_found(tmp_path: Path) -> None:
    src = csv(tmp_path / "log.csv", "who,what\n1,2\n")
    with pytest.raises(
        SchemaError,
        match=r"log\.csv: cannot tell which column holds the user id; the file's columns are: "
        r"who, what; name it with user_col",
    ):
        ingest([src], tmp_path / "ds", progress=False)


def test_headerless_column_names_are_explained(tmp_path: Path) -> None:
    src = csv(tmp_path / "log.csv", "1,2\n3,4\n")
    with pytest.raises(
        SchemaError, match=r"columns are: column0, column1 \(the file has no header"
    ):
        ingest([src], tmp_path / "ds", IngestConfig(value_col="rating"), progress=False)


def test_corrupt_parquet(tmp_path: Path) -> None:
    src = tmp_path / "broken.parquet"
    src.write_bytes(b"PAR1" + b"\x00" * 100 + b"garbage")
    with pytest.raises(FormatError, match=r"broken\.parquet: not a readable Parquet file"):
        ingest([src], tmp_path / "ds", progress=False)


def test_empty_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(FormatError, match=r"empty\.csv: the file is empty \(no data lines\)"):
        ingest([empty], tmp_path / "ds", progress=False)
    header_only = csv(tmp_path / "header.csv", "user,item\n")
    with pytest.raises(
        InputError, match=r"no input rows: the sources hold no data rows \(.*header\.csv\)"
    ):
        ingest([header_only], tmp_path / "ds", progress=False)
    all_bad = csv(tmp_path / "bad.csv", "user,item,rating\n1,1,x\n2,2,y\n")
    with pytest.raises(
        InputError,
        match=r"none of the 2 input rows was accepted \(rejected: bad_value 2\); for example "
        r".*bad\.csv: bad_value \(value 'x' is not a finite number\)",
    ):
        ingest([all_bad], tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()


def test_kcore_removing_everything_is_an_error(tmp_path: Path) -> None:
    src = csv(tmp_path / "log.csv", "user,item\n1,1\n2,2\n")
    with pytest.raises(InputError, match=r"the k-core filter .* removed all 2 interactions"):
        ingest([src], tmp_path / "ds", IngestConfig(min_user_interactions=2), progress=False)


def test_bad_memory_limit(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"memory_limit 'lots' is not a memory size"):
        ingest(
            [csv(tmp_path / "a.csv")],
            tmp_path / "ds",
            IngestConfig(memory_limit="lots"),
            progress=False,
        )


def test_bad_config_values() -> None:
    with pytest.raises(ConfigError, match=r"ingest: dedupe 'latest' is unknown; expected one of"):
        IngestConfig(dedupe="latest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"ingest: delimiter must be 1 to 4 characters"):
        IngestConfig(delimiter="")


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match=r"refusing to write the dataset to '.*home'"):
        ingest([csv(tmp_path / "a.csv")], home, progress=False)
    assert (home / "thesis.tex").read_text() == "precious"


def test_a_failure_leaves_the_existing_dataset_untouched(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    ingest([csv(tmp_path / "a.csv")], ds, progress=False)
    before = tree_digest(ds)
    # a gzip file that breaks off after its first lines: detected fine, fails while read by DuckDB
    text = "user,item,rating\n" + "".join(f"{u},{u % 97},1\n" for u in range(200_000))
    data = gzip.compress(text.encode())
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FormatError, match=r"cut\.csv\.gz: cannot be read as csv"):
        ingest([truncated], ds, progress=False)
    assert tree_digest(ds) == before
    # the same for a failure found only after every row was read and checked
    with pytest.raises(InputError, match="none of the 1 input rows was accepted"):
        ingest([csv(tmp_path / "b.csv", "user,item\n,1\n")], ds, progress=False)
    assert tree_digest(ds) == before
    with pytest.raises(FormatError, match=r"cut\.csv\.gz: cannot be read as csv"):
        ingest([truncated], ds, append=True, progress=False)
    assert tree_digest(ds) == before
    # no temporary folders are left beside the dataset
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_progress_goes_to_stderr_only_when_asked(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    src = csv(tmp_path / "a.csv")
    ingest([src], tmp_path / "quiet", progress=False)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    ingest([src], tmp_path / "loud", progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith(f"ingest: {src}: 2 rows in ") and lines[0].endswith(" rows/s)")
    assert lines[-1].startswith(
        f"ingest: wrote {tmp_path / 'loud'}: 2 interactions, 2 users, 1 items"
    )


def test_duckdb_refuses_uris_and_names_the_engine_to_use(tmp_path: Path) -> None:
    src = csv(tmp_path / "a.csv")
    hint = (
        r"engine 'duckdb' reads and writes local paths only; use engine 'spark' \(--engine "
        r"spark\) for hdfs://, s3a://, file:// and other Hadoop filesystem URIs$"
    )
    with pytest.raises(ConfigError, match=r"^ingest: 'hdfs://nn/logs/a\.csv' is a URI; " + hint):
        ingest(["hdfs://nn/logs/a.csv"], tmp_path / "ds", progress=False)
    with pytest.raises(ConfigError, match=r"^ingest: 'hdfs://nn/a\.csv' is a URI; " + hint):
        ingest("hdfs://nn/a.csv", tmp_path / "ds", progress=False)  # one source, not a list
    with pytest.raises(ConfigError, match=r"^ingest: 's3a://bucket/ds' is a URI; " + hint):
        ingest([src], "s3a://bucket/ds", progress=False)
    with pytest.raises(ConfigError, match=r"^ingest: 'file:///t\.csv' is a URI; " + hint):
        ingest([src], tmp_path / "ds", IngestConfig(items_file="file:///t.csv"), progress=False)
    with pytest.raises(ConfigError, match=r"^split: 'hdfs://nn/ds' is a URI; " + hint):
        make_split("hdfs://nn/ds")
    # a colon without a slash after it is part of a file name
    ingest([csv(tmp_path / "log:2024.csv")], tmp_path / "ds", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "ds", "log:2024.csv"]
