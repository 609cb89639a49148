"""``manifest.json``: what a dataset holds and where it came from."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

from recscale.dataset.schema import FORMAT_NAME, FORMAT_VERSION
from recscale.errors import DatasetError

__all__ = ["Manifest", "SourceFile"]


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One raw input file that went into the dataset."""

    path: str
    sha256: str
    bytes: int
    format: str
    rows: int  # input rows read from this file (accepted + rejected)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a dataset directory."""

    n_users: int
    n_items: int
    n_interactions: int
    n_rejected: int
    n_input_rows: int
    columns: dict[str, str | None]  # role (user, item, time, value) -> source column
    value_kind: str  # "rating", "count" or "implicit"
    sources: tuple[SourceFile, ...] = ()
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # resolved ingest config
    created_by: str = ""
    created_at: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @staticmethod
    def now() -> str:
        return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    def write(self, directory: str | Path | Any) -> None:
        """``directory/manifest.json``; ``directory`` may be any path object with ``/``."""
        base = Path(directory) if isinstance(directory, str) else directory
        (base / "manifest.json").write_text(self.to_json())

    @classmethod
    def read(cls, directory: str | Path | Any) -> Manifest:
        base = Path(directory) if isinstance(directory, str) else directory
        path = base / "manifest.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DatasetError(
                f"{directory}: not a recscale dataset (no manifest.json); create one with `recscale ingest`"
            ) from None
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: corrupt manifest: {exc}") from None
        if data.get("format") != FORMAT_NAME:
            raise DatasetError(
                f"{path}: format is {data.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{path}: format_version {data.get('format_version')!r} is not supported "
                f"(this recscale reads version {FORMAT_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            data["sources"] = tuple(SourceFile(**s) for s in data.get("sources", ()))
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise DatasetError(f"{path}: corrupt manifest: {exc}") from None
