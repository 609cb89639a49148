"""recscale.ingest on the real data sets (RECSCALE_DATA) and on a CSV larger than its memory limit."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from recscale.config import IngestConfig
from recscale.dataset import read_parts
from recscale.ingest import ingest

DATA = Path(
    os.environ.get("RECSCALE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)

pytestmark = pytest.mark.slow


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"RECSCALE_DATA has no {path}")
    return path


def lightgcn_pairs(path: Path) -> set[tuple[int, int]]:
    """Brute force: the (user, item) pairs of a LightGCN text file."""
    pairs = set()
    with gzip.open(path, "rt") as fh:
        for line in fh:
            user, *items = line.split()
            pairs.update((int(user), int(i)) for i in items)
    return pairs


def test_gowalla(tmp_path: Path) -> None:
    folder = need(DATA / "gowalla")
    result = ingest([folder], tmp_path / "gowalla", progress=False)
    ds = result.dataset
    assert (ds.n_users, ds.n_items, ds.manifest.n_interactions) == (29_858, 40_981, 1_027_370)
    assert result.quality["rejected"] == 0
    # ids are 0..n-1, so every index equals its original id
    assert ds.users.column("user_id").to_pylist() == [str(i) for i in range(29_858)]
    assert ds.items.column("item_id").to_pylist() == [str(i) for i in range(40_981)]
    split = ds.split("given")
    assert split.meta["counts"] == {"train": 810_128, "valid": 0, "test": 217_242}
    for part, file in (("train", "train.txt.gz"), ("test", "test.txt.gz")):
        inter = split.interactions(part)
        got = set(zip(inter.user_idx.tolist(), inter.item_idx.tolist(), strict=True))
        assert got == lightgcn_pairs(folder / file), part
    values = ds.interactions()
    assert np.all(values.value == 1.0) and np.all(values.ts == -1)


def test_movielens_100k(tmp_path: Path) -> None:
    folder = need(DATA / "ml-100k")
    result = ingest([folder], tmp_path / "ml100k", progress=False)
    ds = result.dataset
    assert (ds.n_users, ds.n_items, ds.manifest.n_interactions) == (943, 1_682, 100_000)
    assert ds.item_titles([ds.items.column("item_id").to_pylist().index("1")]) == [
        "Toy Story (1995)"
    ]
    assert result.quality["time"]["min"] == "1997-09-20"
    assert result.quality["time"]["max"] == "1998-04-22"
    # against pandas on the same file
    frame = pd.read_csv(folder / "u.data.gz", sep="\t", names=["user", "item", "rating", "ts"])
    inter = ds.interactions_table().to_pandas()
    users = ds.users.column("user_id").to_numpy(zero_copy_only=False).astype(int)
    items = ds.items.column("item_id").to_numpy(zero_copy_only=False).astype(int)
    mine = pd.DataFrame(
        {
            "user": users[inter.user_idx],
            "item": items[inter.item_idx],
            "rating": inter.value.astype(int),
            "ts": inter.ts,
        }
    )
    pd.testing.assert_frame_equal(
        mine.sort_values(["user", "item"]).reset_index(drop=True),
        frame.sort_values(["user", "item"]).reset_index(drop=True),
    )
    titles = dict(
        zip(
            ds.items.column("item_id").to_pylist(),
            ds.items.column("title").to_pylist(),
            strict=True,
        )
    )
    assert titles["1005"] == "Double vie de Véronique, La (Double Life of Veronique, The) (1991)"
    assert set(ds.users.column_names) == {
        "user_idx",
        "user_id",
        "age",
        "gender",
        "occupation",
        "zip_code",
    }


def test_movielens_1m_ratings_prefix(tmp_path: Path) -> None:
    ratings = need(DATA / "ml-1m" / "ratings_users_1-2999.dat.gz")
    result = ingest([ratings], tmp_path / "ml1m", progress=False)
    ds = result.dataset
    assert (ds.n_users, ds.n_items, ds.manifest.n_interactions) == (2_999, 3_615, 487_650)
    assert result.quality["rejected"] == 0
    items = ds.items.to_pylist()
    by_id = {row["item_id"]: row for row in items}
    assert by_id["1193"]["title"] == "One Flew Over the Cuckoo's Nest (1975)"
    assert by_id["1"]["genres"] == ["Animation", "Children's", "Comedy"]
    assert {v for v in ds.interactions().value.tolist()} == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_movielens_latest_small(tmp_path: Path) -> None:
    folder = need(DATA / "ml-latest-small")
    result = ingest([folder], tmp_path / "mls", progress=False)
    ds = result.dataset
    assert (ds.n_users, ds.n_items, ds.manifest.n_interactions) == (671, 9_066, 100_004)
    assert result.quality["time"]["min"] == "1995-01-09"
    assert result.quality["time"]["max"] == "2016-10-16"
    by_id = {row["item_id"]: row for row in ds.items.to_pylist()}
    assert by_id["1"]["title"] == "Toy Story (1995)"
    assert by_id["1"]["genres"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]


def test_a_csv_larger_than_the_memory_limit(tmp_path: Path) -> None:
    """~150 MB of CSV through a 64 MB DuckDB memory limit; counts checked by a plain query."""
    src = tmp_path / "big.csv"
    con = duckdb.connect()
    con.execute(
        f"""COPY (SELECT (hash(i) % 300000) AS user_id, (hash(i * 7 + 1) % 60000) AS item_id,
                (1 + hash(i * 3) % 5) AS rating, 1000000000 + i AS ts
            FROM range(6000000) t(i)) TO '{src}' (HEADER true)"""
    )
    n_users, n_items, n_pairs = con.execute(
        f"""SELECT count(DISTINCT user_id), count(DISTINCT item_id),
                count(DISTINCT (user_id, item_id)) FROM read_csv('{src}')"""
    ).fetchall()[0]
    con.close()
    assert src.stat().st_size > 100 * 2**20
    result = ingest(
        [src], tmp_path / "ds", IngestConfig(memory_limit="64MB", threads=2), progress=False
    )
    ds = result.dataset
    assert (ds.n_users, ds.n_items, ds.manifest.n_interactions) == (n_users, n_items, n_pairs)
    assert result.quality["rows_in"] == 6_000_000
    assert result.quality["folded"] == 6_000_000 - n_pairs
    assert read_parts(ds.path / "rejected").num_rows == 0
