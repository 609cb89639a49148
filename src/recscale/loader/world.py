"""Who reads what: the explicit World of a reader and the pure partition function.

A reader is one DataLoader worker of one training process: worker ``worker`` of
``num_workers`` on rank ``rank`` of ``world_size``. The main process of a rank without workers is
worker 0 of 1.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from recscale.errors import ConfigError

__all__ = ["World", "partition"]


@dataclasses.dataclass(frozen=True)
class World:
    """A reader's place: ``rank`` of ``world_size`` processes, ``worker`` of ``num_workers``."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"world: rank must be in 0..world_size-1 and world_size >= 1, "
                f"got rank={self.rank}, world_size={self.world_size}"
            )
        if self.num_workers < 1 or not 0 <= self.worker < self.num_workers:
            raise ConfigError(
                f"world: worker must be in 0..num_workers-1 and num_workers >= 1, "
                f"got worker={self.worker}, num_workers={self.num_workers}"
            )

    @property
    def readers(self) -> int:
        """Readers in the whole world: every worker of every rank."""
        return self.world_size * self.num_workers

    def with_worker(self, worker: int, num_workers: int) -> World:
        """This rank's world seen from one of its DataLoader workers."""
        return World(self.rank, self.world_size, worker, num_workers)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """The world torchrun describes in ``RANK``/``WORLD_SIZE``; one process without them."""
        env = os.environ if env is None else env
        try:
            return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")))
        except ValueError:
            raise ConfigError(
                f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r}: "
                "expected integers (set by torchrun)"
            ) from None


def partition(order: np.ndarray, world: World) -> np.ndarray:
    """This rank's share of an epoch's row order, shape ``(ceil(len(order) / world_size),)``.

    Rows are dealt round-robin, so rank ``r`` gets ``order[r], order[r + W], ...``. Ranks whose
    share is one short are topped up from the start of ``order``: every rank gets the same number
    of rows, because data-parallel ranks step (and all-reduce) in lockstep. When ``world_size``
    divides ``len(order)`` every row goes to exactly one rank; otherwise fewer than
    ``world_size`` rows are seen twice in the epoch.
    """
    order = np.asarray(order)
    n, w = len(order), world.world_size
    per_rank = -(-n // w)
    padded = np.resize(order, per_rank * w)  # cycles through order: the top-up wraps around
    return padded[world.rank :: w]
