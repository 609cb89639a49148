"""A two-tower retrieval model with item side features (Yi et al., RecSys 2019).

``score(u, i) = cos(f(u), g(i)) / temperature``, where each tower is a small MLP over the sum
(or concatenation) of its inputs, with an L2-normalised output:

- item tower ``g``: the item's id embedding, the mean of its genre (tag) embeddings when the
  item table has a ``genres`` column, and a linear projection of the sentence embedding of its
  title (:func:`recscale.features.embed_texts`) when it has a ``title`` column and ``text`` is on.
  Features are what reach items with few or no interactions: a cold item shares its genres and
  words with items users have liked;
- user tower ``f``: the user's id embedding plus the mean id embedding of their last
  ``history_len`` observed items. The history is read at scoring time from what
  :meth:`~TwoTower.observe` saw last, so a user's newest interactions count without
  retraining.

Training is a softmax over the batch's own positives (``loss = "in-batch"``), whose negatives
are drawn by popularity; the log-Q correction subtracts ``log_q_weight · log p(i)`` (``p`` the
item's share of training rows) from every logit so popular items are not pushed down for being
frequent negatives. ``"sampled"`` uses the loader's uniform negatives instead (shared by all
rows of the batch; uniform, so no correction), and ``"mixed"`` both at once in one softmax
(mixed negative sampling, Yang et al., WWW 2020), each candidate corrected by its probability
under the mixture of the two samplers.

Features are built once in :meth:`~TwoTower.prepare` from the items table and stored as
buffers with the histories, so a checkpoint scores without the dataset.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from recscale.dataset import Interactions
from recscale.errors import ConfigError, ModelError
from recscale.loader import last_items
from recscale.models.base import TorchRecommender
from recscale.models.losses import in_batch_softmax_loss, sampled_softmax_loss

__all__ = ["TwoTower", "TwoTowerParams", "genre_matrix", "item_log_q"]

log = logging.getLogger(__name__)

TwoTowerLoss = typing.Literal["in-batch", "sampled", "mixed"]
Combine = typing.Literal["sum", "concat"]
TEXT_DIM = 384  # recscale.features.TEXT_DIM, not imported: that module is an optional extra


@dataclasses.dataclass(frozen=True)
class TwoTowerParams:
    """Two-tower hyper-parameters (the ``[model]`` table).

    Recall@20 / NDCG@20 on the test part (full ranking, seen items excluded), default
    ``[train]`` table (at most 20 epochs, batch 2048, cosine lr, patience 3), 2 shared CPU cores:

    ============================  ===============  ===============
    MovieLens latest-small        random split     leave-last
    ============================  ===============  ===============
    iALS (defaults)               0.2368 / 0.3071  0.1222 / 0.0465
    MF-BPR (defaults)             0.2227 / 0.3007  0.1162 / 0.0536
    two-tower, ids only           0.2223 / 0.2848  0.0984 / 0.0374
    + genres (the defaults)       0.2200 / 0.2917  0.1118 / 0.0458
    + genres + titles (text)      0.2271 / 0.3033  0.1222 / 0.0444
    ============================  ===============  ===============

    ("ids only" is ``genres = false``; every two-tower row uses the user's history.) An epoch
    takes about 4 s; embedding the 9,066 titles adds 40 to 70 s per run. On Gowalla (ids only,
    the ``given`` split with its valid part) the defaults with ``--epochs 10 --batch-size 1024``
    reach 0.1557 / 0.1244 in about 10 minutes, where iALS gets 0.1669 / 0.1399 and MF-BPR
    0.1669 / 0.1410: the in-batch softmax costs ``O(B²)`` per batch, so batch 1024 trains twice
    the steps of 2048 per second, and it scored higher after one epoch (0.119 against 0.099).

    What set the defaults (recall@20; ML random split unless said): lr 1e-3 0.176, 1e-2 0.218;
    log_q_weight 0 0.078, 0.5 0.149, 1 0.218, 1.5 0.221 (Gowalla: 1 0.148, 1.5 0.156, 2
    0.152); temperature on Gowalla 0.05 0.149, 0.2 0.116; leave_out_positive on Gowalla 0.151.
    dim 128 with hidden 256 gave 0.229 / 0.302 at twice the cost; the "mixed" (0.222) and
    "sampled" (0.215) losses did not beat in-batch, and history_len 0 changed little (0.220).
    """

    dim: int = 64
    # width of each tower's hidden layer; 0 = a single linear layer
    hidden: int = 128
    # how a tower's inputs are joined before its MLP: summed (all of width dim) or concatenated
    combine: Combine = "sum"
    # item features, used when the item table has the column (genres: list<string>, title);
    # text embeds the titles with all-MiniLM-L6-v2 and needs the `text` extra, hence off
    genres: bool = True
    text: bool = False
    # items of the user's observed history averaged into the user tower; 0 = user id only
    history_len: int = 20
    # leave a training row's positive out of the user's history (FISM's rule). Off: the
    # in-batch negatives include the user's own history items, and with the positive never in
    # the history the tower learns that history items are negatives, their neighbours too
    leave_out_positive: bool = False
    loss: TwoTowerLoss = "in-batch"
    # uniform negatives per row for "sampled"/"mixed" (all rows share the batch's B · n)
    n_negatives: int = 1
    # logits are cosine / temperature
    temperature: float = 0.1
    # weight of the log-Q correction: 1 removes the in-batch sampler's popularity bias, 0 keeps
    # it (and pushes popular items down hard), above 1 leans towards popular items
    log_q_weight: float = 1.5
    lr: float = 1e-2
    weight_decay: float = 0.0
    dropout: float = 0.0
    init_std: float = 0.1

    def __post_init__(self) -> None:
        for name in ("dim", "n_negatives", "temperature", "lr", "init_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"model two-tower: {name} must be > 0, got {getattr(self, name)!r}"
                )
        for name in ("hidden", "history_len", "log_q_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"model two-tower: {name} must be >= 0, got {getattr(self, name)!r}"
                )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model two-tower: dropout must be in [0, 1), got {self.dropout!r}")
        for name, alias in (("loss", TwoTowerLoss), ("combine", Combine)):
            allowed = typing.get_args(alias)
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"model two-tower: {name} {getattr(self, name)!r} is unknown; expected one "
                    "of " + ", ".join(repr(x) for x in allowed)
                )


def genre_matrix(items: pa.Table, n_items: int) -> tuple[np.ndarray, list[str]]:
    """``(index, vocabulary)``: each item's genres as a padded row of vocabulary ids.

    ``vocabulary`` is the sorted distinct genres; ``index[i]`` holds ``1 + position`` of item
    ``i``'s genres (in the table's order, duplicates dropped) followed by 0 padding, int64
    ``(n_items, most genres of an item)``. Rows are placed by the ``item_idx`` column; an item
    absent from the table or without genres is all padding.
    """
    idx = _item_positions(items, n_items)
    lists = items.column("genres").to_pylist()
    vocabulary = sorted({g for gs in lists if gs for g in gs if g is not None})
    code = {g: k + 1 for k, g in enumerate(vocabulary)}
    rows = [list(dict.fromkeys(code[g] for g in gs if g is not None)) if gs else [] for gs in lists]
    width = max((len(r) for r in rows), default=0)
    index = np.zeros((n_items, width), np.int64)
    for i, row in zip(idx, rows, strict=True):
        index[i, : len(row)] = row
    return index, vocabulary


def item_log_q(train: Interactions) -> np.ndarray:
    """``log p(i)``, ``p`` the item's share of the training rows (float32 ``(n_items,)``).

    A batch of training rows holds item ``i`` as a positive with probability proportional to
    ``p(i)``: that is the in-batch sampler's proposal. Items without rows never appear in a
    batch; they are given the share of one row so that the log stays finite.
    """
    counts = np.bincount(train.item_idx, minlength=train.n_items).astype(np.float64)
    return np.log(np.maximum(counts, 1.0) / max(len(train), 1)).astype(np.float32)


def _item_positions(items: pa.Table, n_items: int) -> np.ndarray:
    """The ``item_idx`` column, checked to lie in ``0..n_items - 1``."""
    if "item_idx" not in items.column_names:
        raise ModelError("the items table has no item_idx column")
    idx = items.column("item_idx").to_numpy().astype(np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n_items):
        raise ModelError(
            f"the items table has item_idx values outside 0..{n_items - 1}: "
            "it belongs to another dataset"
        )
    return idx


class _Tower(torch.nn.Module):
    """``in_dim → hidden → dim`` with ReLU and dropout (or one linear layer when hidden is 0)."""

    def __init__(self, in_dim: int, hidden: int, dim: int, dropout: float) -> None:
        super().__init__()
        if hidden:
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(in_dim, hidden),
                torch.nn.ReLU(),
                torch.nn.Dropout(dropout),
                torch.nn.Linear(hidden, dim),
            )
        else:
            self.layers = torch.nn.Sequential(
                torch.nn.Dropout(dropout), torch.nn.Linear(in_dim, dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(x), dim=-1)


class TwoTower(TorchRecommender):
    """User and item towers over ids, histories, genres and title embeddings (cosine scores)."""

    name = "two-tower"
    Params = TwoTowerParams

    # buffers whose size depends on the data, set by prepare() and replaced by load_state_dict
    _SIZED = ("genre_emb", "item_genres", "item_text")

    def __init__(self, params: TwoTowerParams, n_users: int, n_items: int, *, seed: int = 0):
        super().__init__(params, n_users, n_items, seed=seed)
        p = params
        self.n_negatives = p.n_negatives
        generator = self._generator()
        d = p.dim
        self.user_emb = torch.nn.Parameter(torch.empty(n_users, d))
        self.item_emb = torch.nn.Parameter(torch.empty(n_items, d))
        # row 0 of the genre table is padding; the real rows are added by prepare()
        self.genre_emb = torch.nn.Parameter(torch.zeros(1, d))
        self.text_proj = torch.nn.Linear(TEXT_DIM, d, bias=False) if p.text else None
        slots = 1 + p.genres + p.text if p.combine == "concat" else 1
        self.item_tower = _Tower(slots * d, p.hidden, d, p.dropout)
        self.user_tower = _Tower((2 if p.combine == "concat" else 1) * d, p.hidden, d, p.dropout)
        for name, w in self.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.zeros_(w)
            elif name.endswith("weight"):  # He initialisation of the linear layers
                torch.nn.init.normal_(w, std=(2.0 / w.shape[1]) ** 0.5, generator=generator)
            elif name in ("user_emb", "item_emb"):
                torch.nn.init.normal_(w, std=p.init_std, generator=generator)
        # what prepare() and observe() build; empty until then, restored by load_state_dict
        self.register_buffer("item_genres", torch.zeros(n_items, 0, dtype=torch.int64))
        self.register_buffer("item_text", torch.zeros(0, TEXT_DIM))
        self.register_buffer("item_log_q", torch.zeros(n_items))
        self.register_buffer("history", torch.zeros(n_users, p.history_len, dtype=torch.int64))
        self._item_cache: torch.Tensor | None = None  # item tower outputs, in eval mode

    # ----------------------------------------------------------------- features and histories

    def prepare(self, train: Interactions, items: pa.Table | None = None) -> None:
        """Build the item features from ``items`` and each user's history from ``train``.

        Genres need a ``genres`` list column; text needs a ``title`` column and the ``text``
        extra (titles are embedded once, here, on the CPU). Without them the towers use ids and
        histories only. ``log p(i)`` for the correction comes from ``train``.
        """
        self._check_train(train)
        self._item_cache = None
        device = self.item_emb.device
        self.item_log_q = torch.from_numpy(item_log_q(train)).to(device)
        columns = items.column_names if items is not None else []
        if self.params.genres and "genres" in columns:
            index, vocabulary = genre_matrix(items, self.n_items)
            table = torch.zeros(len(vocabulary) + 1, self.params.dim)
            # a generator of its own (same seed, same table) that does not repeat the id tables'
            generator = torch.Generator().manual_seed(self.seed + 1)
            torch.nn.init.normal_(table[1:], std=self.params.init_std, generator=generator)
            self.genre_emb = torch.nn.Parameter(table.to(device))
            self.item_genres = torch.from_numpy(index).to(device)
            log.info("two-tower: %d genres, at most %d per item", len(vocabulary), index.shape[1])
        if self.params.text and "title" in columns:
            self.item_text = torch.from_numpy(self._title_vectors(items)).to(device)
        self.observe(train)

    def _title_vectors(self, items: pa.Table) -> np.ndarray:
        """Sentence embeddings of the titles, ``(n_items, 384)``; zeros where there is none."""
        from recscale.features.text import embed_texts  # the optional extra, loaded on use

        idx = _item_positions(items, self.n_items)
        titles = items.column("title").to_pylist()
        have = [k for k, t in enumerate(titles) if t]
        vectors = np.zeros((self.n_items, TEXT_DIM), np.float32)
        vectors[idx[have]] = embed_texts([titles[k] for k in have])
        return vectors

    def observe(self, history: Interactions) -> None:
        """Keep each user's last ``history_len`` items of ``history`` for the user tower."""
        self._check_train(history)
        if self.params.history_len:
            indptr, items = history.sequences()
            window, _ = last_items(indptr, items, np.arange(self.n_users), self.params.history_len)
            self.history.copy_(torch.from_numpy(window))

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False):
        self._item_cache = None
        # the genre table and feature buffers have the data's size, not the constructor's
        for key in self._SIZED:
            if key in state:
                value = state[key].to(self.item_emb.device)
                if key == "genre_emb":
                    self.genre_emb = torch.nn.Parameter(value.clone())
                else:
                    setattr(self, key, value.clone())
        return super().load_state_dict(state, strict=strict, assign=assign)

    # ----------------------------------------------------------------- the towers

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """The item tower's unit vectors for item indices ``items (N,)``."""
        parts = [F.embedding(items, self.item_emb)]
        if self.params.genres:
            genres = self.item_genres[items]
            if genres.shape[1]:
                parts.append(F.embedding_bag(genres, self.genre_emb, mode="mean", padding_idx=0))
            elif self.params.combine == "concat":
                parts.append(torch.zeros_like(parts[0]))
        if self.text_proj is not None:
            if self.item_text.shape[0]:
                parts.append(self.text_proj(self.item_text[items]))
            elif self.params.combine == "concat":
                parts.append(torch.zeros_like(parts[0]))
        joined = torch.cat(parts, dim=1) if self.params.combine == "concat" else sum(parts)
        return self.item_tower(joined)

    def user_vectors(
        self, users: torch.Tensor, exclude: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The user tower's unit vectors; ``exclude (N,)`` leaves one item out of each history."""
        u = F.embedding(users, self.user_emb)
        if self.params.history_len:
            hist = self.history[users]  # (N, L), item + 1, 0 = padding
            real = hist > 0
            if exclude is not None:
                real &= hist != (exclude + 1).unsqueeze(1)
            emb = F.embedding(torch.clamp(hist - 1, min=0), self.item_emb)  # (N, L, d)
            weights = real.to(emb.dtype)
            mean = (emb * weights.unsqueeze(2)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        else:
            mean = torch.zeros_like(u)
        joined = torch.cat([u, mean], dim=1) if self.params.combine == "concat" else u + mean
        return self.user_tower(joined)

    # ----------------------------------------------------------------- training

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._item_cache = None  # the parameters are about to change
        p = self.params
        pos = batch["pos"]
        u = self.user_vectors(batch["users"], exclude=pos if p.leave_out_positive else None)
        v = self.item_vectors(pos)
        if p.loss == "in-batch":
            log_q = self.item_log_q[pos] * p.log_q_weight if p.log_q_weight else None
            return in_batch_softmax_loss(u, v, pos, temperature=p.temperature, log_q=log_q)
        # the loader's uniform negatives, shared by every row: one (B, B·n) product scores them
        neg = batch["neg"].reshape(-1)
        w = self.item_vectors(neg)
        pos_scores = (u * v).sum(1)
        uniform = (u @ w.T).masked_fill(pos.unsqueeze(1) == neg.unsqueeze(0), float("-inf"))
        if p.loss == "sampled":
            return sampled_softmax_loss(pos_scores, uniform, temperature=p.temperature)
        # mixed: candidates come from both samplers, so each is corrected by the mixture's
        # probability of proposing it, ∝ B · p(i) + M / n_items for B in-batch and M uniform
        others = (u @ v.T).masked_fill(pos.unsqueeze(0) == pos.unsqueeze(1), float("-inf"))
        b, m = len(pos), len(neg)
        log_q_pos = torch.logaddexp(
            self.item_log_q[pos] + np.log(b), torch.full_like(pos_scores, np.log(m / self.n_items))
        )
        log_q_neg = torch.logaddexp(
            self.item_log_q[neg] + np.log(b),
            torch.full_like(neg, np.log(m / self.n_items), dtype=u.dtype),
        )
        log_q_neg = torch.cat([log_q_pos, log_q_neg]).unsqueeze(0)  # columns: in-batch, uniform
        return sampled_softmax_loss(
            pos_scores,
            torch.cat([others, uniform], dim=1),
            temperature=p.temperature,
            log_q_pos=log_q_pos * p.log_q_weight,
            log_q_neg=log_q_neg * p.log_q_weight,
        )

    def make_optimizer(self) -> torch.optim.Optimizer:
        # fused: one pass over all parameters; the embedding tables get dense gradients, and the
        # per-tensor loop would make the update cost more than the batch itself
        return torch.optim.AdamW(
            self.parameters(), lr=self.params.lr, weight_decay=self.params.weight_decay, fused=True
        )

    def train(self, mode: bool = True) -> TwoTower:
        if mode:  # the cache is only read in eval mode; training is about to change the weights
            self._item_cache = None
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> TwoTower:
        self._item_cache = None  # .to(device) and friends: the cache would stay behind
        return super()._apply(fn, recurse)

    # ----------------------------------------------------------------- scoring

    def _all_items(self) -> torch.Tensor:
        """Every item's vector (cached while in eval mode: scoring calls this per user batch)."""
        if self._item_cache is None:
            self._item_cache = self.item_vectors(torch.arange(self.n_items, device=self.device))
        return self._item_cache

    def _vectors(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(user vectors / temperature, item vectors)``: their products are the scores."""
        was_training = self.training
        if was_training:
            self.eval()  # dropout off: scores are a function of the weights and histories only
        try:
            with torch.no_grad():
                return self.user_vectors(users) / self.params.temperature, self._all_items()
        finally:
            if was_training:
                self.train()

    def score(self, users: np.ndarray) -> torch.Tensor:
        users = torch.from_numpy(self._check_users(users)).to(self.device)
        u, v = self._vectors(users)
        return u @ v.T

    def export_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        u, v = self._vectors(torch.arange(self.n_users, device=self.device))
        return (
            np.ascontiguousarray(u.cpu().numpy(), np.float32),
            np.ascontiguousarray(v.cpu().numpy(), np.float32),
        )
