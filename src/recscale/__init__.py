"""recscale: train deep-learning recommenders on big interaction logs and serve them.

Stages, each a CLI subcommand and a Python function, reading the previous stage's files:
``recscale.ingest`` (raw logs -> dataset), ``recscale.ingest.split``, ``recscale.train``
(models from ``recscale.models``), ``recscale.evaluate``. Heavy modules load on first use, so
``import recscale`` stays cheap.
"""

from recscale.errors import RecscaleError

__version__ = "0.1.0"

__all__ = ["RecscaleError", "__version__"]
