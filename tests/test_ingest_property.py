"""Property tests: original ids -> dataset -> users/items parquet -> the same original ids."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from recscale.config import IngestConfig
from recscale.ingest import IngestResult, ingest

INTS = st.integers(-(2**62), 2**62).map(str)
# ids are trimmed and may not hold control characters (bad_user), so none are generated here
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs")),
    min_size=1,
    max_size=10,
)
CSV_TEXT = st.text(alphabet='abcXYZ019_-,"é', min_size=1, max_size=8)


def is_canonical_int(text: str) -> bool:
    try:
        return str(int(text)) == text and -(2**63) <= int(text) < 2**63
    except ValueError:
        return False


def expected_order(ids: set[str]) -> list[str]:
    """The documented id order: numeric when every id is an integer, else string order."""
    if all(is_canonical_int(i) for i in ids):
        return sorted(ids, key=int)
    return sorted(ids, key=lambda s: s.encode())


def check_round_trip(result: IngestResult, pairs: list[tuple[str, str]]) -> None:
    ds = result.dataset
    users = ds.users.column("user_id").to_pylist()
    items = ds.items.column("item_id").to_pylist()
    assert ds.users.column("user_idx").to_pylist() == list(range(len(users)))
    assert users == expected_order({u for u, _ in pairs})
    assert items == expected_order({i for _, i in pairs})
    table = ds.interactions_table()
    got = {
        (users[u], items[i])
        for u, i in zip(
            table.column("user_idx").to_pylist(), table.column("item_idx").to_pylist(), strict=True
        )
    }
    assert got == set(pairs)
    assert table.num_rows == len(set(pairs))  # keep-last folds repeated pairs
    assert result.quality["rows_in"] == len(pairs)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.one_of(INTS, TEXT), st.one_of(INTS, TEXT)), min_size=1, max_size=30))
def test_ids_round_trip_through_parquet(pairs: list[tuple[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "log.parquet"
        users, items = zip(*pairs, strict=True)
        pq.write_table(pa.table({"user": list(users), "item": list(items)}), src)
        check_round_trip(ingest([src], Path(tmp) / "ds", progress=False), pairs)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.one_of(INTS, CSV_TEXT), INTS), min_size=1, max_size=30))
def test_ids_round_trip_through_quoted_csv(pairs: list[tuple[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "log.csv"
        with src.open("w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["user", "item"])
            writer.writerows(pairs)
        config = IngestConfig(header=True, user_col="user", item_col="item")
        check_round_trip(ingest([src], Path(tmp) / "ds", config, progress=False), pairs)
