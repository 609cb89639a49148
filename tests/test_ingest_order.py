"""order_from_input: files without timestamps whose rows are in time order per user.

``ts`` must be exactly the row's line number (its position in the file), so that a leave-last
split holds out each user's last line and sequences follow the file.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recscale.cli import main
from recscale.config import IngestConfig, SplitConfig
from recscale.errors import ConfigError
from recscale.ingest import IngestResult, ingest
from recscale.ingest.split import make_split

# users interleaved, items out of numeric order: neither the id order nor the user grouping
# gives the file's order, only the line numbers do
SEQUENCE_LINES = ["7 30", "5 10", "7 20", "5 40", "7 10", "5 30", "5 20", "7 40"]


def run(tmp_path: Path, sources: list[Path], **config: object) -> IngestResult:
    return ingest(sources, tmp_path / "ds", IngestConfig(**config), progress=False)  # type: ignore[arg-type]


def by_ts(result: IngestResult) -> list[tuple[str, str, int]]:
    """(user id, item id, ts) of every interaction, in ts order."""
    table = result.dataset.interactions_table()
    users = result.dataset.users.column("user_id").to_pylist()
    items = result.dataset.items.column("item_id").to_pylist()
    rows = zip(
        table.column("user_idx").to_pylist(),
        table.column("item_idx").to_pylist(),
        table.column("ts").to_pylist(),
        strict=True,
    )
    return sorted(((users[u], items[i], ts) for u, i, ts in rows), key=lambda r: r[2])


def expected(lines: list[str], first_line: int = 1) -> list[tuple[str, str, int]]:
    return [
        (*line.split(), n)  # type: ignore[misc]
        for n, line in enumerate(lines, start=first_line)
        if line.strip()
    ]


def test_ts_is_the_line_number_of_a_headerless_file(tmp_path: Path) -> None:
    src = tmp_path / "seq.txt.gz"
    src.write_bytes(gzip.compress(("\n".join(SEQUENCE_LINES) + "\n").encode()))
    result = run(tmp_path, [src], order_from_input=True)
    assert by_ts(result) == expected(SEQUENCE_LINES)
    assert result.dataset.manifest.options["order_from_input"] is True
    time = result.quality["time"]
    assert time["from"] == "input order"
    assert (time["min_ts"], time["max_ts"], time["min"], time["max"]) == (1, 8, None, None)


def test_without_the_option_there_is_no_time(tmp_path: Path) -> None:
    src = tmp_path / "seq.txt"
    src.write_text("\n".join(SEQUENCE_LINES) + "\n")
    ts = run(tmp_path, [src]).dataset.interactions_table().column("ts").to_pylist()
    assert ts == [None] * len(SEQUENCE_LINES)


def test_header_and_blank_lines_count_as_lines(tmp_path: Path) -> None:
    lines = ["user,item", "b,x", "a,y", "", "b,z", "a,x"]
    src = tmp_path / "log.csv"
    src.write_text("\n".join(lines) + "\n")
    result = run(tmp_path, [src], order_from_input=True)
    assert by_ts(result) == [("b", "x", 2), ("a", "y", 3), ("b", "z", 5), ("a", "x", 6)]


def test_rejected_rows_keep_their_place(tmp_path: Path) -> None:
    # a bad row in the middle is rejected; the rows after it keep their own line numbers
    src = tmp_path / "log.csv"
    src.write_text("user,item\nb,x\nonly-one-field\na,y\n")
    result = run(tmp_path, [src], order_from_input=True)
    assert by_ts(result) == [("b", "x", 2), ("a", "y", 4)]
    assert result.quality["rejected"] == 1


def test_keep_last_keeps_the_later_line(tmp_path: Path) -> None:
    src = tmp_path / "log.txt"
    src.write_text("1 5\n1 6\n1 5\n")
    result = run(tmp_path, [src], order_from_input=True, dedupe="keep-last")
    assert by_ts(result) == [("1", "6", 2), ("1", "5", 3)]


def test_jsonl_parquet_and_lightgcn_positions(tmp_path: Path) -> None:
    jsonl = tmp_path / "log.jsonl"
    pairs = (("a", "x"), ("b", "x"), ("a", "y"))
    jsonl.write_text("".join(json.dumps({"user": u, "item": i}) + "\n" for u, i in pairs))
    assert by_ts(run(tmp_path / "j", [jsonl], order_from_input=True)) == [
        ("a", "x", 1), ("b", "x", 2), ("a", "y", 3),
    ]  # fmt: skip
    parquet = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": ["b", "a", "b"], "item": ["y", "y", "x"]}), parquet)
    assert by_ts(run(tmp_path / "p", [parquet], order_from_input=True)) == [
        ("b", "y", 1), ("a", "y", 2), ("b", "x", 3),
    ]  # fmt: skip
    # a LightGCN line lists a user's items: the positions number the (user, item) pairs
    lightgcn = tmp_path / "train.txt"
    lightgcn.write_text("0 3 1\n1 2\n0 2\n")
    result = run(tmp_path / "l", [lightgcn], order_from_input=True, format="lightgcn")
    assert by_ts(result) == [("0", "3", 1), ("0", "1", 2), ("1", "2", 3), ("0", "2", 4)]


def test_a_second_file_continues_after_the_first(tmp_path: Path) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("1 10\n2 10\n")
    second.write_text("1 20\n")
    result = run(tmp_path, [first, second], order_from_input=True)
    assert by_ts(result) == [("1", "10", 1), ("2", "10", 2), ("1", "20", 3)]


def test_an_append_continues_after_the_dataset(tmp_path: Path) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("1 10\n2 10\n1 30\n")
    second.write_text("2 20\n")
    run(tmp_path, [first], order_from_input=True)
    config = IngestConfig(order_from_input=True)
    result = ingest([second], tmp_path / "ds", config, append=True, progress=False)
    assert by_ts(result) == [("1", "10", 1), ("2", "10", 2), ("1", "30", 3), ("2", "20", 4)]


def test_leave_last_holds_out_each_users_last_line(tmp_path: Path) -> None:
    src = tmp_path / "seq.txt"
    src.write_text("\n".join(SEQUENCE_LINES) + "\n")
    result = run(tmp_path, [src], order_from_input=True)
    split = make_split(result.dataset, SplitConfig(strategy="leave-last", k=1))
    users = result.dataset.users.column("user_id").to_pylist()
    items = result.dataset.items.column("item_id").to_pylist()

    def held(part: str) -> dict[str, str]:
        x = split.interactions(part)
        return {users[u]: items[i] for u, i in zip(x.user_idx, x.item_idx, strict=True)}

    # user 5: 10, 40, 30, 20 in file order; user 7: 30, 20, 10, 40
    assert held("test") == {"5": "20", "7": "40"}
    assert held("valid") == {"5": "30", "7": "10"}
    train = split.interactions("train")
    indptr, seq = train.sequences()
    sequences = {users[u]: [items[i] for i in seq[indptr[u] : indptr[u + 1]]] for u in (0, 1)}
    assert sequences == {"5": ["10", "40"], "7": ["30", "20"]}


def test_a_time_column_and_the_option_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"time_col 'ts' and order_from_input are both given"):
        IngestConfig(time_col="ts", order_from_input=True)
    # a time column found by its name is refused as well, naming it
    src = tmp_path / "log.csv"
    src.write_text("user,item,timestamp\na,x,100\n")
    with pytest.raises(ConfigError, match=r"has a time column 'timestamp' and order_from_input"):
        run(tmp_path, [src], order_from_input=True)


def test_cli_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "seq.txt"
    src.write_text("\n".join(SEQUENCE_LINES) + "\n")
    out = tmp_path / "ds"
    assert main(["ingest", str(src), "--out", str(out), "--order-from-input", "--quiet"]) == 0
    assert "time: none in the source; ts = input position 1 .. 8 (order_from_input)" in (
        capsys.readouterr().out
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["order_from_input"] is True
