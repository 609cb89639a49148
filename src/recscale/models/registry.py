"""The explicit model registry: registry name -> class. Adding a model is one line here."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from recscale.config import config_from_dict
from recscale.errors import ConfigError, ModelError
from recscale.models.base import Recommender
from recscale.models.bspm import BSPM
from recscale.models.ease import EASE
from recscale.models.ials import IALS
from recscale.models.itemknn import ItemKNN
from recscale.models.lightgcn import LightGCN
from recscale.models.mf_bpr import MFBPR
from recscale.models.popularity import Popularity
from recscale.models.sasrec import SASRec
from recscale.models.two_tower import TwoTower

__all__ = ["MODELS", "create_model", "get_model_class", "model_params"]

MODELS: dict[str, type[Recommender]] = {
    cls.name: cls
    for cls in (
        Popularity,
        IALS,
        MFBPR,
        LightGCN,
        BSPM,
        SASRec,
        TwoTower,
        EASE,
        ItemKNN,
    )
}


def get_model_class(name: str) -> type[Recommender]:
    """The class registered as ``name``; an unknown name is a :class:`ModelError` listing all."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(MODELS))
        raise ModelError(f"unknown model {name!r}; known models are: {known}") from None


def model_params(name: str, params: Mapping[str, Any] | Any | None = None) -> Any:
    """The model's frozen ``Params`` from a ``[model]`` table (unknown key, wrong type: ConfigError).

    A ``Params`` instance is returned as is; ``None`` means all defaults.
    """
    cls = get_model_class(name)
    if isinstance(params, cls.Params):
        return params
    if params is None:
        params = {}
    if dataclasses.is_dataclass(params) or not isinstance(params, Mapping):
        raise ConfigError(
            f"[model] for {name!r}: expected a table of hyper-parameters or "
            f"{cls.Params.__qualname__}, got {type(params).__name__}"
        )
    return config_from_dict(cls.Params, params, where=f"[model] ({name})")


def create_model(
    name: str,
    params: Mapping[str, Any] | Any | None,
    n_users: int,
    n_items: int,
    *,
    seed: int = 0,
) -> Recommender:
    """A new, untrained model ``name`` with validated hyper-parameters, seeded with ``seed``."""
    cls = get_model_class(name)
    return cls(model_params(name, params), n_users, n_items, seed=seed)
