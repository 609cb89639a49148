"""Column names and Arrow schemas of the dataset format (see ``dataset/README.md``)."""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INTERACTIONS_SCHEMA",
    "ITEMS_SCHEMA",
    "REJECTED_SCHEMA",
    "SPLIT_PARTS",
    "USERS_SCHEMA",
]

FORMAT_NAME = "recscale-dataset"
FORMAT_VERSION = 1

#: One accepted interaction. Indices are dense (0..n-1) and index embedding tables directly.
INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("ts", pa.int64(), nullable=True),  # unix seconds; null when the source has none
        pa.field("value", pa.float32(), nullable=False),  # rating, count or 1.0 for implicit
    ]
)

#: user_idx -> original id; extra feature columns may follow.
USERS_SCHEMA = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
    ]
)

#: item_idx -> original id; title, genres and other features may follow.
ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
    ]
)

#: Every input row that was not accepted, with where it came from and why.
REJECTED_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # the input file
        pa.field("line", pa.int64(), nullable=True),  # 1-based line (text) or row (parquet) number
        pa.field("raw", pa.string(), nullable=True),  # the raw text of the row, as read
        pa.field("reason", pa.string(), nullable=False),  # a reason code, see ingest.rules
        pa.field("detail", pa.string(), nullable=True),  # the offending field and value
    ]
)

SPLIT_PARTS = ("train", "valid", "test")
