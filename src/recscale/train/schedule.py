"""Learning-rate schedules: pure functions of the optimizer step.

A schedule that depends on nothing but the step needs no state in the checkpoint and resumes
exactly: the loop sets ``lr = base_lr × lr_factor(...)`` before every step.
"""

from __future__ import annotations

import math

from recscale.errors import ConfigError

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    ``constant``: 1. ``cosine``: from 1 at step 0 down to 0 at ``total_steps`` along half a cosine
    (Loshchilov & Hutter 2017, without restarts): big steps while far from a minimum, small ones
    at the end, so the last epoch's model is a settled one.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(max(step, 0) / max(total_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"train: lr_schedule {schedule!r} is unknown; expected one of {SCHEDULES}")
