"""Batches of (user, positive item, negative items) from interactions held in memory.

Everything that decides a batch is a pure function of ``(seed, epoch, batch index, rank)``: the
epoch's row order comes from a generator seeded with ``(seed, epoch)`` and the negatives of batch
``b`` from one seeded with ``(seed, epoch, b, rank)``. So the loader's whole position is the small
dict :meth:`InMemoryLoader.state_dict` returns, and resuming from it continues exactly where an
uninterrupted run would be, mid-epoch included, without replaying any random draws.
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

__all__ = ["InMemoryLoader"]

SAMPLINGS = ("interactions", "users")


class InMemoryLoader(EpochLoader):
    """Batches of training pairs with uniform negative sampling.

    ``sampling`` chooses how positives are drawn:

    - ``"interactions"``: every training row exactly once per epoch, in a seeded shuffled order;
      a user weighs in proportion to its number of interactions.
    - ``"users"``: each row draws a user uniformly among those with training items, then one of
      its items uniformly (LightGCN's sampler). Every user weighs the same, as in the per-user
      averages of Recall/NDCG, which is why it ranks better there. An epoch is as many draws as
      there are training rows.

    Iterating yields the remaining batches of the current epoch as dicts of int64 tensors:
    ``users (B,)``, ``pos (B,)``, ``neg (B, n_negatives)``; the last batch may be smaller. When
    the epoch is exhausted the position moves to the start of the next one. The position advances
    as each batch is handed out, so a state taken after the consumer has used a batch points past it.
    """

    def __init__(
        self,
        train: Interactions,
        *,
        batch_size: int,
        n_negatives: int = 1,
        seed: int = 0,
        reject_positives: bool = True,
        sampling: str = "interactions",
        world: World | None = None,
    ) -> None:
        if batch_size <= 0 or n_negatives <= 0:
            raise ConfigError(
                f"loader: batch_size and n_negatives must be > 0, got {batch_size} and {n_negatives}"
            )
        if sampling not in SAMPLINGS:
            raise ConfigError(
                f"loader: sampling {sampling!r} is unknown; expected one of {', '.join(SAMPLINGS)}"
            )
        self.users = train.user_idx.astype(np.int64)
        self.items = train.item_idx.astype(np.int64)
        self.n_items = train.n_items
        self.batch_size = batch_size
        self.n_negatives = n_negatives
        self.seed = seed
        self.sampling = sampling
        self.world = world or World()
        if sampling == "users":
            # rows grouped by user: a user's items are by_user[start[u] : start[u] + degree[u]]
            by_user = np.argsort(self.users, kind="stable")
            self.items_by_user = self.items[by_user]
            degree = np.bincount(self.users, minlength=train.n_users)
            self.active_users = np.flatnonzero(degree)
            self.start = (np.cumsum(degree) - degree)[self.active_users]
            self.degree = degree[self.active_users]
        self.positives = (
            positive_keys(self.users, self.items, self.n_items) if reject_positives else None
        )
        self.epoch = 0
        self.batch = 0

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's row indices for ``epoch``, in the order they are batched."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.users))
        return partition(order, self.world)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.epoch_order(self.epoch) if self.sampling == "interactions" else None
        for b in range(self.batch, len(self)):
            rng = np.random.default_rng([self.seed, self.epoch, b, self.world.rank])
            if order is not None:
                rows = order[b * self.batch_size : (b + 1) * self.batch_size]
                users, pos = self.users[rows], self.items[rows]
            else:
                size = min(self.batch_size, self.rows_per_epoch - b * self.batch_size)
                pick = rng.integers(0, len(self.active_users), size)
                offset = rng.integers(0, self.degree[pick])
                users = self.active_users[pick]
                pos = self.items_by_user[self.start[pick] + offset]
            neg = sample_negatives(users, self.n_negatives, self.n_items, rng, self.positives)
            self.batch = b + 1
            yield {
                "users": torch.from_numpy(users),
                "pos": torch.from_numpy(pos),
                "neg": torch.from_numpy(neg),
            }
        self.epoch += 1
        self.batch = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "batch": self.batch,
            "rows": len(self.users),
            "batch_size": self.batch_size,
            "world_size": self.world.world_size,
            "sampling": self.sampling,
        }
