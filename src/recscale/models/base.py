"""The one model interface: fit, score, export embeddings, save and load.

Every model answers the same few verbs so that training, evaluation and serving never need to know
which model they hold. Two kinds exist:

- :class:`Recommender` fitted in one call (popularity, iALS): ``fit(train)`` does all the work;
- :class:`TorchRecommender`, trained epoch by epoch by :mod:`recscale.train.loop`, which asks it
  for the loss of one batch and for its optimizer and owns everything else (batches, checkpoints,
  validation, early stopping).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from recscale.dataset import Interactions
from recscale.errors import ConfigError, ModelError
from recscale.loader import InMemoryLoader, StreamLoader, World

__all__ = ["Recommender", "TorchRecommender", "rank_batch_size"]


def rank_batch_size(batch_size: int, world: World) -> int:
    """Rows per step of one rank: ``batch_size`` is the global batch, shared by all ranks.

    Equal shares keep the ranks in lockstep and make the average of their gradients the gradient
    of the global batch, so a run computes the same steps whatever the number of processes.
    """
    if batch_size % world.world_size:
        raise ConfigError(
            f"train: batch_size {batch_size} is the global batch and must be divisible by the "
            f"{world.world_size} training processes (each takes batch_size / {world.world_size} "
            "rows per step); choose a multiple of the number of processes"
        )
    return batch_size // world.world_size


class Recommender(abc.ABC):
    """A recommender over the dense user/item indices of one dataset.

    ``params`` is an instance of the class's frozen ``Params`` dataclass (the ``[model]`` table of a
    run's config); ``seed`` makes initialisation reproducible: same seed, same data, same model.
    """

    name: ClassVar[str]  # registry key, e.g. "mf-bpr"
    Params: ClassVar[type]  # frozen dataclass of hyper-parameters

    def __init__(self, params: Any, n_users: int, n_items: int, *, seed: int = 0) -> None:
        if not isinstance(params, self.Params):
            raise ModelError(
                f"model {self.name!r} expects {self.Params.__qualname__} parameters, "
                f"got {type(params).__name__}"
            )
        if n_users <= 0 or n_items <= 0:
            raise ModelError(
                f"model {self.name!r} needs at least one user and one item, "
                f"got n_users={n_users}, n_items={n_items}"
            )
        self.params = params
        self.n_users = int(n_users)
        self.n_items = int(n_items)
        self.seed = int(seed)

    def prepare(self, train: Interactions, items: pa.Table | None = None) -> None:
        """Take in what the model conditions on besides its batches, before training starts.

        ``train`` is the training part (LightGCN builds its graph from it, sequence models their
        histories); ``items`` is the dataset's ``items.parquet`` (titles, genres) for models with
        item features. Anything kept must live in :meth:`state_dict`, so a model loaded from a
        checkpoint scores without being prepared again. The default observes ``train``.
        """
        self.observe(train)

    def observe(self, history: Interactions) -> None:
        """Set the interactions visible when scoring: each user's history, in time order.

        Models that encode a user from their history (SASRec, the two-tower user tower) read it in
        :meth:`score`; evaluating the test part observes train and valid, as a deployed model
        would see them. Models whose users are free parameters ignore it (the default).
        """
        return None

    @abc.abstractmethod
    def fit(self, train: Interactions, *, progress: bool = True) -> None:
        """Learn from all of ``train`` in one call."""

    @abc.abstractmethod
    def score(self, users: np.ndarray) -> torch.Tensor:
        """Scores of every item for each user: float32 ``(len(users), n_items)`` on the device.

        Higher is better; scores of one user are comparable with each other only.
        """

    @property
    def similarity(self) -> str:
        """How the model scores a user and an item from their vectors: ``"dot"`` or ``"cosine"``.

        A cosine model exports unit vectors (so their inner products are still its scores); a
        vector index that sees the name can use its own cosine metric and stay consistent.
        """
        return "dot"

    def export_embeddings(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(user_vectors, item_vectors)`` whose inner products are the scores, or ``None``.

        Serving turns recommendation into a nearest-neighbour search over the item vectors, so a
        model returns vectors only when ``score(u) == user_vectors[u] @ item_vectors.T``.
        """
        return None

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything learnt, as tensors and plain values (what a checkpoint stores)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> Any:
        """Restore what :meth:`state_dict` returned."""

    @abc.abstractmethod
    def to(self, device: str | torch.device) -> Recommender:
        """Move the model (and where it computes) to ``device``; returns ``self``."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where :meth:`score` computes and returns its tensors."""

    def _check_users(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64)
        if users.ndim != 1:
            raise ModelError(f"users must be a 1-d array of user indices, got shape {users.shape}")
        if len(users) and (users.min() < 0 or users.max() >= self.n_users):
            bad = users[(users < 0) | (users >= self.n_users)][0]
            raise ModelError(f"user index {bad} is out of range: expected 0..{self.n_users - 1}")
        return users

    def _check_train(self, train: Interactions) -> None:
        if train.n_users != self.n_users or train.n_items != self.n_items:
            raise ModelError(
                f"model {self.name!r} was built for {self.n_users} users × {self.n_items} items, "
                f"but the interactions are over {train.n_users} × {train.n_items}"
            )


class TorchRecommender(torch.nn.Module, Recommender):
    """A PyTorch model trained batch by batch by :func:`recscale.train.loop.fit`.

    nn.Module comes first in the bases so its ``state_dict``/``load_state_dict``/``to`` are the
    ones used. Subclasses set :attr:`n_negatives`, the negatives per positive the loader samples.
    """

    n_negatives: int = 1

    def __init__(self, params: Any, n_users: int, n_items: int, *, seed: int = 0) -> None:
        torch.nn.Module.__init__(self)
        Recommender.__init__(self, params, n_users, n_items, seed=seed)

    def fit(self, train: Interactions, *, progress: bool = True) -> None:
        raise ModelError(
            f"model {self.name!r} is trained epoch by epoch: use recscale.train.train(...) "
            "or recscale.train.fit(model, train, ...) instead of model.fit"
        )

    @abc.abstractmethod
    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar loss of one batch: ``users (B,)``, ``pos (B,)``, ``neg (B, n_negatives)``."""

    @abc.abstractmethod
    def make_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over this model's parameters, built from its hyper-parameters."""

    def make_loader(
        self,
        train: Interactions,
        config: Any,
        *,
        world: World | None = None,
        source: str | Path | None = None,
    ) -> Any:
        """The batches this rank trains on (``config`` is the run's ``TrainConfig``).

        ``world`` is this process's rank among the training processes (one process without it):
        the loader reads that rank's share of every epoch, in batches of
        :func:`rank_batch_size` rows, so the ranks' batch ``b`` together are the global batch
        ``b`` of ``config.batch_size`` rows.

        The default is (user, positive, negatives) rows from
        :class:`~recscale.loader.InMemoryLoader`, or, with ``config.loader = "stream"``, from
        :class:`~recscale.loader.StreamLoader` over ``source``, the split part's Parquet
        directory; sequence models return their own loader with
        the same protocol: ``__iter__`` over the rest of the epoch, ``__len__`` (batches per
        epoch), ``rows_per_epoch`` (of this rank), ``batch`` (position in the epoch),
        ``state_dict`` and ``load_state_dict``.
        """
        world = world or World()
        if config.loader == "stream":
            if source is None:
                raise ConfigError(
                    "train: loader = 'stream' reads the split's Parquet files; train through "
                    "recscale.train.train (or `recscale train`), which knows where they are"
                )
            return StreamLoader(
                source,
                n_items=self.n_items,
                batch_size=rank_batch_size(config.batch_size, world),
                n_negatives=self.n_negatives,
                shuffle_buffer=config.shuffle_buffer,
                num_workers=config.num_workers,
                seed=config.seed,
                reject_positives=config.reject_positives,
                world=world,
                # pinned batches copy to the GPU without a staging copy
                pin_memory=self.device.type == "cuda",
            )
        return InMemoryLoader(
            train,
            batch_size=rank_batch_size(config.batch_size, world),
            n_negatives=self.n_negatives,
            seed=config.seed,
            reject_positives=config.reject_positives,
            sampling=config.sampling,
            world=world,
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _generator(self) -> torch.Generator:
        """A CPU generator seeded with ``seed``: initialisation never touches global RNG state."""
        return torch.Generator().manual_seed(self.seed)
