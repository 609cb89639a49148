"""A run's vectors → a vector index (Milvus Lite / Milvus / FAISS); no torch here.

``export_index(run, target)`` writes the index, ``open_index(target)`` opens it for search; the
target string says where it lives (see :mod:`recscale.index.base`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recscale.index.base import KINDS, IndexInfo, VectorIndex, backend_of
from recscale.index.embeddings import Embeddings, read_embeddings

__all__ = [
    "KINDS",
    "Embeddings",
    "IndexInfo",
    "VectorIndex",
    "backend_of",
    "export_index",
    "open_index",
    "read_embeddings",
]


def export_index(
    run_dir: str | Path,
    target: str | Path,
    *,
    kind: str = "flat",
    params: dict[str, Any] | None = None,
    collection: str | None = None,
    token: str | None = None,
) -> VectorIndex:
    """Write run ``run_dir``'s item and user vectors to ``target``; returns the opened index.

    ``kind`` is ``flat`` (exact), ``hnsw`` or ``ivf``, with ``params`` from
    :data:`~recscale.index.base.KINDS`. ``collection`` and ``token`` apply to Milvus only.
    """
    embeddings = read_embeddings(run_dir)
    backend = backend_of(str(target))
    info = IndexInfo.of(embeddings, run_dir, backend=backend, kind=kind, params=params)
    if backend == "milvus":
        from recscale.index.milvus_store import DEFAULT_COLLECTION, write_milvus_index

        return write_milvus_index(
            _milvus_uri(target),
            embeddings,
            info,
            collection=collection or DEFAULT_COLLECTION,
            token=token,
        )
    from recscale.index.faiss_store import write_faiss_index

    return write_faiss_index(target, embeddings, info)


def open_index(
    target: str | Path, *, collection: str | None = None, token: str | None = None
) -> VectorIndex:
    """The index at ``target``, ready to search."""
    if backend_of(str(target)) == "milvus":
        from recscale.index.milvus_store import DEFAULT_COLLECTION, MilvusIndex

        return MilvusIndex.open(
            _milvus_uri(target), collection=collection or DEFAULT_COLLECTION, token=token
        )
    from recscale.index.faiss_store import FaissIndex

    return FaissIndex.open(target)


def _milvus_uri(target: str | Path) -> str:
    text = str(target)
    # Milvus Lite wants a file path; an absolute one keeps a later working directory harmless
    return text if "://" in text else str(Path(text).resolve())
