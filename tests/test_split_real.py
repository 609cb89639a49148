"""make_split on real MovieLens 100K ratings, checked against a pandas brute force."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recscale.config import SplitConfig
from recscale.dataset import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    USERS_SCHEMA,
    Manifest,
    write_parquet_parts,
)
from recscale.ingest.split import make_split

DATA = Path(
    os.environ.get("RECSCALE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
U_DATA = DATA / "ml-100k" / "u.data.gz"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not U_DATA.exists(), reason=f"RECSCALE_DATA has no {U_DATA}"),
]


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """ml-100k as a dataset directory, built with the dataset helpers only (not ingest)."""
    raw = pd.read_csv(U_DATA, sep="\t", names=["user", "item", "rating", "ts"])
    users, user_idx = np.unique(raw["user"], return_inverse=True)
    items, item_idx = np.unique(raw["item"], return_inverse=True)
    df = pd.DataFrame(
        {
            "user_idx": user_idx.astype(np.int32),
            "item_idx": item_idx.astype(np.int32),
            "ts": raw["ts"].astype(np.int64),
            "value": raw["rating"].astype(np.float32),
        }
    )
    path = tmp_path_factory.mktemp("ml100k") / "ds"
    path.mkdir()
    table = pa.Table.from_pandas(df, schema=INTERACTIONS_SCHEMA, preserve_index=False)
    write_parquet_parts(table, path / "interactions", INTERACTIONS_SCHEMA, rows_per_file=30_000)
    pq.write_table(
        pa.table(
            {"user_idx": np.arange(len(users), dtype=np.int32), "user_id": users.astype(str)},
            schema=USERS_SCHEMA,
        ),
        path / "users.parquet",
    )
    pq.write_table(
        pa.table(
            {"item_idx": np.arange(len(items), dtype=np.int32), "item_id": items.astype(str)},
            schema=ITEMS_SCHEMA,
        ),
        path / "items.parquet",
    )
    Manifest(len(users), len(items), len(df), 0, len(df), {"user": "user"}, "rating").write(path)
    return path, df


def frame(split, part: str) -> pd.DataFrame:
    return split.table(part).to_pandas()


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    cols = ["user_idx", "item_idx", "ts", "value"]
    a = a[cols].sort_values(cols).reset_index(drop=True)
    b = b[cols].sort_values(cols).reset_index(drop=True)
    return a.astype("float64").equals(b.astype("float64"))


def test_leave_last_on_ml100k_equals_pandas(ml100k):
    path, df = ml100k
    split = make_split(path, SplitConfig(k=1, min_history=3))
    ordered = df.sort_values(["user_idx", "ts", "item_idx", "value"])
    from_end = ordered.groupby("user_idx").cumcount(ascending=False)
    n = ordered.groupby("user_idx")["item_idx"].transform("size")
    assert same_rows(frame(split, "test"), ordered[(from_end == 0) & (n >= 3)])
    assert same_rows(frame(split, "valid"), ordered[(from_end == 1) & (n >= 3)])
    assert same_rows(frame(split, "train"), ordered[(from_end >= 2) | (n < 3)])
    assert split.meta["counts"] == {"train": 100_000 - 2 * 943, "valid": 943, "test": 943}


def test_temporal_on_ml100k_has_no_future_in_train(ml100k):
    path, df = ml100k
    split = make_split(path, SplitConfig(strategy="temporal"))
    train, valid, test = (frame(split, p) for p in ("train", "valid", "test"))
    assert len(train) + len(valid) + len(test) == len(df)
    assert train["ts"].max() < valid["ts"].min() <= valid["ts"].max() < test["ts"].min()
    assert test["ts"].min() == split.meta["test_cutoff"]
    assert same_rows(test, df[df["ts"] >= split.meta["test_cutoff"]])
    # quantile_disc: the cutoff is the 90% timestamp of the data itself
    assert (
        split.meta["test_cutoff"] == np.sort(df["ts"].to_numpy())[int(np.ceil(0.9 * len(df))) - 1]
    )
