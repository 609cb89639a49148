"""Recommender models: one small interface, an explicit registry, baselines and PyTorch models."""

from recscale.models.base import Recommender, TorchRecommender
from recscale.models.ials import IALS, IALSParams
from recscale.models.losses import (
    LOSSES,
    bpr_loss,
    cosine_contrastive_loss,
    in_batch_softmax_loss,
    l2_batch,
    sampled_softmax_loss,
)
from recscale.models.mf_bpr import MFBPR, MFBPRParams
from recscale.models.popularity import Popularity, PopularityParams
from recscale.models.registry import MODELS, create_model, get_model_class, model_params

__all__ = [
    "IALS",
    "LOSSES",
    "MFBPR",
    "MODELS",
    "IALSParams",
    "MFBPRParams",
    "Popularity",
    "PopularityParams",
    "Recommender",
    "TorchRecommender",
    "bpr_loss",
    "cosine_contrastive_loss",
    "create_model",
    "get_model_class",
    "in_batch_softmax_loss",
    "l2_batch",
    "model_params",
    "sampled_softmax_loss",
]
