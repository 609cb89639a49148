"""Recommender models: one small interface, an explicit registry, baselines and PyTorch models."""

from recscale.models.base import Recommender, TorchRecommender
from recscale.models.ials import IALS, IALSParams
from recscale.models.losses import bpr_loss, l2_batch
from recscale.models.mf_bpr import MFBPR, MFBPRParams
from recscale.models.popularity import Popularity, PopularityParams
from recscale.models.registry import MODELS, create_model, get_model_class, model_params

__all__ = [
    "IALS",
    "MFBPR",
    "MODELS",
    "IALSParams",
    "MFBPRParams",
    "Popularity",
    "PopularityParams",
    "Recommender",
    "TorchRecommender",
    "bpr_loss",
    "create_model",
    "get_model_class",
    "l2_batch",
    "model_params",
]
