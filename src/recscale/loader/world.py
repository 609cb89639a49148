"""Who reads what: the explicit World of a training process and the pure partition function."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from recscale.errors import ConfigError

__all__ = ["World", "partition"]


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the training processes: ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"world: rank must be in 0..world_size-1 and world_size >= 1, "
                f"got rank={self.rank}, world_size={self.world_size}"
            )

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
