"""A run's exported vectors (``runs/<name>/embeddings/``), read without the model's code.

``recscale train`` writes ``users.parquet`` and ``items.parquet`` (``idx int32``, ``vector
fixed_size_list<float32>``) for every model whose scores are inner products of a user vector and
an item vector (see :func:`recscale.train.run.write_embeddings`); their schema metadata names the
model and its similarity (``dot`` or ``cosine``; a cosine model's vectors are unit vectors).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from recscale.errors import RunError

__all__ = ["SIMILARITIES", "Embeddings", "read_embeddings"]

SIMILARITIES = ("dot", "cosine")


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """User and item vectors of one run, row ``i`` for dense index ``i``."""

    users: np.ndarray  # float32 (n_users, dim)
    items: np.ndarray  # float32 (n_items, dim)
    model: str
    similarity: str  # "dot" or "cosine"
    version: str  # a digest of the vectors: two exports of the same run share it

    @property
    def dim(self) -> int:
        return int(self.items.shape[1])


def read_embeddings(run_dir: str | Path) -> Embeddings:
    """The vectors a run exported; a run without them is a :class:`RunError` saying why."""
    directory = Path(run_dir) / "embeddings"
    if not Path(run_dir).is_dir():
        raise RunError(f"run directory {str(run_dir)!r} does not exist")
    if not (directory / "items.parquet").is_file() or not (directory / "users.parquet").is_file():
        raise RunError(
            f"run {run_dir} has no embeddings ({directory}/users.parquet and items.parquet): "
            "only models that score by an inner product of vectors export them (mf-bpr, "
            "lightgcn, ials, two-tower, sasrec, popularity), when their training finishes"
        )
    matrices, meta = [], {}
    digest = hashlib.sha256()
    for name in ("users", "items"):
        path = directory / f"{name}.parquet"
        table = pq.read_table(path)
        if table.column_names != ["idx", "vector"]:
            raise RunError(f"{path}: expected columns idx, vector; found {table.column_names}")
        idx = table.column("idx").to_numpy()
        if not np.array_equal(idx, np.arange(len(idx))):
            raise RunError(f"{path}: idx must be 0..n-1 in order")
        vectors = table.column("vector").combine_chunks()
        dim = vectors.type.list_size
        matrix = vectors.flatten().to_numpy().astype(np.float32, copy=False).reshape(-1, dim)
        matrices.append(np.ascontiguousarray(matrix))
        digest.update(matrix.tobytes())
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    users, items = matrices
    if users.shape[1] != items.shape[1]:
        raise RunError(
            f"{directory}: user vectors have {users.shape[1]} dimensions, items {items.shape[1]}"
        )
    similarity = meta.get("recscale.similarity", "dot")
    if similarity not in SIMILARITIES:
        raise RunError(f"{directory}: unknown similarity {similarity!r}; expected dot or cosine")
    return Embeddings(
        users=users,
        items=items,
        model=meta.get("recscale.model", "unknown"),
        similarity=similarity,
        version=digest.hexdigest()[:16],
    )
