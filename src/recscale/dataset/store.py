"""Opening a dataset directory and reading its tables, splits and id maps.

No engine and no torch here: Arrow for the files, NumPy for the arrays models consume.

A dataset's path is a :class:`pathlib.Path`, or any object with the same methods for the few
things read here (``/``, ``is_dir``, ``is_file``, ``iterdir``, ``glob``, ``read_text``, ``open``):
the Spark engine opens datasets on Hadoop filesystems that way. Tables of such paths are read
through ``open()``, file by file.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import scipy.sparse as sp

from recscale.dataset.manifest import Manifest
from recscale.dataset.schema import INTERACTIONS_SCHEMA, SPLIT_PARTS
from recscale.errors import DatasetError, SplitNotFoundError, UnknownIdError

__all__ = ["Dataset", "Interactions", "Split", "as_path", "open_dataset", "read_parts"]


def as_path(path: str | Path | Any) -> Path | Any:
    """A text as a local :class:`~pathlib.Path`; a path object (local or not) as it is."""
    return Path(path) if isinstance(path, str) else path


def _read_table(path: Path | Any, schema: pa.Schema | None = None) -> pa.Table:
    if isinstance(path, Path):
        return pq.read_table(path, schema=schema)
    with path.open("rb") as fh:
        return pq.read_table(fh, schema=schema)


@dataclasses.dataclass(frozen=True)
class Interactions:
    """Interactions as parallel NumPy arrays over the dataset's dense indices."""

    user_idx: np.ndarray  # int32
    item_idx: np.ndarray  # int32
    ts: np.ndarray  # int64; -1 where the source had no time
    value: np.ndarray  # float32
    n_users: int
    n_items: int

    def __len__(self) -> int:
        return len(self.user_idx)

    @classmethod
    def from_table(cls, table: pa.Table, n_users: int, n_items: int) -> Interactions:
        ts = table.column("ts")
        return cls(
            user_idx=table.column("user_idx").to_numpy().astype(np.int32, copy=False),
            item_idx=table.column("item_idx").to_numpy().astype(np.int32, copy=False),
            ts=ts.fill_null(-1).to_numpy().astype(np.int64, copy=False),
            value=table.column("value").to_numpy().astype(np.float32, copy=False),
            n_users=n_users,
            n_items=n_items,
        )

    @classmethod
    def concat(cls, *parts: Interactions) -> Interactions:
        """The rows of ``parts`` one after another (all over the same users and items)."""
        if not parts:
            raise DatasetError("Interactions.concat needs at least one part")
        sizes = {(p.n_users, p.n_items) for p in parts}
        if len(sizes) != 1:
            raise DatasetError(f"cannot concatenate interactions over different sizes: {sizes}")
        return cls(
            user_idx=np.concatenate([p.user_idx for p in parts]),
            item_idx=np.concatenate([p.item_idx for p in parts]),
            ts=np.concatenate([p.ts for p in parts]),
            value=np.concatenate([p.value for p in parts]),
            n_users=parts[0].n_users,
            n_items=parts[0].n_items,
        )

    def sequences(self) -> tuple[np.ndarray, np.ndarray]:
        """Each user's items in time order, as CSR arrays ``(indptr, items)``.

        ``items[indptr[u]:indptr[u + 1]]`` is user ``u``'s history, oldest first; ties in time
        (and rows without one, ``ts == -1``, which come first) keep their order in the arrays.
        """
        order = np.lexsort((self.ts, self.user_idx))  # stable: by user, then time
        counts = np.bincount(self.user_idx, minlength=self.n_users)
        indptr = np.zeros(self.n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return indptr, self.item_idx[order].astype(np.int64)

    def to_csr(self, values: str = "ones") -> sp.csr_matrix:
        """The users × items matrix; ``values`` is ``"ones"`` (binary) or ``"value"``."""
        data = np.ones(len(self), np.float32) if values == "ones" else self.value
        matrix = sp.csr_matrix(
            (data, (self.user_idx, self.item_idx)),
            shape=(self.n_users, self.n_items),
            dtype=np.float32,
        )
        if values == "ones":
            matrix.data[:] = 1.0  # duplicates were summed; binary means seen at least once
        matrix.sort_indices()
        return matrix

    def user_lists(self) -> list[np.ndarray]:
        """Item indices of each user (index = user), in no particular order."""
        csr = self.to_csr()
        return [csr.indices[csr.indptr[u] : csr.indptr[u + 1]] for u in range(self.n_users)]


def read_parts(directory: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read every ``part-*.parquet`` under ``directory`` as one table with the dataset schema."""
    directory = as_path(directory)
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        raise DatasetError(f"{directory}: no part-*.parquet files")
    try:
        schema = _schema_for(files[0])
        if isinstance(directory, Path):
            table = pads.dataset([str(f) for f in files], format="parquet", schema=schema).to_table(
                columns=columns
            )
        else:
            table = pa.concat_tables(_read_table(f, schema) for f in files)
            table = table.select(columns) if columns is not None else table
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{directory}: unreadable Parquet: {exc}") from None
    return table


def _schema_for(first: Path | Any) -> pa.Schema:
    try:
        if isinstance(first, Path):
            return pq.read_schema(first)
        with first.open("rb") as fh:
            return pq.read_schema(fh)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{first}: unreadable Parquet: {exc}") from None


class Split:
    """One split of a dataset: ``splits/<name>/{train,valid,test}/part-*.parquet`` + ``split.json``."""

    def __init__(self, dataset: Dataset, name: str) -> None:
        self.dataset = dataset
        self.name = name
        self.path = dataset.path / "splits" / name
        if not (self.path / "split.json").is_file():
            have = ", ".join(dataset.split_names()) or "none"
            raise SplitNotFoundError(
                f"dataset {dataset.path} has no split {name!r} (splits: {have}); "
                f"create it with `recscale split {dataset.path} --strategy ...`"
            )

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "split.json").read_text())

    def has(self, part: str) -> bool:
        return (self.path / part).is_dir() and any((self.path / part).glob("part-*.parquet"))

    def table(self, part: str) -> pa.Table:
        if part not in SPLIT_PARTS:
            raise ValueError(f"part must be one of {SPLIT_PARTS}, got {part!r}")
        if not self.has(part):
            raise DatasetError(f"split {self.name!r} of {self.dataset.path} has no {part!r} part")
        return read_parts(self.path / part)

    def interactions(self, part: str) -> Interactions:
        return Interactions.from_table(self.table(part), self.dataset.n_users, self.dataset.n_items)

    def seen(self) -> sp.csr_matrix:
        """users × items CSR of what each user has been shown: the train and valid parts.

        What recommendations leave out; each user's items are ``indices[indptr[u]:indptr[u+1]]``.
        """
        seen = self.interactions("train").to_csr()
        if self.has("valid"):
            seen = (seen + self.interactions("valid").to_csr()).tocsr()
        return seen

    def __repr__(self) -> str:
        return f"Split({str(self.dataset.path)!r}, {self.name!r})"


class Dataset:
    """A dataset directory (see ``dataset/README.md``), opened read-only."""

    def __init__(self, path: str | Path | Any) -> None:
        self.path = as_path(path)
        if not self.path.is_dir():
            raise DatasetError(
                f"dataset {str(self.path)!r} does not exist; create it with `recscale ingest ... --out {self.path}`"
            )
        self.manifest = Manifest.read(self.path)

    @property
    def n_users(self) -> int:
        return self.manifest.n_users

    @property
    def n_items(self) -> int:
        return self.manifest.n_items

    def interactions_table(self, columns: list[str] | None = None) -> pa.Table:
        return read_parts(self.path / "interactions", columns)

    def interactions(self) -> Interactions:
        return Interactions.from_table(self.interactions_table(), self.n_users, self.n_items)

    def interaction_files(self) -> list[Path]:
        return sorted((self.path / "interactions").glob("part-*.parquet"))

    @cached_property
    def users(self) -> pa.Table:
        return _read_table(self.path / "users.parquet")

    @cached_property
    def items(self) -> pa.Table:
        return _read_table(self.path / "items.parquet")

    @cached_property
    def _user_index(self) -> dict[str, int]:
        return dict(
            zip(
                self.users.column("user_id").to_pylist(),
                self.users.column("user_idx").to_pylist(),
                strict=True,
            )
        )

    def user_id_map(self) -> dict[str, int]:
        """Original user id -> dense index, for every user (built once, then shared)."""
        return self._user_index

    def user_index(self, user_id: str | int) -> int:
        """The dense index of an original user id; an unknown id is an :class:`UnknownIdError`."""
        try:
            return self._user_index[str(user_id)]
        except KeyError:
            raise UnknownIdError(
                f"unknown user id {str(user_id)!r}: not in {self.path / 'users.parquet'}"
            ) from None

    def item_ids(self, item_idx: np.ndarray) -> list[str]:
        ids = self.items.column("item_id").to_numpy(zero_copy_only=False)
        return [str(x) for x in ids[np.asarray(item_idx, dtype=np.int64)]]

    def item_titles(self, item_idx: np.ndarray) -> list[str | None]:
        if "title" not in self.items.column_names:
            return [None] * len(item_idx)
        titles = self.items.column("title").to_numpy(zero_copy_only=False)
        return list(titles[np.asarray(item_idx, dtype=np.int64)])

    @cached_property
    def quality(self) -> dict[str, Any]:
        path = self.path / "quality.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def split_names(self) -> list[str]:
        root = self.path / "splits"
        return (
            sorted(p.name for p in root.iterdir() if (p / "split.json").is_file())
            if root.is_dir()
            else []
        )

    def split(self, name: str) -> Split:
        return Split(self, name)

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, users={self.n_users}, items={self.n_items}, interactions={self.manifest.n_interactions})"


def open_dataset(path: str | Path | Any) -> Dataset:
    """Open the dataset directory at ``path``; a missing or invalid one is a :class:`DatasetError`."""
    return Dataset(path)


INTERACTION_COLUMNS = INTERACTIONS_SCHEMA.names
