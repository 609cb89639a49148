"""Data-parallel training: the process group, detected from the environment.

``torchrun`` (and Spark's TorchDistributor, which runs torchrun) starts one process per rank and
describes it in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
:func:`process_group` joins the group those variables describe (gloo on the CPU, NCCL on CUDA)
and leaves it at the end; in a process started alone it does nothing. So one entry point, the
same ``recscale train`` command or :func:`recscale.train.train` call, runs alone or under torchrun.

Every rank holds a full replica of the model and trains on its share of each global batch;
:func:`data_parallel` wraps the model in ``DistributedDataParallel``, which averages the gradients
of all ranks during ``backward``. Rank 0 alone writes the run directory and validates; the helpers
here hand what it decided to the other ranks (:func:`on_rank0`, :func:`broadcast`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from recscale.errors import ConfigError, RecscaleError
from recscale.loader import World
from recscale.models import TorchRecommender

__all__ = [
    "all_sum",
    "broadcast",
    "broadcast_state",
    "data_parallel",
    "gather",
    "launched_by_torchrun",
    "on_rank0",
    "process_group",
    "rank_device",
    "world",
]

T = TypeVar("T")

# How long a rank waits in a collective for the others. Rank 0 validates and writes checkpoints
# while the others wait at the next collective, so this bounds a validation pass, not a step.
TIMEOUT = datetime.timedelta(minutes=60)


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one rank of a torchrun (or TorchDistributor) launch."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env)


def world() -> World:
    """This process's place in the joined process group (rank 0 of 1 outside one)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def rank_device(device: torch.device, env: Mapping[str, str] | None = None) -> torch.device:
    """The device this rank computes on: under torchrun, CUDA means the rank's own GPU.

    torchrun numbers the processes of a machine ``LOCAL_RANK`` 0..n-1, one per GPU; NCCL refuses
    two ranks on one GPU, so a fixed ``cuda:N`` for every rank is an error.
    """
    env = os.environ if env is None else env
    size = World.from_env(env).world_size
    if device.type != "cuda" or size == 1:
        return device
    if device.index is not None:
        raise ConfigError(
            f"train: device 'cuda:{device.index}' would put all {size} torchrun processes on one "
            "GPU; use device = 'cuda' or 'auto' (each rank takes the GPU of its LOCAL_RANK)"
        )
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"train: LOCAL_RANK {local_rank} has no GPU: this machine has "
            f"{torch.cuda.device_count()}; start at most that many processes per node "
            "(torchrun --nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join the process group torchrun describes for the body; alone, just yield rank 0 of 1.

    Nested uses (``train`` calls ``fit``) join once: only the outermost one leaves the group.
    ``device`` is what :func:`rank_device` returned: NCCL for CUDA, gloo for the CPU.
    """
    size = World.from_env().world_size
    if size == 1 or dist.is_initialized():
        yield world()
        return
    if device.type == "cuda":
        # NCCL's communicators bind to the current device: set it before the group exists
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield world()
    finally:
        dist.destroy_process_group()


class _BatchLoss(torch.nn.Module):
    """The model's batch loss as ``forward``: DDP synchronises gradients only through forward."""

    def __init__(self, model: TorchRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.batch_loss(batch)


def data_parallel(model: TorchRecommender, device: torch.device) -> torch.nn.Module:
    """A module whose ``forward(batch)`` is ``model.batch_loss(batch)``, DDP-wrapped in a group.

    Under DDP ``backward`` all-reduces (averages) the gradients bucket by bucket as they are
    computed, so when it returns every rank holds the mean gradient over all ranks' rows and the
    optimizers, fed the same gradients from the same weights, take identical steps. Each rank's
    loss is a mean over its ``batch_size / world_size`` rows, so the average is the gradient of
    the global batch's mean loss.

    The models' embedding tables get dense gradients (``F.embedding`` over dense weights), which
    gloo and NCCL both all-reduce; sparse gradients (MF-BPR's ``sparse = true``) are refused
    under several processes by :func:`~recscale.train.loop.check_world`.
    """
    module = _BatchLoss(model)
    if world().world_size == 1:
        return module
    return DistributedDataParallel(
        module,
        device_ids=[device] if device.type == "cuda" else None,
        # the buffers (graphs, histories, feature tables) are built from the same data on every
        # rank by prepare(); broadcasting them at every step would only copy them again
        forward_sync_buffers=False,
        # the set of parameters that get gradients is fixed per model and config (a two-tower
        # without genres never uses its genre table): found once, then reduced without a search
        static_graph=True,
    )


def on_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone, its result handed to every rank.

    A :class:`RecscaleError` raised on rank 0 is raised on every rank, so all of them stop with
    the same message instead of waiting for a rank that has already left.
    """
    if world().world_size == 1:
        return fn()
    result: Any = None
    error: RecscaleError | None = None
    if world().rank == 0:
        try:
            result = fn()
        except RecscaleError as exc:
            error = exc
    result, error = broadcast((result, error))
    if error is not None:
        raise error
    return result


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled: for small things, not tensors of weights)."""
    if world().world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: T) -> list[T] | None:
    """Every rank's ``obj``, by rank, on rank 0; ``None`` on the others."""
    if world().world_size == 1:
        return [obj]
    out: list[Any] | None = [None] * world().world_size if world().rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks, on every rank (in place)."""
    if world().world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_state(model: torch.nn.Module) -> None:
    """Load rank 0's weights and buffers into every rank's ``model``, tensor by tensor."""
    if world().world_size == 1:
        return
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for tensor in state.values():
        dist.broadcast(tensor, src=0)
    model.load_state_dict(state)
