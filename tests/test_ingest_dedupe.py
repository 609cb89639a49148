"""recscale.ingest: each dedupe policy, and appending to a dataset with its indices kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recscale.config import IngestConfig
from recscale.dataset import read_parts
from recscale.errors import InputError
from recscale.ingest import IngestResult, ingest

# (user, item, value, ts); ts '' = none. Pair (a, x) three times, (b, y) twice.
LOG = """user,item,value,ts
a,x,1,30
b,y,1,
a,x,2,10
c,z,7,5
a,x,3,30
b,y,2,5
"""

Row = tuple[str, str, int | None, float]


def row_counts(quality: dict) -> dict[str, int]:
    keys = ("rows_in", "accepted", "rejected", "interactions", "duplicates", "folded")
    return {k: quality[k] for k in keys}


def interactions(result: IngestResult) -> list[Row]:
    ds = result.dataset
    users = ds.users.column("user_id").to_pylist()
    items = ds.items.column("item_id").to_pylist()
    return [
        (users[r["user_idx"]], items[r["item_idx"]], r["ts"], r["value"])
        for r in ds.interactions_table().to_pylist()
    ]


@pytest.mark.parametrize(
    ("policy", "expected", "folded"),
    [
        # latest by time; a tie in time goes to the later line; no time counts as oldest
        ("keep-last", [("a", "x", 30, 3.0), ("b", "y", 5, 2.0), ("c", "z", 5, 7.0)], 3),
        # earliest by time; no time counts as oldest
        ("keep-first", [("a", "x", 10, 2.0), ("b", "y", None, 1.0), ("c", "z", 5, 7.0)], 3),
        ("sum", [("a", "x", 30, 6.0), ("b", "y", 5, 3.0), ("c", "z", 5, 7.0)], 3),
        ("count", [("a", "x", 30, 3.0), ("b", "y", 5, 2.0), ("c", "z", 5, 1.0)], 3),
        (
            "none",
            [
                ("a", "x", 10, 2.0),
                ("a", "x", 30, 1.0),
                ("a", "x", 30, 3.0),
                ("b", "y", None, 1.0),
                ("b", "y", 5, 2.0),
                ("c", "z", 5, 7.0),
            ],
            0,
        ),
    ],
)
def test_dedupe_policies(tmp_path: Path, policy: str, expected: list[Row], folded: int) -> None:
    src = tmp_path / "log.csv"
    src.write_text(LOG)
    result = ingest([src], tmp_path / "ds", IngestConfig(dedupe=policy), progress=False)  # type: ignore[arg-type]
    assert interactions(result) == expected
    rows = result.quality
    assert rows["duplicates"] == 3  # two extra (a, x) rows and one extra (b, y) row
    assert rows["folded"] == folded
    assert rows["accepted"] == 6 == rows["interactions"] + rows["folded"]
    assert result.dataset.manifest.value_kind == ("count" if policy == "count" else "rating")


FIRST = "user,item,rating,ts\nu10,i1,1,100\nu2,i1,2,200\nu10,i2,3,300\n"
SECOND = "user,item,rating,ts\nu2,i1,5,400\nu1,i3,1,500\nu10,i9,2,50\nbad,,1,1\n"


def test_append_keeps_indices_and_dedupes_across_old_and_new(tmp_path: Path) -> None:
    (tmp_path / "first.csv").write_text(FIRST)
    (tmp_path / "second.csv").write_text(SECOND)
    (tmp_path / "dirty.csv").write_text("user,item,rating,ts\n,i1,1,1\n")
    ds = tmp_path / "ds"
    first = ingest([tmp_path / "first.csv", tmp_path / "dirty.csv"], ds, progress=False)
    assert first.dataset.users.column("user_id").to_pylist() == ["u10", "u2"]
    assert first.dataset.items.column("item_id").to_pylist() == ["i1", "i2"]
    # a split made on the old data no longer covers the new data: it is dropped
    split_dir = ds / "splits" / "old"
    split_dir.mkdir(parents=True)
    (split_dir / "split.json").write_text(json.dumps({"name": "old"}))

    second = ingest([tmp_path / "second.csv"], ds, append=True, progress=False)
    # old indices unchanged; new ids after them, in their own (string) order
    assert second.dataset.users.column("user_id").to_pylist() == ["u10", "u2", "u1"]
    assert second.dataset.items.column("item_id").to_pylist() == ["i1", "i2", "i3", "i9"]
    # keep-last across old and new: (u2, i1) now has the newer row
    assert interactions(second) == [
        ("u10", "i1", 100, 1.0),
        ("u10", "i2", 300, 3.0),
        ("u10", "i9", 50, 2.0),
        ("u2", "i1", 400, 5.0),
        ("u1", "i3", 500, 1.0),
    ]
    q = second.quality
    assert row_counts(q) == {
        "rows_in": 8,
        "accepted": 6,
        "rejected": 2,
        "interactions": 5,
        "duplicates": 1,
        "folded": 1,
    }
    assert q["conservation"]["holds"]
    assert [s["path"] for s in q["sources"]] == [
        str(tmp_path / "first.csv"),
        str(tmp_path / "dirty.csv"),
        str(tmp_path / "second.csv"),
    ]
    manifest = second.dataset.manifest
    assert [Path(s.path).name for s in manifest.sources] == ["first.csv", "dirty.csv", "second.csv"]
    assert manifest.n_input_rows == 8 and manifest.n_rejected == 2
    # rejected rows of both ingests are kept, the old ones first
    rejected = read_parts(ds / "rejected").to_pylist()
    assert [(Path(r["source"]).name, r["line"], r["reason"]) for r in rejected] == [
        ("dirty.csv", 2, "missing_user"),
        ("second.csv", 5, "missing_item"),
    ]
    assert second.dataset.split_names() == []
    assert q["dropped_splits"] == ["old"]


def test_append_count_policy_adds_counts(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("user,item\n1,1\n1,1\n2,1\n")
    (tmp_path / "b.csv").write_text("user,item\n1,1\n3,2\n")
    config = IngestConfig(dedupe="count")
    ingest([tmp_path / "a.csv"], tmp_path / "ds", config, progress=False)
    result = ingest([tmp_path / "b.csv"], tmp_path / "ds", config, append=True, progress=False)
    assert interactions(result) == [
        ("1", "1", None, 3.0),
        ("2", "1", None, 1.0),
        ("3", "2", None, 1.0),
    ]
    assert result.quality["folded"] == 2


def test_append_kcore_never_removes_existing_interactions(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("user,item\n1,1\n")
    (tmp_path / "b.csv").write_text("user,item\n1,2\n2,3\n")
    ingest([tmp_path / "a.csv"], tmp_path / "ds", progress=False)
    result = ingest(
        [tmp_path / "b.csv"],
        tmp_path / "ds",
        IngestConfig(min_user_interactions=2),
        append=True,
        progress=False,
    )
    # user 1 reaches 2 interactions with the old one; user 2 has one and is removed
    assert interactions(result) == [("1", "1", None, 1.0), ("1", "2", None, 1.0)]
    assert result.dataset.users.column("user_id").to_pylist() == ["1"]
    assert result.dataset.items.column("item_id").to_pylist() == ["1", "2"]
    assert result.quality["rejected_by_reason"]["kcore"] == 1
    assert result.quality["conservation"]["holds"]


def test_appending_the_same_file_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("user,item\n1,1\n")
    ingest([tmp_path / "a.csv"], tmp_path / "ds", progress=False)
    before = (tmp_path / "ds" / "manifest.json").read_text()
    with pytest.raises(InputError, match=r"a\.csv was already ingested into .*ds"):
        ingest([tmp_path / "a.csv"], tmp_path / "ds", append=True, progress=False)
    assert (tmp_path / "ds" / "manifest.json").read_text() == before


def test_append_to_a_missing_dataset_creates_it(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("user,item\n1,1\n")
    result = ingest([tmp_path / "a.csv"], tmp_path / "new", append=True, progress=False)
    assert interactions(result) == [("1", "1", None, 1.0)]
