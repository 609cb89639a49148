"""Item side features computed from the dataset's item table: sentence embeddings of titles.

The heavy libraries they need are optional (the ``text`` extra) and imported only when a feature
is asked for, so ``import recscale.features`` stays cheap.
"""

from recscale.features.text import TEXT_DIM, embed_texts

__all__ = ["TEXT_DIM", "embed_texts"]
