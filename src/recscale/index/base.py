"""The vector index interface, what an index records about itself, and where a target leads.

An index holds one run's item vectors (searched) and user vectors (looked up), searched by the
run's own similarity, so an exact index ranks items exactly as the evaluator does. Where it lives
is given by one string, the target:

- ``http://host:port`` or ``https://...``: a Milvus server or cluster;
- a path ending in ``.db``: Milvus Lite, the embedded Milvus, in that local file;
- any other path: a FAISS index, a directory (``index.json``, ``items.faiss``, ``items.npy``,
  ``users.npy``).
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recscale.errors import ConfigError
from recscale.index.embeddings import Embeddings

__all__ = [
    "FORMAT",
    "KINDS",
    "IndexInfo",
    "VectorIndex",
    "backend_of",
    "resolve_params",
]

FORMAT = "recscale-index"
FORMAT_VERSION = 1

# every kind's parameters and their defaults; None: chosen from the number of items
KINDS: dict[str, dict[str, int | None]] = {
    "flat": {},
    "hnsw": {"m": 32, "ef_construction": 200, "ef_search": 128},
    "ivf": {"nlist": None, "nprobe": 16},
}


def backend_of(target: str) -> str:
    """``"milvus"`` for a server URI or a ``.db`` file, else ``"faiss"``."""
    text = str(target)
    if text.startswith(("http://", "https://", "tcp://", "grpc://")) or text.endswith(".db"):
        return "milvus"
    return "faiss"


def resolve_params(kind: str, params: dict[str, Any] | None, n_items: int) -> dict[str, int]:
    """The full parameters of an index kind: defaults filled in, each checked."""
    if kind not in KINDS:
        raise ConfigError(f"index kind must be one of {', '.join(KINDS)}; got {kind!r}")
    given = dict(params or {})
    unknown = sorted(set(given) - set(KINDS[kind]))
    if unknown:
        allowed = ", ".join(KINDS[kind]) or "none"
        raise ConfigError(
            f"index kind {kind!r} has no parameter {unknown[0]!r} (its parameters: {allowed})"
        )
    resolved: dict[str, int] = {}
    for name, default in KINDS[kind].items():
        value = given.get(name, default)
        if value is None and name == "nlist":
            # the usual rule of thumb: about 4·sqrt(n) lists, each of a few hundred vectors
            value = max(1, min(n_items, int(4 * np.sqrt(n_items))))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"index parameter {name} must be an integer >= 1, got {value!r}")
        resolved[name] = value
    if kind == "ivf" and resolved["nlist"] > n_items:
        raise ConfigError(f"ivf nlist={resolved['nlist']} is more than the {n_items} items")
    if kind == "ivf":
        resolved["nprobe"] = min(resolved["nprobe"], resolved["nlist"])
    return resolved


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    """What an index holds and how it was built; stored with it."""

    backend: str  # "faiss" or "milvus"
    kind: str  # "flat", "hnsw" or "ivf"
    params: dict[str, int]
    similarity: str  # the run's: "dot" or "cosine"
    dim: int
    n_users: int
    n_items: int
    model: str
    version: str  # digest of the exported vectors
    run: str  # the run directory it was exported from

    @classmethod
    def of(
        cls,
        embeddings: Embeddings,
        run_dir: str | Path,
        *,
        backend: str,
        kind: str,
        params: dict[str, Any] | None = None,
    ) -> IndexInfo:
        """The description of an index of ``embeddings`` (exported from ``run_dir``)."""
        return cls(
            backend=backend,
            kind=kind,
            params=resolve_params(kind, params, len(embeddings.items)),
            similarity=embeddings.similarity,
            dim=embeddings.dim,
            n_users=len(embeddings.users),
            n_items=len(embeddings.items),
            model=embeddings.model,
            version=embeddings.version,
            run=str(Path(run_dir).resolve()),
        )

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    def to_json(self) -> str:
        return json.dumps(
            {"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> IndexInfo:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not a recscale index description: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{where}: not a recscale index (no format {FORMAT!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"{where}: index format version {data.get('format_version')!r}; "
                f"this recscale reads version {FORMAT_VERSION}: export the index again"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in fields})
        except TypeError as exc:
            raise ConfigError(f"{where}: incomplete index description: {exc}") from None


class VectorIndex(abc.ABC):
    """Item vectors to search and user vectors to look up, of one exported run."""

    info: IndexInfo

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` items for each query vector: ``(scores, items)``, both ``(n, k)``.

        Best first; ``items`` are dense item indices (int64), ``-1`` (score ``-inf``) where fewer
        than ``k`` items are left. ``exclude[i]`` lists items query ``i`` must not get (a user's
        history); the index filters them while it searches, so ``k`` results still come back.
        """
        queries = self._check_queries(queries)
        k = self._check_k(k)
        if exclude is not None and len(exclude) != len(queries):
            raise ConfigError(f"{len(exclude)} exclusion lists for {len(queries)} queries")
        return self._search(queries, k, exclude)

    @abc.abstractmethod
    def _search(
        self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` for checked queries (float32 ``(n, dim)``) and ``1 <= k <= n_items``."""

    @abc.abstractmethod
    def user_vectors(self, users: np.ndarray) -> np.ndarray:
        """float32 ``(len(users), dim)``: the stored vectors of dense user indices."""

    @abc.abstractmethod
    def item_vectors(self, items: np.ndarray) -> np.ndarray:
        """float32 ``(len(items), dim)``: the stored vectors of dense item indices."""

    def close(self) -> None:  # noqa: B027 - most indexes hold nothing to release
        """Release what the index holds open (a client connection)."""

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be an integer >= 1, got {k!r}")
        return min(k, self.info.n_items)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.info.dim:
            raise ConfigError(
                f"queries must be (n, {self.info.dim}) vectors, got shape {queries.shape}"
            )
        return queries

    def _check_ids(self, ids: np.ndarray, n: int, role: str) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            bad = ids[(ids < 0) | (ids >= n)][0]
            raise ConfigError(f"{role} index {bad} is out of range 0..{n - 1}")
        return ids
