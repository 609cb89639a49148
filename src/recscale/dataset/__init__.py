"""The dataset format: the contract between every stage (see ``README.md`` in this folder)."""

from recscale.dataset.files import atomic_directory, file_sha256, write_parquet_parts
from recscale.dataset.manifest import Manifest, SourceFile
from recscale.dataset.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    REJECTED_SCHEMA,
    SPLIT_PARTS,
    USERS_SCHEMA,
)
from recscale.dataset.store import Dataset, Interactions, Split, open_dataset, read_parts

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INTERACTIONS_SCHEMA",
    "ITEMS_SCHEMA",
    "REJECTED_SCHEMA",
    "SPLIT_PARTS",
    "USERS_SCHEMA",
    "Dataset",
    "Interactions",
    "Manifest",
    "SourceFile",
    "Split",
    "atomic_directory",
    "file_sha256",
    "open_dataset",
    "read_parts",
    "write_parquet_parts",
]
