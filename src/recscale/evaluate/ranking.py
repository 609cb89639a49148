"""Full-ranking evaluation: every user is ranked against the whole catalogue, batch by batch.

For a batch of users the model scores all items, the user's ``exclude`` items (what it was trained
on, and the validation items when testing) are set to ``-inf``, and one ``torch.topk`` with the
largest K gives every top-K list at once. Memory is bounded by a few ``batch_users × n_items``
blocks (the scores, a float scratch block for counting, a copy when ``score`` returns a view):
users × items is never held at once.

Ties. Two items with equal scores are ordered by item index, lower first, so results do not
depend on the device or on ``torch.topk``'s unspecified order among equals (:func:`top_k`). MRR
follows its own definition: the rank of the best-scored relevant item is 1 + the number of
(non-excluded) items scoring *strictly* higher, so an item tied with it does not push it down.

Targets that are also excluded (an item seen in train and again in test) cannot be recommended,
so they are dropped from the user's relevant set rather than counted as unreachable; users left
with no relevant item are not evaluated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from recscale.dataset import Interactions
from recscale.errors import ConfigError, ModelError
from recscale.evaluate.metrics import ranking_metrics

__all__ = ["Scorer", "by_user_activity", "evaluate_model", "item_popularity", "top_k"]

_METRIC_NAMES = ("recall", "ndcg", "hr", "precision")


class Scorer(Protocol):
    """What evaluation needs from a model: its sizes and a batch scorer.

    ``score`` returns a float tensor ``(len(users), n_items)``. Evaluation masks excluded items in
    place, so a tensor that is a view (e.g. ``expand``) is copied first; a model must not return
    a tensor it keeps and reuses without being a view.
    """

    n_users: int
    n_items: int

    def score(self, users: np.ndarray) -> torch.Tensor: ...


def item_popularity(
    interactions: Interactions | Sequence[Interactions], n_items: int | None = None
) -> np.ndarray:
    """Interaction count of every item (int64, length ``n_items``), summed over ``interactions``."""
    parts = [interactions] if isinstance(interactions, Interactions) else list(interactions)
    if n_items is None:
        if not parts:
            raise ValueError("item_popularity needs n_items when given no interactions")
        n_items = parts[0].n_items
    counts = np.zeros(n_items, dtype=np.int64)
    for part in parts:
        counts += np.bincount(part.item_idx, minlength=n_items)[:n_items]
    return counts


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best items of each row as ``(values, indices)``, best first.

    The order is by score descending, then item index ascending: exactly the first ``k`` of a
    stable sort, at the cost of one ``torch.topk`` plus a fix-up of the rows where a tie at the
    k-th score makes ``topk``'s choice among equals arbitrary. NaN ranks above everything, as in
    ``torch.topk``.
    """
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the {n} columns, got {k}")
    # one more than asked: a row is ambiguous when its (k+1)-th score equals its k-th
    values, indices = torch.topk(scores, min(k + 1, n), dim=1, largest=True, sorted=True)
    if k < n:
        ambiguous = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
        values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
    else:
        ambiguous = values.new_empty(0, dtype=torch.int64)
    kth = values[:, -1:]
    # bound the int32 cumsum below to about 16M elements at a time
    chunk = max(1, (1 << 24) // n)
    for start in range(0, len(ambiguous), chunk):
        rows = ambiguous[start : start + chunk]
        sub, cut = scores[rows], kth[rows]
        above = sub > cut
        at = sub == cut
        room = k - above.sum(1, keepdim=True)
        keep = above | (at & (at.cumsum(1, dtype=torch.int32) <= room))
        chosen = keep.nonzero()[:, 1].view(len(rows), k)  # row-major: ascending items per row
        indices[rows] = chosen
        values[rows] = sub.gather(1, chosen)
    # order inside the top k: stable sort by score after sorting by index
    by_index = indices.argsort(dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_score = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, by_score), indices.gather(1, by_score)


@dataclasses.dataclass
class _Prepared:
    """Everything evaluation needs besides the model, computed once per target."""

    target: sp.csr_matrix  # binary, excluded items removed
    exclude: sp.csr_matrix  # binary
    popularity: np.ndarray | None
    ks: tuple[int, ...]
    n_items: int


def _binary_csr(parts: Sequence[Interactions], n_rows: int, n_items: int) -> sp.csr_matrix:
    if not parts:
        return sp.csr_matrix((n_rows, n_items), dtype=np.float32)
    users = np.concatenate([p.user_idx for p in parts]).astype(np.int64, copy=False)
    items = np.concatenate([p.item_idx for p in parts]).astype(np.int64, copy=False)
    m = sp.csr_matrix(
        (np.ones(len(users), np.float32), (users, items)), shape=(n_rows, n_items), dtype=np.float32
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    return m


def _check_sizes(model: Scorer, parts: dict[str, Interactions]) -> tuple[int, int]:
    n_users, n_items = int(model.n_users), int(model.n_items)
    for name, part in parts.items():
        if part.n_items != n_items:
            raise ModelError(
                f"the model scores {n_items} items but {name} is over {part.n_items} items: "
                "evaluate a model with interactions of the dataset it was trained on"
            )
        for column, size in (("user", n_users), ("item", n_items)):
            idx = getattr(part, f"{column}_idx")
            if len(idx) and (int(idx.max()) >= size or int(idx.min()) < 0):
                bad = int(idx.max()) if int(idx.max()) >= size else int(idx.min())
                raise ModelError(
                    f"{name} has {column} index {bad}, but the model knows {column}s 0..{size - 1}"
                )
    return n_users, n_items


def _prepare(
    model: Scorer,
    target: Interactions,
    exclude: Interactions | Sequence[Interactions],
    ks: Sequence[int],
    popularity: np.ndarray | None,
) -> _Prepared:
    excludes = [exclude] if isinstance(exclude, Interactions) else list(exclude)
    n_users, n_items = _check_sizes(
        model, {"target": target, **{f"exclude[{i}]": e for i, e in enumerate(excludes)}}
    )
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 or k > n_items for k in ks):
        raise ConfigError(
            f"evaluate: ks must be cut-offs between 1 and the {n_items} items, got {list(ks)}"
        )
    excluded = _binary_csr(excludes, n_users, n_items)
    relevant = _binary_csr([target], n_users, n_items)
    relevant = relevant - relevant.multiply(excluded)
    relevant.eliminate_zeros()
    relevant = sp.csr_matrix(relevant)
    relevant.sort_indices()
    if popularity is None and excludes:
        popularity = item_popularity(excludes[0], n_items)
    if popularity is not None:
        popularity = np.asarray(popularity)
        if popularity.shape != (n_items,):
            raise ConfigError(
                f"evaluate: item_popularity must have one count per item ({n_items}), "
                f"got shape {popularity.shape}"
            )
    return _Prepared(relevant, excluded, popularity, ks, n_items)


def _select_users(prep: _Prepared, users: np.ndarray | None) -> np.ndarray:
    """Users with at least one relevant item, restricted to ``users`` when given (sorted)."""
    have_target = np.flatnonzero(np.diff(prep.target.indptr) > 0)
    if users is None:
        return have_target
    users = np.asarray(users)
    if users.ndim != 1 or not np.issubdtype(users.dtype, np.integer):
        raise ConfigError(
            f"evaluate: users must be a 1-d array of user indices, got {users.dtype} {users.shape}"
        )
    n_users = prep.target.shape[0]
    if len(users) and (users.min() < 0 or users.max() >= n_users):
        bad = users[(users < 0) | (users >= n_users)][0]
        raise ConfigError(f"evaluate: user index {bad} is out of range 0..{n_users - 1}")
    return np.intersect1d(have_target, users)


def _scores(
    model: Scorer, batch: np.ndarray, n_items: int, device: torch.device, spare: _Buffer
) -> torch.Tensor:
    raw = model.score(batch)
    if not isinstance(raw, torch.Tensor):
        raise ModelError(f"score() must return a torch.Tensor, got {type(raw).__name__}")
    if tuple(raw.shape) != (len(batch), n_items):
        raise ModelError(
            f"score() returned shape {tuple(raw.shape)} for {len(batch)} users; "
            f"expected ({len(batch)}, {n_items})"
        )
    if not raw.is_floating_point():
        raise ModelError(f"score() must return floating-point scores, got {raw.dtype}")
    scores = raw.to(device)
    # masking writes into the tensor (flat, so it must be contiguous), and never into a view of
    # the model's own storage
    if not scores.is_contiguous() or (scores is raw and raw._base is not None):
        scores = spare.get(len(batch), raw.dtype).copy_(scores)
    return scores


def _flat_positions(rows: sp.csr_matrix, n_items: int, device: torch.device) -> torch.Tensor:
    """``row * n_items + item`` of every stored entry of a CSR batch, ascending (int64)."""
    row = np.repeat(np.arange(rows.shape[0], dtype=np.int64), np.diff(rows.indptr))
    return torch.from_numpy(row * n_items + rows.indices.astype(np.int64)).to(device)


class _Buffer:
    """A (batch_users, n_items) scratch tensor allocated once.

    Fresh tensors this size cost page faults on every batch, which on a CPU took longer than the
    comparisons written into them.
    """

    def __init__(self, rows: int, cols: int, device: torch.device) -> None:
        self.shape, self.device = (rows, cols), device
        self.tensor: torch.Tensor | None = None

    def get(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        if self.tensor is None or self.tensor.dtype != dtype:
            self.tensor = torch.empty(self.shape, dtype=dtype, device=self.device)
        return self.tensor[:rows]


def _count_above(scores: torch.Tensor, threshold: torch.Tensor, spare: _Buffer) -> torch.Tensor:
    """Per row, how many scores are strictly above the row's threshold (int64)."""
    if scores.shape[1] < 1 << 24:  # float32 counts are exact below 2**24
        # a float 0/1 buffer sums several times faster than a bool mask does on CPU
        flags = spare.get(scores.shape[0], torch.float32)
        torch.gt(scores, threshold.unsqueeze(1), out=flags)
        return flags.sum(1).to(torch.int64)
    return (scores > threshold.unsqueeze(1)).sum(1)


def _run(
    model: Scorer,
    prep: _Prepared,
    users: np.ndarray,
    *,
    batch_users: int,
    device: torch.device,
    progress: bool,
) -> dict[str, float]:
    ks, n_items = prep.ks, prep.n_items
    k_max = max(ks)
    names = [f"{m}@{k}" for k in ks for m in _METRIC_NAMES] + ["mrr"]
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in names}
    covered = {k: torch.zeros(n_items, dtype=torch.bool, device=device) for k in ks}
    pop = (
        None
        if prep.popularity is None
        else torch.as_tensor(prep.popularity, dtype=torch.float64, device=device)
    )
    pop_sum = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ks}
    pop_n = {k: torch.zeros((), dtype=torch.int64, device=device) for k in ks}

    batches = range(0, len(users), batch_users)
    rows_max = min(batch_users, max(1, len(users)))
    score_copy = _Buffer(rows_max, n_items, device)
    flags = _Buffer(rows_max, n_items, device)
    with torch.inference_mode():
        for start in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
            batch = users[start : start + batch_users].astype(np.int64, copy=False)
            b = len(batch)
            scores = _scores(model, batch, n_items, device, score_copy)

            # flat positions (row * n_items + item) and index_fill_/index_select: advanced
            # indexing costs a parallel region per call, which dominated small batches on CPU
            excl = prep.exclude[batch]
            if excl.nnz:
                flat = _flat_positions(excl, n_items, device)
                scores.view(-1).index_fill_(0, flat, float("-inf"))

            tgt = prep.target[batch]
            t_flat = _flat_positions(tgt, n_items, device)
            n_relevant = torch.from_numpy(np.diff(tgt.indptr)).to(device)

            values, top = top_k(scores, k_max)
            # top_k ranks NaN first, so a NaN anywhere that is not excluded shows up here
            if torch.isnan(values[:, 0]).any():
                bad = int(batch[torch.isnan(values[:, 0]).nonzero()[0, 0].item()])
                raise ModelError(
                    f"score() returned NaN scores (first for user {bad}); cannot rank them"
                )
            row_base = torch.arange(b, device=device).unsqueeze(1) * n_items
            hits = torch.isin(row_base + top, t_flat)
            for name, per_user in ranking_metrics(hits, n_relevant, ks).items():
                sums[name] += per_user.sum()

            # MRR over the full ranking: 1 + items strictly above the best-scored relevant item
            target_scores = scores.view(-1).index_select(0, t_flat)
            best = torch.segment_reduce(target_scores, "max", lengths=n_relevant)
            rank = 1 + _count_above(scores, best, flags)
            sums["mrr"] += (1.0 / rank.to(torch.float64)).sum()

            # a slot holding an excluded item (fewer than K left to recommend) recommends nothing
            real = values > float("-inf")
            all_real = bool(real.all())
            for k in ks:
                shown = top[:, :k].reshape(-1) if all_real else top[:, :k][real[:, :k]]
                covered[k].index_fill_(0, shown, True)
                if pop is not None:
                    pop_sum[k] += pop.index_select(0, shown).sum()
                    pop_n[k] += shown.numel()

    n = len(users)
    out: dict[str, float] = {}
    for k in ks:
        for m in _METRIC_NAMES:
            out[f"{m}@{k}"] = sums[f"{m}@{k}"].item() / n if n else float("nan")
        out[f"coverage@{k}"] = covered[k].sum().item() / n_items
        if pop is not None:
            count = pop_n[k].item()
            out[f"popularity@{k}"] = pop_sum[k].item() / count if count else float("nan")
    out["mrr"] = sums["mrr"].item() / n if n else float("nan")
    out["users"] = n
    return out


def evaluate_model(
    model: Scorer,
    target: Interactions,
    exclude: Interactions | Sequence[Interactions] = (),
    *,
    ks: Sequence[int] = (10, 20, 50),
    batch_users: int = 1024,
    device: str | torch.device = "cpu",
    users: np.ndarray | None = None,
    item_popularity: np.ndarray | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Full-ranking metrics of ``model`` on ``target``, averaged over the evaluated users.

    Evaluated users are those with at least one ``target`` item not in their ``exclude`` items
    (restricted to ``users`` when given). Each is ranked over all items minus its ``exclude``
    items (pass the training interactions, and the validation ones when evaluating test).

    Returns, for every K in ``ks``: ``recall@K``, ``ndcg@K``, ``hr@K``, ``precision@K`` (the
    LightGCN definitions, see :mod:`recscale.evaluate.metrics`), ``coverage@K`` (fraction of the
    catalogue in at least one top-K list) and ``popularity@K`` (mean ``item_popularity`` of the
    recommended items; by default the interaction counts of ``exclude[0]``, left out when there
    is neither); then ``mrr`` and ``users``. With no user to evaluate, the averages are NaN.
    """
    if batch_users < 1:
        raise ConfigError(f"evaluate: batch_users must be >= 1, got {batch_users}")
    prep = _prepare(model, target, exclude, ks, item_popularity)
    selected = _select_users(prep, users)
    return _run(
        model,
        prep,
        selected,
        batch_users=batch_users,
        device=torch.device(device),
        progress=progress,
    )


def by_user_activity(
    model: Scorer,
    target: Interactions,
    exclude: Interactions | Sequence[Interactions] = (),
    *,
    n_buckets: int = 4,
    activity: np.ndarray | None = None,
    ks: Sequence[int] = (10, 20, 50),
    batch_users: int = 1024,
    device: str | torch.device = "cpu",
    users: np.ndarray | None = None,
    item_popularity: np.ndarray | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """The metrics of :func:`evaluate_model` per user-activity bucket, least active first.

    ``activity`` is a number per user, by default its training interaction count (rows of
    ``exclude[0]``). Buckets are cut at the activity quantiles of the evaluated users, so each
    holds about ``1/n_buckets`` of them; equal activities always share a bucket, so there may be
    fewer. Keys read like ``"activity 3-7"`` (the bucket's lowest and highest activity); the
    ``users`` of the buckets add up to the users of :func:`evaluate_model`.
    """
    if n_buckets < 1:
        raise ConfigError(f"evaluate: n_buckets must be >= 1, got {n_buckets}")
    if batch_users < 1:
        raise ConfigError(f"evaluate: batch_users must be >= 1, got {batch_users}")
    prep = _prepare(model, target, exclude, ks, item_popularity)
    selected = _select_users(prep, users)
    n_users = prep.target.shape[0]
    if activity is None:
        excludes = [exclude] if isinstance(exclude, Interactions) else list(exclude)
        activity = (
            np.bincount(excludes[0].user_idx, minlength=n_users)
            if excludes
            else np.zeros(n_users, np.int64)
        )
    activity = np.asarray(activity)
    if activity.shape != (n_users,):
        raise ConfigError(
            f"evaluate: activity must have one value per user ({n_users}), got {activity.shape}"
        )
    level = activity[selected]
    if len(level) == 0:
        return {}
    cuts = np.unique(np.quantile(level, np.arange(1, n_buckets) / n_buckets, method="lower"))
    bucket = np.searchsorted(cuts, level, side="left")  # bucket b holds cuts[b-1] < a <= cuts[b]
    out: dict[str, dict[str, float]] = {}
    for b in np.unique(bucket):
        members = selected[bucket == b]
        lo, hi = level[bucket == b].min(), level[bucket == b].max()
        label = f"activity {lo:g}" if lo == hi else f"activity {lo:g}-{hi:g}"
        out[label] = _run(
            model,
            prep,
            members,
            batch_users=batch_users,
            device=torch.device(device),
            progress=progress,
        )
    return out
