"""The dataset contract: atomic writes, Parquet parts, manifest, reading back, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recscale.dataset import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    USERS_SCHEMA,
    Manifest,
    atomic_directory,
    open_dataset,
    read_parts,
    write_parquet_parts,
)
from recscale.errors import DatasetError, SplitNotFoundError, UnknownIdError


def interactions(n: int, n_users: int = 5, n_items: int = 7, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ts = pa.array(rng.integers(0, 10**9, n), pa.int64(), mask=rng.random(n) < 0.2)
    return pa.table(
        {
            "user_idx": pa.array(rng.integers(0, n_users, n), pa.int32()),
            "item_idx": pa.array(rng.integers(0, n_items, n), pa.int32()),
            "ts": ts,
            "value": pa.array(rng.random(n), pa.float32()),
        }
    )


def write_dataset(root, table: pa.Table, n_users: int = 5, n_items: int = 7) -> None:
    write_parquet_parts(table, root / "interactions", INTERACTIONS_SCHEMA)
    users = pa.table(
        {
            "user_idx": pa.array(range(n_users), pa.int32()),
            "user_id": [f"u{i}" for i in range(n_users)],
        }
    )
    items = pa.table(
        {
            "item_idx": pa.array(range(n_items), pa.int32()),
            "item_id": [f"i{i}" for i in range(n_items)],
        }
    )
    pq.write_table(users.cast(USERS_SCHEMA), root / "users.parquet")
    pq.write_table(
        items.append_column("title", pa.array([f"Title {i}" for i in range(n_items)])),
        root / "items.parquet",
    )
    assert items.schema.names == ITEMS_SCHEMA.names
    Manifest(
        n_users=n_users,
        n_items=n_items,
        n_interactions=table.num_rows,
        n_rejected=0,
        n_input_rows=table.num_rows,
        columns={"user": "u", "item": "i", "time": "t", "value": "v"},
        value_kind="rating",
    ).write(root)


def test_atomic_directory_keeps_the_old_contents_on_failure(tmp_path) -> None:
    target = tmp_path / "ds"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("crash half-way")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary left behind
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_parts_and_row_groups(tmp_path) -> None:
    table = interactions(2500)
    n = write_parquet_parts(
        table, tmp_path / "p", INTERACTIONS_SCHEMA, rows_per_file=1000, rows_per_group=300
    )
    files = sorted((tmp_path / "p").glob("part-*.parquet"))
    assert n == 2500 and [f.name for f in files] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [1000, 1000, 500]
    assert pq.ParquetFile(files[0]).metadata.num_row_groups == 4
    assert read_parts(tmp_path / "p").equals(table.cast(INTERACTIONS_SCHEMA))


def test_empty_input_still_writes_a_readable_part(tmp_path) -> None:
    assert write_parquet_parts(interactions(0), tmp_path / "e", INTERACTIONS_SCHEMA) == 0
    assert read_parts(tmp_path / "e").num_rows == 0


def test_open_dataset_reads_back(tmp_path) -> None:
    table = interactions(100)
    write_dataset(tmp_path, table)
    ds = open_dataset(tmp_path)
    assert (ds.n_users, ds.n_items) == (5, 7)
    inter = ds.interactions()
    assert np.array_equal(inter.user_idx, table.column("user_idx").to_numpy())
    assert np.array_equal(inter.ts, table.column("ts").fill_null(-1).to_numpy())
    csr = inter.to_csr()
    dense = np.zeros((5, 7))
    dense[inter.user_idx, inter.item_idx] = 1
    assert np.array_equal(csr.toarray(), dense)
    assert ds.user_index("u3") == 3
    assert ds.item_titles(np.array([6, 0])) == ["Title 6", "Title 0"]
    with pytest.raises(UnknownIdError, match="unknown user id 'nobody'"):
        ds.user_index("nobody")
    with pytest.raises(SplitNotFoundError, match=r"has no split 'given' \(splits: none\)"):
        ds.split("given")


def test_missing_and_corrupt_datasets_are_dataset_errors(tmp_path) -> None:
    with pytest.raises(DatasetError, match=r"dataset '.*nowhere' does not exist"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"not a recscale dataset \(no manifest\.json\)"):
        open_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="corrupt manifest"):
        open_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"format": "recscale-dataset", "format_version": 99})
    )
    with pytest.raises(DatasetError, match="format_version 99 is not supported"):
        open_dataset(tmp_path)


def test_corrupt_parquet_is_a_dataset_error(tmp_path) -> None:
    write_dataset(tmp_path, interactions(10))
    (tmp_path / "interactions" / "part-00000.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DatasetError, match="unreadable Parquet"):
        open_dataset(tmp_path).interactions()


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 50), st.integers(0, 80), st.one_of(st.none(), st.integers(0, 2**40))
        ),
        max_size=60,
    )
)
def test_interactions_round_trip(tmp_path_factory, rows) -> None:
    root = tmp_path_factory.mktemp("rt")
    table = pa.table(
        {
            "user_idx": pa.array([r[0] for r in rows], pa.int32()),
            "item_idx": pa.array([r[1] for r in rows], pa.int32()),
            "ts": pa.array([r[2] for r in rows], pa.int64()),
            "value": pa.array([1.0] * len(rows), pa.float32()),
        }
    )
    write_parquet_parts(table, root, INTERACTIONS_SCHEMA, rows_per_file=7, rows_per_group=3)
    assert read_parts(root).equals(table.cast(INTERACTIONS_SCHEMA))


def test_small_batches_are_regrouped_into_full_row_groups(tmp_path) -> None:
    table = interactions(1000)
    batches = table.to_batches(max_chunksize=70)  # an engine handing out small batches
    n = write_parquet_parts(
        batches, tmp_path / "g", INTERACTIONS_SCHEMA, rows_per_file=600, rows_per_group=250
    )
    meta = [pq.ParquetFile(f).metadata for f in sorted((tmp_path / "g").glob("part-*.parquet"))]
    sizes = [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in meta]
    assert n == 1000 and sizes == [[250, 250, 100], [150, 250]]
    assert read_parts(tmp_path / "g").equals(table.cast(INTERACTIONS_SCHEMA))
