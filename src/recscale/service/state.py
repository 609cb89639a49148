"""What the service answers from: one run's index, id maps, histories and fallback, loaded whole.

A :class:`ServedModel` is built once per (re)load and never changed after, so a request that
holds one is answered from it alone, whatever reloads happen meanwhile. Answers are in dense
indices; the app turns them back into original ids.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from recscale.config import load_toml
from recscale.dataset import open_dataset
from recscale.errors import ConfigError, DatasetError, RecscaleError, RunError
from recscale.index import VectorIndex, open_index, read_embeddings
from recscale.index.base import IndexInfo
from recscale.index.faiss_store import FaissIndex

__all__ = ["ModelHolder", "ServedModel", "fold_in"]

log = logging.getLogger("recscale.service")


def fold_in(
    gram: np.ndarray, history: np.ndarray, *, alpha: float, regularization: float
) -> np.ndarray:
    """The implicit-ALS user vector for a history of item vectors ``history (h, dim)``.

    Minimises ``Σ_j c_j (p_j − u·v_j)² + λ|u|²`` over all items, with preference ``p = 1`` and
    confidence ``c = 1 + α`` on the history, ``p = 0``, ``c = 1`` elsewhere:
    ``u = (VᵀV + α HᵀH + λI)⁻¹ (1 + α) Hᵀ1``, where ``gram = VᵀV`` is computed once per model.
    It is iALS's own user step, so an iALS user folded in from their history gets back (almost)
    their trained vector; for other factor models it is the least-squares user that their item
    vectors explain best.
    """
    dim = gram.shape[0]
    a = gram + alpha * history.T @ history + regularization * np.eye(dim, dtype=np.float64)
    b = (1.0 + alpha) * history.sum(axis=0)
    return np.linalg.solve(a, b).astype(np.float32)


@dataclasses.dataclass
class ServedModel:
    """Everything one run needs to answer requests."""

    run_dir: Path
    version: str
    model: str
    index: VectorIndex
    user_index: dict[str, int]
    user_ids: np.ndarray  # object array of original user ids, by dense index
    item_index: dict[str, int]
    item_ids: np.ndarray  # object array of original item ids, by dense index
    titles: np.ndarray | None
    seen: sp.csr_matrix  # users × items: the train and valid parts
    popularity: np.ndarray  # interactions per item in the train part
    popular: np.ndarray  # item indices, most interacted-with first
    active_users: np.ndarray  # user indices, longest history first (the page offers them)
    user_vectors: np.ndarray  # the run's vectors, kept in memory: a look-up is no round trip
    item_vectors: np.ndarray
    gram: np.ndarray  # item vectors' Gramian, for fold-in
    fold_in_params: dict[str, float]
    encoder: Any = None  # SASRec: the model itself, which encodes a history
    encoder_length: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    _users_active: int = 0
    _retired: bool = False

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        index: str | None = None,
        *,
        collection: str | None = None,
        token: str | None = None,
    ) -> ServedModel:
        """Open run ``run_dir`` with its index at ``index`` (default: an exact FAISS index in memory)."""
        run_dir = Path(run_dir)
        started = time.perf_counter()
        config_path = run_dir / "config.toml"
        if not config_path.is_file():
            raise RunError(f"{run_dir} is not a run directory: it has no config.toml")
        try:
            tables = load_toml(config_path)
            dataset_path, split_name = tables["data"]["dataset"], tables["data"]["split"]
            model_name = tables["train"]["model"]
        except (ConfigError, KeyError, TypeError) as exc:
            raise RunError(f"{config_path}: unusable run config: {exc}") from None
        embeddings = read_embeddings(run_dir)
        if index is None:
            vectors: VectorIndex = FaissIndex.in_memory(embeddings, run_dir)
        else:
            vectors = open_index(index, collection=collection, token=token)
        try:
            _check_matches(vectors.info, embeddings.version, run_dir, index)
            dataset = open_dataset(dataset_path)
            split = dataset.split(split_name)
            if (dataset.n_users, dataset.n_items) != (vectors.info.n_users, vectors.info.n_items):
                raise RunError(
                    f"index {index} holds {vectors.info.n_users} users × {vectors.info.n_items} "
                    f"items; dataset {dataset_path} has {dataset.n_users} × {dataset.n_items}"
                )
            seen = split.seen()
            counts = np.bincount(split.interactions("train").item_idx, minlength=dataset.n_items)
            popular = np.argsort(-counts, kind="stable")
            items = dataset.items
            titles = (
                items.column("title").to_numpy(zero_copy_only=False)
                if "title" in items.column_names
                else None
            )
            item_ids = items.column("item_id").to_numpy(zero_copy_only=False)
            model_params = tables.get("model", {})
            served = cls(
                run_dir=run_dir,
                version=f"{run_dir.name}:{embeddings.version}",
                model=model_name,
                index=vectors,
                user_index=dataset.user_id_map(),
                user_ids=dataset.users.column("user_id").to_numpy(zero_copy_only=False),
                item_index={str(item): i for i, item in enumerate(item_ids.tolist())},
                item_ids=item_ids,
                titles=titles,
                seen=seen,
                popularity=counts.astype(np.float32),
                popular=popular,
                active_users=np.argsort(-np.diff(seen.indptr), kind="stable"),
                user_vectors=embeddings.users,
                item_vectors=embeddings.items,
                gram=embeddings.items.T.astype(np.float64) @ embeddings.items.astype(np.float64),
                fold_in_params=_fold_in_params(model_name, model_params, embeddings.items),
            )
            if model_name == "sasrec":
                served.encoder, served.encoder_length = _sasrec_encoder(run_dir)
        except (DatasetError, RecscaleError, OSError):
            vectors.close()
            raise
        log.info(
            "loaded run %s (%s, %s index %s) in %.1fs",
            run_dir,
            model_name,
            vectors.info.backend,
            vectors.info.kind,
            time.perf_counter() - started,
        )
        return served

    # ---- answers, in dense indices

    def user_history(self, user: int) -> np.ndarray:
        return self.seen.indices[self.seen.indptr[user] : self.seen.indptr[user + 1]]

    def for_user(self, user: int, k: int, exclude_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        query = self.user_vectors[user : user + 1]
        exclude = [self.user_history(user)] if exclude_seen else None
        scores, items = self.index.search(query, k, exclude)
        return _valid(scores[0], items[0])

    def for_history(
        self, history: np.ndarray, k: int, exclude_seen: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        distinct = np.unique(history)
        if self.encoder is not None:
            query = self._encode(history)  # the order matters to a sequence model
        else:
            p = self.fold_in_params
            vectors = self.item_vectors[distinct].astype(np.float64)
            query = fold_in(
                self.gram, vectors, alpha=p["alpha"], regularization=p["regularization"]
            )
        exclude = [distinct] if exclude_seen else None
        scores, items = self.index.search(query[None, :], k, exclude)
        return _valid(scores[0], items[0])

    def similar(self, item: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        query = self.item_vectors[item : item + 1]
        scores, items = self.index.search(query, k, [np.array([item])])
        return _valid(scores[0], items[0])

    def popular_items(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        top = self.popular[:k]
        return self.popularity[top], top

    def _encode(self, history: np.ndarray) -> np.ndarray:
        import torch

        length = self.encoder_length
        seq = np.zeros(length, dtype=np.int64)
        recent = np.asarray(history[-length:], dtype=np.int64) + 1  # 0 is padding
        seq[length - len(recent) :] = recent
        with torch.no_grad():
            state = self.encoder.encode(torch.from_numpy(seq)[None, :])[0, -1]
        return state.numpy().astype(np.float32)

    # ---- lifetime: an old model is closed once its last request is done

    def acquire(self) -> ServedModel:
        with self._lock:
            self._users_active += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users_active -= 1
            done = self._retired and self._users_active == 0
        if done:
            self.index.close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            done = self._users_active == 0
        if done:
            self.index.close()


def _valid(scores: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = items >= 0
    return scores[keep], items[keep]


def _check_matches(info: IndexInfo, version: str, run_dir: Path, index: str | None) -> None:
    if info.version != version:
        raise RunError(
            f"index {index} was exported from vectors {info.version} (run {info.run}), but run "
            f"{run_dir} now has vectors {version}: export it again with "
            f"`recscale export --run {run_dir} --index {index}`"
        )


def _fold_in_params(model: str, params: dict[str, Any], items: np.ndarray) -> dict[str, float]:
    if model == "ials":
        return {
            "alpha": float(params.get("alpha", 40.0)),
            "regularization": float(params.get("regularization", 100.0)),
        }
    # other factor models: a confident fold-in, regularised relative to the vectors' scale
    scale = float(np.mean(np.sum(items.astype(np.float64) ** 2, axis=1))) or 1.0
    return {"alpha": 10.0, "regularization": 0.1 * scale}


def _sasrec_encoder(run_dir: Path) -> tuple[Any, int]:
    from recscale.train import Run

    run = Run.open(run_dir)
    run.model.eval()
    return run.model, int(run.model.params.max_len)


class ModelHolder:
    """The model being served, swapped whole by :meth:`swap`; requests :meth:`acquire` it."""

    def __init__(self, served: ServedModel | None = None) -> None:
        self._served = served
        self._lock = threading.Lock()
        self.reload_lock = threading.Lock()  # one reload at a time

    def acquire(self) -> ServedModel | None:
        with self._lock:
            return None if self._served is None else self._served.acquire()

    def swap(self, served: ServedModel) -> ServedModel | None:
        with self._lock:
            old, self._served = self._served, served
        if old is not None and old is not served:
            old.retire()
        return old

    def current(self) -> ServedModel | None:
        return self._served
