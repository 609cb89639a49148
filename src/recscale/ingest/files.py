"""Where ingest and split find their files: local paths, or the Spark session's Hadoop filesystems.

Both engines plan sources and write datasets through one small interface, :class:`Files`. The
DuckDB engine uses :data:`LOCAL_FILES` (:mod:`pathlib`, :mod:`glob`, :mod:`shutil`); the Spark
engine uses :class:`recscale.ingest.hadoop.HadoopFS` for every path, local or not, so its driver
sees exactly what its executors see. A path object of either kind has the methods of
:class:`pathlib.Path` that recscale uses (``/``, ``name``, ``parent``, ``exists``, ``is_file``,
``iterdir``, ``open``, ``read_text``, ``write_text``...).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from recscale.dataset import atomic_directory, file_sha256
from recscale.errors import ConfigError

__all__ = ["LOCAL_FILES", "Files", "is_uri", "refuse_uris"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:/")


def is_uri(text: str) -> bool:
    """Whether ``text`` starts with a scheme (``hdfs://nn/x``, ``s3a://b/k``, ``file:/x``).

    One letter before the colon is a Windows drive, not a scheme; a colon without a slash after
    it is part of a file name (``log:2024.csv``).
    """
    return bool(_SCHEME.match(text))


class Files(Protocol):
    """A filesystem as ingest and split need it."""

    def path(self, text: str) -> Any:
        """The path object for ``text``."""

    def glob(self, pattern: str) -> list[Any]:
        """Paths matching ``pattern``, with :func:`glob.glob`'s rules (``**`` recursive)."""

    def sha256(self, path: Any) -> str:
        """Hex SHA-256 of a file's bytes."""

    def make_temp_dir(self, parent: Any, prefix: str) -> Any:
        """A new empty folder in ``parent`` whose name starts with ``prefix``."""

    def remove_tree(self, path: Any) -> None:
        """Delete ``path`` and everything under it; nothing if it does not exist."""

    def atomic_directory(self, final: Any) -> contextlib.AbstractContextManager[Any]:
        """A fresh folder that becomes ``final`` when the block succeeds (see
        :func:`recscale.dataset.atomic_directory`)."""


class _LocalFiles:
    """Local files: :mod:`pathlib`, :mod:`glob`, :mod:`shutil`."""

    def path(self, text: str) -> Path:
        return Path(text)

    def glob(self, pattern: str) -> list[Path]:
        import glob

        return [Path(p) for p in glob.glob(pattern, recursive=True)]

    def sha256(self, path: Path) -> str:
        return file_sha256(path)

    def make_temp_dir(self, parent: Path, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))

    def remove_tree(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def atomic_directory(self, final: Path) -> Iterator[Path]:
        with atomic_directory(final) as tmp:
            yield tmp


#: Local files, the default of :func:`recscale.ingest.sources.plan_sources`.
LOCAL_FILES: Files = _LocalFiles()


def refuse_uris(stage: str, texts: Sequence[str | Path | None]) -> None:
    """A ConfigError naming the first URI in ``texts``: the DuckDB engine reads local paths only."""
    for text in texts:
        if text is not None and not isinstance(text, Path) and is_uri(str(text)):
            raise ConfigError(
                f"{stage}: {str(text)!r} is a URI; engine 'duckdb' reads and writes local paths "
                "only; use engine 'spark' (--engine spark) for hdfs://, s3a://, file:// and other "
                "Hadoop filesystem URIs"
            )
