"""Atomic checkpoints and the RNG states they carry.

A checkpoint is written to a temporary file beside its final name, flushed to disk, then renamed
over it (``os.replace`` is atomic on POSIX and Windows): a crash at any moment leaves either the
previous checkpoint or the new one, never a torn file. Checkpoints hold only tensors and plain
values, so they load with ``torch.load(weights_only=True)`` and never run pickled code.
"""

from __future__ import annotations

import os
import pickle
import random
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recscale.errors import RunError

__all__ = [
    "CHECKPOINT_FORMAT",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "recscale-checkpoint-1"


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as fh:
            torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU; a missing, torn or foreign file is a :class:`RunError`."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise RunError(f"checkpoint {path} is unreadable (corrupt or truncated): {exc}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint)
        raise RunError(f"checkpoint {path}: format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    return checkpoint


def get_rng_state() -> dict[str, Any]:
    """The global RNG states of Python, NumPy and PyTorch (CPU and every CUDA device)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {
                "key": state["numpy"]["key"].numpy().astype(np.uint32),
                "pos": state["numpy"]["pos"],
            },
            "has_gauss": state["numpy"]["has_gauss"],
            "gauss": state["numpy"]["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
