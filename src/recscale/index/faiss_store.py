"""FAISS indexes: exact (``IndexFlatIP``) or approximate (HNSW, IVF), saved as a directory.

::

    <path>/
      index.json    the IndexInfo (kind, parameters, similarity, run, version)
      items.faiss   the searched index, by inner product
      items.npy     item vectors, for "similar items" look-ups (memory-mapped when opened)
      users.npy     user vectors

A cosine run's vectors are unit vectors already, so the inner product is its similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recscale.dataset.files import atomic_directory
from recscale.errors import BackendUnavailableError, ConfigError
from recscale.index.base import IndexInfo, VectorIndex
from recscale.index.embeddings import Embeddings

__all__ = ["FaissIndex", "write_faiss_index"]

INFO, ITEMS, ITEM_VECTORS, USER_VECTORS = "index.json", "items.faiss", "items.npy", "users.npy"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency of the serve extra
        raise BackendUnavailableError(
            "FAISS is not installed: pip install 'recscale[serve]' (faiss-cpu)"
        ) from None
    return faiss


def _build(embeddings: Embeddings, kind: str, params: dict[str, int]) -> Any:
    faiss = _faiss()
    dim, items = embeddings.dim, embeddings.items
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["m"], ip)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], ip)
        index.train(items)
        index.nprobe = params["nprobe"]
    index.add(items)
    return index


def write_faiss_index(path: str | Path, embeddings: Embeddings, info: IndexInfo) -> FaissIndex:
    """Build the index ``info`` describes over ``embeddings`` and save it to ``path``.

    The directory is replaced only once the new one is complete: a failed export leaves an
    existing index as it was.
    """
    faiss = _faiss()
    index = _build(embeddings, info.kind, info.params)
    with atomic_directory(path) as tmp:
        faiss.write_index(index, str(tmp / ITEMS))
        np.save(tmp / ITEM_VECTORS, embeddings.items)
        np.save(tmp / USER_VECTORS, embeddings.users)
        (tmp / INFO).write_text(info.to_json() + "\n")
    return FaissIndex.open(path)


class FaissIndex(VectorIndex):
    """A FAISS index directory opened for search."""

    def __init__(self, info: IndexInfo, index: Any, items: np.ndarray, users: np.ndarray):
        self.info = info
        self._index = index
        self._items = items
        self._users = users

    @classmethod
    def open(cls, path: str | Path) -> FaissIndex:
        path = Path(path)
        if not (path / INFO).is_file():
            raise ConfigError(
                f"{path} is not a FAISS index directory (no {INFO}); "
                "create it with `recscale export --run RUN --index PATH`"
            )
        info = IndexInfo.from_json((path / INFO).read_text(), str(path / INFO))
        faiss = _faiss()
        index = faiss.read_index(str(path / ITEMS))
        items = np.load(path / ITEM_VECTORS, mmap_mode="r")
        users = np.load(path / USER_VECTORS, mmap_mode="r")
        if index.ntotal != info.n_items or items.shape != (info.n_items, info.dim):
            raise ConfigError(
                f"{path}: the index holds {index.ntotal} items, index.json says {info.n_items}"
            )
        return cls(info, index, items, users)

    @classmethod
    def in_memory(cls, embeddings: Embeddings, run_dir: str | Path) -> FaissIndex:
        """An exact index of ``embeddings`` that lives in memory only (nothing written)."""
        info = IndexInfo.of(embeddings, run_dir, backend="faiss", kind="flat")
        return cls(info, _build(embeddings, "flat", {}), embeddings.items, embeddings.users)

    def _search_params(self, selector: Any | None) -> Any:
        faiss = _faiss()
        p = self.info.params
        if self.info.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=p["ef_search"])
        if self.info.kind == "ivf":
            return faiss.SearchParametersIVF(sel=selector, nprobe=p["nprobe"])
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def _search(
        self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if exclude is None:
            scores, items = self._index.search(queries, k, params=self._search_params(None))
        else:
            faiss = _faiss()
            scores = np.empty((len(queries), k), np.float32)
            items = np.empty((len(queries), k), np.int64)
            for i, seen in enumerate(exclude):
                seen = np.ascontiguousarray(seen, dtype=np.int64)
                selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(seen)) if len(seen) else None
                scores[i], items[i] = self._index.search(
                    queries[i : i + 1], k, params=self._search_params(selector)
                )
        scores[items < 0] = -np.inf
        return scores, items

    def user_vectors(self, users: np.ndarray) -> np.ndarray:
        return np.asarray(self._users[self._check_ids(users, self.info.n_users, "user")])

    def item_vectors(self, items: np.ndarray) -> np.ndarray:
        return np.asarray(self._items[self._check_ids(items, self.info.n_items, "item")])
