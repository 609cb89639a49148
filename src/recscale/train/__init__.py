"""Training: the loop, atomic checkpoints and run directories."""

from recscale.train.checkpoint import load_checkpoint, save_checkpoint
from recscale.train.loop import FitResult, fit, resolve_device
from recscale.train.run import Run, default_run_dir, train, write_embeddings

__all__ = [
    "FitResult",
    "Run",
    "default_run_dir",
    "fit",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "train",
    "write_embeddings",
]
