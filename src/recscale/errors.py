"""The one exception tree of recscale.

Every error a user can cause derives from :class:`RecscaleError`; the CLI catches that base class
and prints ``TypeName: message`` with a non-zero exit code instead of a traceback. The message
always names what was wrong (file, line, column, flag, field) and what was expected.

::

    RecscaleError
    ├── ConfigError               bad flag or config value, unknown config key, wrong type
    ├── InputError                a raw input that cannot be read as asked
    │   ├── SourceNotFoundError   a path or glob that matches no file
    │   ├── FormatError           unknown/undetectable format, corrupt or truncated file
    │   └── SchemaError           a named column that is not there, wrong column types
    ├── DatasetError              a dataset directory that is missing or inconsistent
    │   └── SplitNotFoundError    a split name the dataset does not have
    ├── UnknownIdError            a user or item id that is not in the dataset's id map
    ├── ModelError                unknown model name, or a model asked for what it cannot do
    ├── RunError                  a run directory or checkpoint that is missing or unusable
    └── BackendUnavailableError   an optional engine or extra that is not installed
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "DatasetError",
    "FormatError",
    "InputError",
    "ModelError",
    "RecscaleError",
    "RunError",
    "SchemaError",
    "SourceNotFoundError",
    "SplitNotFoundError",
    "UnknownIdError",
]


class RecscaleError(Exception):
    """Base class of every error recscale raises on purpose."""


class ConfigError(RecscaleError, ValueError):
    """A flag or config value is unknown, of the wrong type, or out of range."""


class InputError(RecscaleError):
    """A raw input file cannot be read as asked."""


class SourceNotFoundError(InputError, FileNotFoundError):
    """A source path, glob or directory matches no file."""


class FormatError(InputError):
    """The input's format is unknown, cannot be detected, or the file is corrupt."""


class SchemaError(InputError):
    """A column named by the user is not in the input, or has the wrong type."""


class DatasetError(RecscaleError):
    """A dataset directory is missing, incomplete, or of an unknown format version."""


class SplitNotFoundError(DatasetError, KeyError):
    """The dataset has no split of that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownIdError(RecscaleError, KeyError):
    """A user or item id is not in the dataset's id map."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ModelError(RecscaleError):
    """An unknown model name, or a model asked for something it cannot do."""


class RunError(RecscaleError):
    """A run directory or checkpoint is missing, incomplete or incompatible."""


class BackendUnavailableError(RecscaleError, ImportError):
    """An optional engine or extra is not installed; the message names the fix."""
