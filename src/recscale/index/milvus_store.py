"""Milvus indexes through ``pymilvus``' ``MilvusClient``: Milvus Lite (a local ``.db`` file) or a
Milvus server or cluster (an ``http://host:port`` URI), by the same code.

An export writes two collections, ``<name>_items`` and ``<name>_users`` (``id`` int64 primary key
= the dense index, ``vector`` float vector), each under a fresh versioned name and reached through
an alias of the plain name. The alias moves to the new collections only once they are complete
and loaded, and the old ones are dropped after that: searches never see half an export, and a
failed export leaves the old index serving. The IndexInfo is a property of the items collection.

Milvus Lite builds IVF_FLAT with 128 lists whatever ``nlist`` says (a Milvus server honours it);
``nprobe`` applies to both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from recscale.errors import BackendUnavailableError, ConfigError
from recscale.index.base import IndexInfo, VectorIndex
from recscale.index.embeddings import Embeddings

__all__ = ["DEFAULT_COLLECTION", "MilvusIndex", "write_milvus_index"]

DEFAULT_COLLECTION = "recscale"
INSERT_BATCH = 10_000
MILVUS_INDEX = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}
MILVUS_METRIC = {"dot": "IP", "cosine": "COSINE"}
INFO_PROPERTY = "recscale.index"


def _client(uri: str, token: str | None) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError:  # pragma: no cover - pymilvus is a dependency of the serve extra
        raise BackendUnavailableError(
            "pymilvus is not installed: pip install 'recscale[serve]' (pymilvus, milvus-lite)"
        ) from None
    try:
        return MilvusClient(uri=uri, token=token or "")
    except Exception as exc:  # pymilvus raises its own types and plain ones alike
        raise ConfigError(f"cannot connect to Milvus at {uri!r}: {exc}") from None


def _build_params(kind: str, params: dict[str, int]) -> dict[str, int]:
    if kind == "hnsw":
        return {"M": params["m"], "efConstruction": params["ef_construction"]}
    if kind == "ivf":
        return {"nlist": params["nlist"]}
    return {}


def _create(client: Any, name: str, dim: int, info: IndexInfo, *, searched: bool) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index_params = client.prepare_index_params()
    index_params.add_index(
        field_name="vector",
        index_type=MILVUS_INDEX[info.kind] if searched else "FLAT",
        metric_type=MILVUS_METRIC[info.similarity],
        params=_build_params(info.kind, info.params) if searched else {},
    )
    client.create_collection(name, schema=schema, index_params=index_params)
    if searched:
        client.alter_collection_properties(name, properties={INFO_PROPERTY: info.to_json()})


def _insert(client: Any, name: str, vectors: np.ndarray) -> None:
    for start in range(0, len(vectors), INSERT_BATCH):
        block = vectors[start : start + INSERT_BATCH]
        client.insert(
            name,
            [
                {"id": start + i, "vector": row}
                for i, row in enumerate(block.astype(np.float32).tolist())
            ],
        )


def write_milvus_index(
    uri: str,
    embeddings: Embeddings,
    info: IndexInfo,
    *,
    collection: str = DEFAULT_COLLECTION,
    token: str | None = None,
) -> MilvusIndex:
    """Write ``embeddings`` to Milvus at ``uri`` as the index ``info`` describes; see the module."""
    client = _client(uri, token)
    stamp = time.strftime("%Y%m%d%H%M%S") + f"{time.time_ns() % 1_000_000:06d}"
    fresh = {role: f"{collection}_{role}_{stamp}" for role in ("items", "users")}
    try:
        for role, vectors in (("items", embeddings.items), ("users", embeddings.users)):
            _create(client, fresh[role], embeddings.dim, info, searched=role == "items")
            _insert(client, fresh[role], vectors)
            client.flush(fresh[role])
            client.load_collection(fresh[role])
        previous = []
        existing = set(client.list_aliases().get("aliases", []))
        for role in ("items", "users"):
            alias = f"{collection}_{role}"
            if alias in existing:
                previous.append(client.describe_alias(alias)["collection_name"])
                client.alter_alias(fresh[role], alias)
            else:
                client.create_alias(fresh[role], alias)
    except BaseException:
        for name in fresh.values():
            if client.has_collection(name):
                client.drop_collection(name)
        client.close()
        raise
    for name in previous:
        client.drop_collection(name)
    return MilvusIndex(client, uri, collection)


class MilvusIndex(VectorIndex):
    """The index under ``<collection>_items`` / ``<collection>_users`` at a Milvus URI."""

    def __init__(self, client: Any, uri: str, collection: str = DEFAULT_COLLECTION) -> None:
        self._client = client
        self.uri = uri
        self._items = f"{collection}_items"
        self._users = f"{collection}_users"
        if self._items not in set(client.list_aliases().get("aliases", [])):
            client.close()
            raise ConfigError(
                f"Milvus at {uri!r} has no recscale index {collection!r} (no alias "
                f"{self._items}); create it with `recscale export --run RUN --index {uri}`"
            )
        described = client.describe_collection(self._items)
        self.info = IndexInfo.from_json(
            described.get("properties", {}).get(INFO_PROPERTY, ""),
            f"{uri} collection {self._items}",
        )
        for name in (self._items, self._users):
            client.load_collection(name)
        metric = MILVUS_METRIC[self.info.similarity]
        if self.info.kind == "hnsw":
            self._search_params = {
                "metric_type": metric,
                "params": {"ef": self.info.params["ef_search"]},
            }
        elif self.info.kind == "ivf":
            self._search_params = {
                "metric_type": metric,
                "params": {"nprobe": self.info.params["nprobe"]},
            }
        else:
            self._search_params = {"metric_type": metric}

    @classmethod
    def open(
        cls, uri: str, *, collection: str = DEFAULT_COLLECTION, token: str | None = None
    ) -> MilvusIndex:
        return cls(_client(uri, token), uri, collection)

    def _search(
        self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(queries), k), -np.inf, np.float32)
        items = np.full((len(queries), k), -1, np.int64)
        if exclude is None or not any(len(seen) for seen in exclude):
            groups = [(np.arange(len(queries)), "")]
        else:  # one filter per query
            groups = [
                (
                    np.array([i]),
                    f"id not in {np.asarray(seen, np.int64).tolist()}" if len(seen) else "",
                )
                for i, seen in enumerate(exclude)
            ]
        for rows, expression in groups:
            hits = self._client.search(
                self._items,
                data=queries[rows].tolist(),
                limit=k,
                filter=expression,
                search_params=self._search_params,
                output_fields=["id"],
            )
            for row, found in zip(rows, hits, strict=True):
                n = len(found)
                items[row, :n] = [hit["id"] for hit in found]
                scores[row, :n] = [hit["distance"] for hit in found]
        return scores, items

    def _vectors(self, collection: str, ids: np.ndarray) -> np.ndarray:
        if not len(ids):
            return np.zeros((0, self.info.dim), np.float32)
        unique = np.unique(ids)
        rows = self._client.get(collection, ids=unique.tolist(), output_fields=["vector"])
        found = {int(row["id"]): row["vector"] for row in rows}
        table = np.array([found[int(i)] for i in unique], dtype=np.float32)
        return table[np.searchsorted(unique, ids)]

    def user_vectors(self, users: np.ndarray) -> np.ndarray:
        return self._vectors(self._users, self._check_ids(users, self.info.n_users, "user"))

    def item_vectors(self, items: np.ndarray) -> np.ndarray:
        return self._vectors(self._items, self._check_ids(items, self.info.n_items, "item"))

    def close(self) -> None:
        self._client.close()
