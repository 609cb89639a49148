"""recscale.ingest validation: every reason code, exact line numbers and raw text, conservation."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recscale.config import IngestConfig
from recscale.dataset import REJECTED_SCHEMA, read_parts
from recscale.ingest import REASONS, IngestResult, format_quality, ingest, rules


def row_counts(quality: dict) -> dict[str, int]:
    keys = ("rows_in", "accepted", "rejected", "interactions", "duplicates", "folded")
    return {k: quality[k] for k in keys}


def run(tmp_path: Path, sources: list[Path], **config: object) -> IngestResult:
    return ingest(sources, tmp_path / "ds", IngestConfig(**config), progress=False)  # type: ignore[arg-type]


def rejected(result: IngestResult) -> list[tuple[str, int, str, str, str]]:
    table = read_parts(result.dataset.path / "rejected")
    assert table.schema.equals(REJECTED_SCHEMA)
    return [
        (Path(r["source"]).name, r["line"], r["raw"], r["reason"], r["detail"])
        for r in table.to_pylist()
    ]


def interactions(result: IngestResult) -> list[tuple[str, str, int | None, float]]:
    """Interactions with their original ids, via users.parquet / items.parquet."""
    ds = result.dataset
    users = ds.users.column("user_id").to_pylist()
    items = ds.items.column("item_id").to_pylist()
    return [
        (users[r["user_idx"]], items[r["item_idx"]], r["ts"], r["value"])
        for r in ds.interactions_table().to_pylist()
    ]


def check_conservation(result: IngestResult) -> None:
    q = result.quality
    assert q["rows_in"] == q["accepted"] + q["rejected"]
    assert q["accepted"] == q["interactions"] + q["folded"]
    assert q["rejected"] == sum(q["rejected_by_reason"].values())
    assert q["rejected"] == result.dataset.manifest.n_rejected
    assert q["rejected"] == read_parts(result.dataset.path / "rejected").num_rows
    assert q["rows_in"] == result.dataset.manifest.n_input_rows
    assert q["interactions"] == result.dataset.manifest.n_interactions
    assert q["conservation"]["holds"] is True
    for src in q["sources"]:
        assert src["rows_in"] == src["accepted"] + src["rejected"]


LONG = "x" * 600
DIRTY = b"".join(
    [
        b"user,item,rating,ts\n",  # 1 header
        b"1,10,5,100\n",  # 2
        b"\n",  # 3 blank
        b"2,20,4,2020-01-02T00:00:00Z\n",  # 4
        b"3,30\n",  # 5
        b"4,40,3,400,9\n",  # 6
        b"5,5\xff0,2,500\n",  # 7 invalid UTF-8
        b"5,5\xfe1,2,500\n",  # 8 invalid UTF-8
        b",80,1,800\n",  # 9
        b"9,,1,900\n",  # 10
        b"10,100,abc,1000\n",  # 11
        b"11,110,2,yesterday\n",  # 12
        b"12,120,nan,1200\n",  # 13
        b"13,130,,1300\n",  # 14
        b"a\x02b,140,1,1400\n",  # 15
        b"15," + LONG.encode() + b",1,1500\n",  # 16
        b"16,160\x01,1,16\n",  # 17
        b"17,170,inf,1700\n",  # 18
        b"18,180,0.5,1800\n",  # 19
        b"   \n",  # 20 blank
        b'"19",190,1,1900\n',  # 21
        b"\xc3\x28,1,1,1\n",  # 22 invalid UTF-8
        b"20,200,2,abc2\n",  # 23
        b"1,10,3,50\n",  # 24 an older duplicate of line 2
    ]
)


def test_mixed_line_ends_are_read_with_a_warning(tmp_path: Path) -> None:
    src = tmp_path / "mixed.csv"
    src.write_bytes(b"user,item\n1,1\r\n2,2\n3,3\r\n")
    result = run(tmp_path, [src])
    assert interactions(result) == [
        ("1", "1", None, 1.0),
        ("2", "2", None, 1.0),
        ("3", "3", None, 1.0),
    ]
    assert result.quality["rows_in"] == 3
    assert "mixes" in result.quality["warnings"][0]
    assert "warning: " in format_quality(result.quality)


def test_every_reason_with_exact_lines_and_raw_text(tmp_path: Path) -> None:
    src = tmp_path / "dirty.csv"
    src.write_bytes(DIRTY)
    result = run(tmp_path, [src], positive_threshold=1.0)
    got = rejected(result)
    assert [(line, reason) for _, line, _, reason, _ in got] == [
        (5, "field_count"),
        (6, "field_count"),
        (7, "bad_encoding"),
        (8, "bad_encoding"),
        (9, "missing_user"),
        (10, "missing_item"),
        (11, "bad_value"),
        (12, "bad_timestamp"),
        (13, "bad_value"),
        (14, "bad_value"),
        (15, "bad_user"),
        (16, "bad_item"),
        (17, "bad_line"),
        (18, "bad_value"),
        (19, "below_threshold"),
        (22, "bad_encoding"),
        (23, "bad_timestamp"),
    ]
    assert {name for name, *_ in got} == {"dirty.csv"}
    raw = {line: text for _, line, text, _, _ in got}
    # the raw text is the line as read; bytes that are not UTF-8 show as '?'
    assert raw[5] == "3,30"
    assert raw[7] == "5,5?0,2,500"
    assert raw[15] == "a\x02b,140,1,1400"
    assert raw[16] == f"15,{LONG},1,1500"
    assert raw[17] == "16,160\x01,1,16"
    assert raw[19] == "18,180,0.5,1800"
    assert raw[23] == "20,200,2,abc2"
    detail = {line: text for _, line, _, _, text in got}
    assert detail[5] == "2 fields, expected 4"
    assert detail[6] == "5 fields, expected 4"
    assert detail[7] == "not valid UTF-8"
    assert detail[9] == "user field is empty"
    assert detail[11] == "value 'abc' is not a finite number"
    assert detail[12] == "time 'yesterday' is not unix seconds or ISO-8601"
    assert detail[14] == "value is missing"
    assert detail[15] == "user id 'a\x02b' is not a valid id"
    assert detail[17] == "contains the control byte 0x01"
    assert detail[19] == "value 0.5 < positive_threshold 1.0"

    assert interactions(result) == [
        ("1", "10", 100, 5.0),
        ("2", "20", 1577923200, 4.0),
        ("19", "190", 1900, 1.0),
    ]
    q = result.quality
    assert row_counts(q) == {
        "rows_in": 21,
        "accepted": 4,
        "rejected": 17,
        "interactions": 3,
        "duplicates": 1,
        "folded": 1,
    }
    assert q["skipped_lines"] == {"header": 1, "blank": 2}
    assert {k: v for k, v in q["rejected_by_reason"].items() if v} == {
        "bad_encoding": 3,
        "bad_line": 1,
        "field_count": 2,
        "missing_user": 1,
        "missing_item": 1,
        "bad_user": 1,
        "bad_item": 1,
        "bad_timestamp": 2,
        "bad_value": 4,
        "below_threshold": 1,
    }
    assert set(q["rejected_by_reason"]) == set(REASONS)
    check_conservation(result)
    assert "input rows = accepted + rejected: 21 = 4 + 17" in format_quality(q)


def test_reader_refusals_shift_later_lines_in_lightgcn_files(tmp_path: Path) -> None:
    folder = tmp_path / "lg"
    folder.mkdir()
    (folder / "train.txt").write_bytes(b"0 1 2\n1 \xff 3\n\xfe\n2 x 4\n3\n\n q 5\n4 5 6\n")
    (folder / "test.txt.gz").write_bytes(gzip.compress(b"0 3\n"))
    result = run(tmp_path, [folder])
    assert [(name, line, reason, detail) for name, line, _, reason, detail in rejected(result)] == [
        ("train.txt", 2, "bad_encoding", "not valid UTF-8"),
        ("train.txt", 3, "bad_encoding", "not valid UTF-8"),
        ("train.txt", 4, "bad_item", "item id 'x' is not a valid id"),
        ("train.txt", 5, "missing_item", "item field is empty"),
        ("train.txt", 7, "bad_user", "user id 'q' is not a valid id"),
    ]
    assert rejected(result)[2][2] == "2 x 4"  # the whole line, for context
    assert interactions(result) == [
        ("0", "1", None, 1.0),
        ("0", "2", None, 1.0),
        ("0", "3", None, 1.0),
        ("2", "4", None, 1.0),
        ("4", "5", None, 1.0),
        ("4", "6", None, 1.0),
    ]
    # each (user, item) on a line is one input row; a refused line is one row
    assert result.quality["rows_in"] == 11
    check_conservation(result)
    split = result.dataset.split("given")
    assert split.meta["counts"] == {"train": 5, "valid": 0, "test": 1}


def test_json_lines_rejects(tmp_path: Path) -> None:
    src = tmp_path / "events.jsonl"
    src.write_text(
        '{"user": "a", "item": "x", "rating": 5, "ts": 100}\n'
        '{"user": "b", "item": "y"}\n'
        "not json\n"
        "[1, 2]\n"
        '{"user": null, "item": "z", "rating": 1}\n'
        "\n"
        '{"user": "c", "item": "w", "rating": "4.5", "ts": "2021-03-04 05:06:07"}\n'
    )
    result = run(tmp_path, [src])
    assert [(line, reason, raw) for _, line, raw, reason, _ in rejected(result)] == [
        (2, "bad_value", '{"user": "b", "item": "y"}'),
        (3, "bad_json", "not json"),
        (4, "bad_json", "[1, 2]"),
        (5, "missing_user", '{"user": null, "item": "z", "rating": 1}'),
    ]
    assert interactions(result) == [("a", "x", 100, 5.0), ("c", "w", 1614834367, 4.5)]
    check_conservation(result)


def test_parquet_rejects_carry_row_numbers_and_json_rows(tmp_path: Path) -> None:
    src = tmp_path / "events.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": [1, 2, None, 4, 5],
                "item_id": ["a", "b", "c", "", "e"],
                "rating": [1.0, float("nan"), 3.0, 4.0, 2.0],
            }
        ),
        src,
    )
    result = run(tmp_path, [src])
    assert [(line, reason, raw) for _, line, raw, reason, _ in rejected(result)] == [
        (2, "bad_value", '{"user_id":2,"item_id":"b","rating":NaN}'),
        (3, "missing_user", '{"user_id":null,"item_id":"c","rating":3.0}'),
        (4, "missing_item", '{"user_id":4,"item_id":"","rating":4.0}'),
    ]
    assert interactions(result) == [("1", "a", None, 1.0), ("5", "e", None, 2.0)]
    check_conservation(result)


def test_integer_ids(tmp_path: Path) -> None:
    src = tmp_path / "events.csv"
    src.write_text("user,item\n7,1\n007,2\n+7,3\nabc,4\n1.5,5\n 8 ,6\n")
    result = run(tmp_path, [src], id_type="int")
    assert [(line, reason) for _, line, _, reason, _ in rejected(result)] == [
        (5, "bad_user"),
        (6, "bad_user"),
    ]
    assert interactions(result) == [
        ("7", "1", None, 1.0),
        ("7", "2", None, 1.0),
        ("7", "3", None, 1.0),
        ("8", "6", None, 1.0),
    ]
    # without id_type="int" every spelling is its own (text) id, kept as written (trimmed)
    text = ingest([src], tmp_path / "text", progress=False)
    assert text.dataset.users.column("user_id").to_pylist() == ["+7", "007", "1.5", "7", "8", "abc"]


def test_threshold_and_kcore(tmp_path: Path) -> None:
    src = tmp_path / "events.csv"
    src.write_text(
        "user,item,rating\n"
        "1,10,5\n"  # 2
        "1,20,5\n"  # 3
        "1,30,5\n"  # 4
        "2,10,5\n"  # 5
        "2,40,5\n"  # 6
        "3,10,5\n"  # 7
        "3,20,5\n"  # 8
        "4,50,5\n"  # 9
        "2,40,4\n"  # 10: a duplicate of line 6, rejected with its pair
        "3,30,1\n"  # 11: below the threshold, so it does not count for the k-core
    )
    result = run(
        tmp_path, [src], positive_threshold=2.0, min_user_interactions=2, min_item_interactions=2
    )
    kcore = (
        "(user, item) pair removed by the k-core filter (min_user_interactions=2, "
        "min_item_interactions=2) in round "
    )
    assert [(line, reason, raw, detail) for _, line, raw, reason, detail in rejected(result)] == [
        (4, "kcore", "1,30,5", kcore + "1"),
        (5, "kcore", "2,10,5", kcore + "2"),
        (6, "kcore", "2,40,5", kcore + "1"),
        (9, "kcore", "4,50,5", kcore + "1"),
        (10, "kcore", "2,40,4", kcore + "1"),
        (11, "below_threshold", "3,30,1", "value 1.0 < positive_threshold 2.0"),
    ]
    # users 1 and 3, items 10 and 20 survive, re-indexed densely in id order
    assert result.dataset.users.column("user_id").to_pylist() == ["1", "3"]
    assert result.dataset.items.column("item_id").to_pylist() == ["10", "20"]
    assert [tuple(r.values()) for r in result.dataset.interactions_table().to_pylist()] == [
        (0, 0, None, 5.0),
        (0, 1, None, 5.0),
        (1, 0, None, 5.0),
        (1, 1, None, 5.0),
    ]
    q = result.quality
    assert row_counts(q) == {
        "rows_in": 10,
        "accepted": 4,
        "rejected": 6,
        "interactions": 4,
        "duplicates": 0,
        "folded": 0,
    }
    assert q["kcore"]["removed_rows"] == 5
    check_conservation(result)


def test_rules_render_for_every_reason() -> None:
    codes = [r.reason for r in rules.RULES]
    assert len(codes) == len(set(codes))
    assert set(codes) | set(rules.READER_REASONS) | set(rules.POST_REASONS) == set(REASONS)
    params = {
        "expected_fields": 4,
        "user_int": True,
        "item_int": False,
        "has_time": True,
        "has_value": True,
        "positive_threshold": None,
        "max_id_length": 512,
        "time_format": None,
        "time_expected": "unix seconds or ISO-8601",
    }
    rendered = rules.render(rules.RULES[1].when, params)
    assert rendered == "n_fields <> 4"
    assert rules.render("{time_expected}", {"time_expected": "it's"}) == "it''s"


@pytest.mark.parametrize(
    ("text", "ts"),
    [
        ("100", 100),
        (" 100 ", 100),
        ("-5", -5),
        ("1e3", 1000),
        ("1614834367.9", 1614834367),
        ("-1.e-5", -1),  # a '-' but a number: not taken for a date
        ("12.e-5", 0),
        ("2020-01-02", 1577923200),
        ("2020-01-02T03:04:05Z", 1577934245),
        (" 2021-03-04 05:06:07.5 ", 1614834367),
        ("2020-01-02T03:04:05+01:00", 1577930645),
        ("2020-13-45", None),  # the shape of a date, not a date
        ("2020-01-02x", None),
        ("yesterday", None),
        ("1_000", None),  # DuckDB's cast reads it; the rule does not
        ("", None),
    ],
)
def test_time_text_is_integer_decimal_or_iso_seconds(text: str, ts: int | None) -> None:
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    query = f"SELECT {rules.TIME_SQL} FROM (SELECT ?::VARCHAR AS time_text)"
    assert con.execute(query, [text]).fetchall() == [(ts,)]


@pytest.mark.parametrize("dedupe", ["keep-first", "keep-last", "sum", "count", "none"])
def test_conservation_holds_for_every_policy(tmp_path: Path, dedupe: str) -> None:
    src = tmp_path / "dirty.csv"
    src.write_bytes(DIRTY + b"1,10,1,5000\n2,20,1,1\n")
    result = run(tmp_path, [src], dedupe=dedupe)
    check_conservation(result)
    assert result.quality["rows_in"] == 23
