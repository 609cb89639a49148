"""The HTTP service: a FastAPI app over a run's vector index (see :mod:`recscale.service.app`)."""

from recscale.service.app import create_app
from recscale.service.settings import API_KEY_ENV, ServiceSettings
from recscale.service.state import ModelHolder, ServedModel, fold_in

__all__ = ["API_KEY_ENV", "ModelHolder", "ServedModel", "ServiceSettings", "create_app", "fold_in"]
