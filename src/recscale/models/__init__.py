"""Recommender models: one small interface, an explicit registry, baselines and PyTorch models."""

from recscale.models.base import Recommender, TorchRecommender
from recscale.models.bspm import BSPM, BSPMParams
from recscale.models.ease import EASE, EASEParams
from recscale.models.ials import IALS, IALSParams
from recscale.models.itemknn import ItemKNN, ItemKNNParams
from recscale.models.lightgcn import LightGCN, LightGCNParams
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
from recscale.models.sasrec import SASRec, SASRecParams
from recscale.models.two_tower import TwoTower, TwoTowerParams

__all__ = [
    "BSPM",
    "EASE",
    "IALS",
    "LOSSES",
    "MFBPR",
    "MODELS",
    "BSPMParams",
    "EASEParams",
    "IALSParams",
    "ItemKNN",
    "ItemKNNParams",
    "LightGCN",
    "LightGCNParams",
    "MFBPRParams",
    "Popularity",
    "PopularityParams",
    "Recommender",
    "SASRec",
    "SASRecParams",
    "TorchRecommender",
    "TwoTower",
    "TwoTowerParams",
    "bpr_loss",
    "cosine_contrastive_loss",
    "create_model",
    "get_model_class",
    "in_batch_softmax_loss",
    "l2_batch",
    "model_params",
    "sampled_softmax_loss",
]
