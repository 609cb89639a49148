"""What every loader shares: its position in training (epoch, batch) and how it resumes."""

from __future__ import annotations

from typing import Any

import numpy as np

from recscale.errors import RunError
from recscale.loader.world import World

__all__ = ["EpochLoader"]


class EpochLoader:
    """Base of the loaders: an epoch visits ``users`` (or rows) split across the World's ranks.

    Subclasses set ``users``, ``batch_size``, ``world``, ``epoch`` and ``batch`` and put their
    set-up in :meth:`state_dict`; everything in it but the position must match on resume.
    """

    users: np.ndarray
    batch_size: int
    world: World
    epoch: int
    batch: int
    # what moves during training; every other key of the state must match on resume
    POSITION_KEYS: tuple[str, ...] = ("epoch", "batch")

    @property
    def rows_per_epoch(self) -> int:
        """What this rank reads per epoch (all ranks read the same number)."""
        return -(-len(self.users) // self.world.world_size)

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.rows_per_epoch // self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        differ = [k for k in mine if k not in self.POSITION_KEYS and state.get(k) != mine[k]]
        if differ:
            got = ", ".join(f"{k}={state.get(k)!r} (now {mine[k]!r})" for k in differ)
            raise RunError(f"loader state is from another set-up: {got}")
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])
