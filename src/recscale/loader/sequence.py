"""Batches of user histories for next-item models (SASRec): inputs, next items, negatives.

A user's training items in time order ``s_1 .. s_n`` become one row: the inputs are the last
``max_len`` of ``s_1 .. s_{n-1}`` and the target at each position is the item that follows it,
so one row trains every position at once, as in SASRec (Kang & McAuley, ICDM 2018). Item ids are
shifted by one so that 0 can mean padding; rows are left-padded, which puts every user's latest
item in the last column, the one a causal model scores from.

Every batch is built from numpy index arithmetic over the CSR arrays of
:meth:`~recscale.dataset.Interactions.sequences` (no Python loop over users or positions), and
everything that decides it is a pure function of ``(seed, epoch, batch index, rank)``, as in
:class:`~recscale.loader.InMemoryLoader`: the state is a small dict and resuming mid-epoch gives
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from recscale.dataset import Interactions
from recscale.errors import ConfigError
from recscale.loader.negatives import positive_keys, sample_negatives
from recscale.loader.position import EpochLoader
from recscale.loader.world import World, partition

__all__ = ["SequenceLoader", "last_items"]

PAD = 0  # the padding id; item i is i + 1 in sequence tensors


def last_items(
    indptr: np.ndarray, items: np.ndarray, users: np.ndarray, max_len: int, drop_last: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded windows of the users' histories, shifted ids: ``(window, index)``, ``(B, L)``.

    ``items[indptr[u]:indptr[u + 1]]`` is user ``u``'s history. Row ``r`` holds the last
    ``max_len`` items of ``users[r]``'s history without its last ``drop_last`` items, as
    ``item + 1`` with 0 for padding on the left; ``index`` is each cell's position in ``items``
    (-1 for padding), so the item after a cell is ``items[index + 1]``.
    """
    users = np.asarray(users, dtype=np.int64)
    start = indptr[users]
    length = np.maximum(indptr[users + 1] - start - drop_last, 0)
    # column j of a row holds history position length - max_len + j (negative = padding)
    offset = length[:, None] - max_len + np.arange(max_len)[None, :]
    real = offset >= 0
    index = np.where(real, start[:, None] + offset, -1)
    window = np.where(real, items[np.maximum(index, 0)] + 1, PAD) if len(items) else index * 0
    return window.astype(np.int64), index


class SequenceLoader(EpochLoader):
    """One row per user with at least two training items, each user once per epoch.

    Iterating yields the remaining batches of the current epoch as dicts of int64 tensors:

    - ``users (B,)``: user indices;
    - ``seq (B, max_len)``: the inputs, ids shifted by one, 0 = padding on the left;
    - ``pos (B, max_len)``: the next item after each input (``pos[:, j] == seq[:, j + 1]`` where
      both are real), 0 where ``seq`` is padding;
    - ``neg (B, max_len, n_negatives)``: uniform negatives for each position, ids shifted by one,
      0 where ``seq`` is padding; only when ``n_negatives > 0``. With ``reject_positives`` a
      draw that is one of the user's training items is redrawn (as in InMemoryLoader);
    - ``shared_neg (≤ shared_negatives,)``: ``shared_negatives`` uniform draws for the whole
      batch, ids shifted by one, duplicates dropped and sorted (so a consumer finds the one
      column equal to a position's target by binary search, to mask it); for sampled softmax
      where every position scores the same negatives (one matrix product instead of a gather
      per position). Only when ``shared_negatives > 0``; the user's own items are not removed.

    Users are visited in a seeded order per epoch; the last batch may be smaller. When the epoch
    is exhausted the position moves to the start of the next one.

    ``bucket_batches > 1`` groups users of similar history length: the epoch's order is cut
    into windows of ``bucket_batches`` batches, each window is sorted by length and its batches
    are shuffled. Every user is still seen once per epoch, but a batch's rows are mostly as
    long as each other, so a model that drops the all-padding columns on the left computes on
    little else. On logs of short histories (median 6 on Amazon Beauty with ``max_len`` 50)
    that is most of the cost of a step.
    """

    def __init__(
        self,
        train: Interactions,
        *,
        max_len: int,
        batch_size: int,
        n_negatives: int = 0,
        shared_negatives: int = 0,
        bucket_batches: int = 0,
        seed: int = 0,
        reject_positives: bool = True,
        world: World | None = None,
    ) -> None:
        if max_len <= 0 or batch_size <= 0:
            raise ConfigError(
                f"loader: max_len and batch_size must be > 0, got {max_len} and {batch_size}"
            )
        for name, value in (
            ("n_negatives", n_negatives),
            ("shared_negatives", shared_negatives),
            ("bucket_batches", bucket_batches),
        ):
            if value < 0:
                raise ConfigError(f"loader: {name} must be >= 0, got {value}")
        self.indptr, self.items = train.sequences()
        self.n_items = train.n_items
        self.max_len = max_len
        self.batch_size = batch_size
        self.n_negatives = n_negatives
        self.shared_negatives = shared_negatives
        self.bucket_batches = bucket_batches
        self.seed = seed
        self.world = world or World()
        # a user with one item has no (input, next item) pair to learn from
        self.users = np.flatnonzero(np.diff(self.indptr) >= 2).astype(np.int64)
        self.positives = (
            positive_keys(train.user_idx, train.item_idx, self.n_items)
            if reject_positives and n_negatives
            else None
        )
        self.epoch = 0
        self.batch = 0

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's users for ``epoch``, in the order they are batched."""
        rng = np.random.default_rng([self.seed, epoch])
        order = partition(rng.permutation(self.users), self.world)
        if self.bucket_batches > 1:
            window = self.batch_size * self.bucket_batches
            length = np.diff(self.indptr)[order]
            parts = []
            for start in range(0, len(order), window):
                users = order[start : start + window]
                users = users[np.argsort(length[start : start + window], kind="stable")]
                batches = [
                    users[b : b + self.batch_size] for b in range(0, len(users), self.batch_size)
                ]
                # the last window's short batch stays last: only the final batch may be short
                full = len(batches) - (len(batches[-1]) < self.batch_size)
                shuffle = rng.permutation(full)
                parts += [batches[i] for i in shuffle] + batches[full:]
            order = np.concatenate(parts) if parts else order
        return order

    def make_batch(self, users: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The rows of ``users`` (negatives drawn from ``rng``)."""
        seq, index = last_items(self.indptr, self.items, users, self.max_len, drop_last=1)
        real = index >= 0
        pos = np.where(real, self.items[np.where(real, index + 1, 0)] + 1, PAD)
        batch = {
            "users": torch.from_numpy(users),
            "seq": torch.from_numpy(seq),
            "pos": torch.from_numpy(pos.astype(np.int64)),
        }
        if self.n_negatives:
            # drawn for the real cells only (short histories are mostly padding), row by row
            owner = np.repeat(users, real.sum(axis=1))
            neg = np.full((len(users), self.max_len, self.n_negatives), PAD, dtype=np.int64)
            neg[real] = (
                sample_negatives(owner, self.n_negatives, self.n_items, rng, self.positives) + 1
            )
            batch["neg"] = torch.from_numpy(neg)
        if self.shared_negatives:
            shared = rng.integers(0, self.n_items, self.shared_negatives, dtype=np.int64) + 1
            batch["shared_neg"] = torch.from_numpy(np.unique(shared))
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.epoch_order(self.epoch)
        for b in range(self.batch, len(self)):
            rng = np.random.default_rng([self.seed, self.epoch, b, self.world.rank])
            users = order[b * self.batch_size : (b + 1) * self.batch_size]
            batch = self.make_batch(users, rng)
            self.batch = b + 1
            yield batch
        self.epoch += 1
        self.batch = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "batch": self.batch,
            "rows": len(self.users),
            "batch_size": self.batch_size,
            "max_len": self.max_len,
            "bucket_batches": self.bucket_batches,
            "world_size": self.world.world_size,
        }
