"""Typed, frozen configuration for every stage, read from and written to TOML.

Each stage takes one frozen dataclass, passed whole. Values come from defaults, then a TOML file,
then command-line flags. An unknown key or a value of the wrong type is a :class:`ConfigError`
that names the key and the file; nothing is silently dropped.

A TOML config may hold several stages, one table each::

    [ingest]
    dedupe = "keep-last"

    [train]
    epochs = 20

    [model]            # hyper-parameters of the model chosen by train.model
    factors = 128
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from recscale.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "EvalConfig",
    "IngestConfig",
    "SplitConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_toml",
    "parse_toml_value",
    "write_toml",
]

C = TypeVar("C")


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` converted to ``annotation`` if it is a lossless match, else raise."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"{where}: got {value!r}, which fits none of {annotation}"
        )
    if origin is typing.Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: got {value!r}; expected one of {allowed}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: got {value!r}; expected a list")
        inner = args[0] if args else Any
        return tuple(_check_value(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: got {value!r}; expected a table")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: got {value!r}; expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: got {value!r}; expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: got {value!r}; expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: got {value!r}; expected a string")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: got {value!r}; expected a table")
        return config_from_dict(annotation, value, where=where)  # type: ignore[arg-type]
    return value


def config_from_dict(cls: type[C], data: Mapping[str, Any], *, where: str = "config") -> C:
    """Build the frozen dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types.

    ``where`` names the source for messages, e.g. ``"run.toml [train]"``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields))
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys are: {allowed}")
    values = {
        key: _check_value(value, hints[key], f"{where}: {key}") for key, value in data.items()
    }
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def config_to_dict(config: Any) -> dict[str, Any]:
    """The dataclass as a TOML-ready dict (tuples become lists, ``None`` values are left out)."""

    def clean(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return config_to_dict(value)
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        return value

    return {
        f.name: clean(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if getattr(config, f.name) is not None
    }


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error is a :class:`ConfigError`."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def parse_toml_value(text: str) -> Any:
    """A command-line value read as TOML (``64``, ``1e-3``, ``true``, ``'bpr'``, ``[1, 2]``); text
    that is not a TOML value is taken as a string, so ``loss=bpr`` works unquoted."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def write_toml(path: str | Path, tables: Mapping[str, Any]) -> None:
    """Write ``tables`` (stage name -> dataclass or dict) as one TOML file."""
    doc = {
        name: config_to_dict(value) if dataclasses.is_dataclass(value) else dict(value)
        for name, value in tables.items()
    }
    Path(path).write_text(tomli_w.dumps(doc))


def _positive(where: str, **values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{where}: {name} must be > 0, got {value!r}")


DedupePolicy = typing.Literal["keep-first", "keep-last", "sum", "count", "none"]
SourceFormat = typing.Literal["auto", "csv", "tsv", "jsonl", "parquet", "movielens", "lightgcn"]


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """How raw logs become a dataset (``recscale ingest``)."""

    format: SourceFormat = "auto"
    user_col: str | None = None
    item_col: str | None = None
    time_col: str | None = None
    value_col: str | None = None
    # csv/tsv only: field separator and whether the first line is a header; None = detect
    delimiter: str | None = None
    header: bool | None = None
    # how a timestamp column is parsed when it is text: None = unix seconds or ISO-8601
    time_format: str | None = None
    # for sources without a time column whose rows are in time order per user (e.g. the
    # SASRec/BERT4Rec sequence files): ts becomes the row's 1-based position in the input, its
    # line number in a text file (header included), so leave-last splits and sequence models
    # follow the file's order; a later file continues after the earlier ones
    order_from_input: bool = False
    dedupe: DedupePolicy = "keep-last"
    min_user_interactions: int = 0
    min_item_interactions: int = 0
    positive_threshold: float | None = None
    memory_limit: str = "2GB"
    threads: int | None = None
    rows_per_group: int = 1_000_000
    # metadata files (titles, genres) joined onto items.parquet / users.parquet
    items_file: str | None = None
    users_file: str | None = None
    # ids: "int" rejects ids that are not integers (bad_user/bad_item); "string" accepts any
    # text; "auto" = "int" for MovieLens and LightGCN (integer ids by definition), else "string"
    id_type: typing.Literal["auto", "int", "string"] = "auto"

    def __post_init__(self) -> None:
        if self.min_user_interactions < 0 or self.min_item_interactions < 0:
            raise ConfigError("ingest: min_user_interactions/min_item_interactions must be >= 0")
        _positive("ingest", rows_per_group=self.rows_per_group, threads=self.threads)
        hints = typing.get_type_hints(IngestConfig)
        for name in ("format", "dedupe", "id_type"):
            allowed = typing.get_args(hints[name])
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"ingest: {name} {getattr(self, name)!r} is unknown; expected one of "
                    + ", ".join(repr(a) for a in allowed)
                )
        if self.order_from_input and self.time_col is not None:
            raise ConfigError(
                f"ingest: time_col {self.time_col!r} and order_from_input are both given; "
                "order_from_input makes ts the input position, for sources without a time column"
            )
        if self.delimiter is not None and not 1 <= len(self.delimiter) <= 4:
            raise ConfigError(
                f"ingest: delimiter must be 1 to 4 characters, got {self.delimiter!r}"
            )


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How a dataset is split into train/valid/test (``recscale split``)."""

    strategy: typing.Literal["leave-last", "temporal", "random", "given"] = "leave-last"
    name: str | None = None  # defaults to the strategy name
    seed: int = 0
    # leave-last: the last k interactions of each user (by time) go to test, the k before to valid
    k: int = 1
    # random: fraction of each user's interactions held out for test (and again for valid)
    test_fraction: float = 0.2
    valid_fraction: float = 0.1
    # temporal: the global cutoff as a quantile of time (or an explicit unix time)
    test_quantile: float = 0.9
    valid_quantile: float | None = 0.8
    cutoff: int | None = None
    # temporal: an explicit unix time where valid starts (instead of valid_quantile)
    valid_cutoff: int | None = None
    # whether to carve a validation set out of train (leave-last, random, given)
    valid: bool = True
    # users with fewer than this many interactions keep them all in train (leave-last)
    min_history: int = 3
    # DuckDB resources; they change how fast a split is made, never what it holds
    memory_limit: str = "2GB"
    threads: int | None = None

    def __post_init__(self) -> None:
        strategies = typing.get_args(typing.get_type_hints(SplitConfig)["strategy"])
        if self.strategy not in strategies:
            allowed = ", ".join(repr(s) for s in strategies)
            raise ConfigError(
                f"split: strategy {self.strategy!r} is unknown; expected one of {allowed}"
            )
        _positive("split", k=self.k, threads=self.threads)
        if self.min_history < 0:
            raise ConfigError(f"split: min_history must be >= 0, got {self.min_history!r}")
        if (
            self.cutoff is not None
            and self.valid_cutoff is not None
            and self.valid_cutoff > self.cutoff
        ):
            raise ConfigError(
                f"split: valid_cutoff ({self.valid_cutoff}) must not be after cutoff ({self.cutoff})"
            )
        for name in ("test_fraction", "valid_fraction", "test_quantile"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"split: {name} must be between 0 and 1, got {value!r}")
        if self.valid_quantile is not None and not 0 < self.valid_quantile < self.test_quantile:
            raise ConfigError(
                f"split: valid_quantile must be between 0 and test_quantile ({self.test_quantile}), "
                f"got {self.valid_quantile!r}"
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a model is trained (``recscale train``); model hyper-parameters live in ``[model]``."""

    model: str = "mf-bpr"
    split: str = "leave-last"
    epochs: int = 20
    batch_size: int = 2048
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # positives: each training row once per epoch ("interactions"), or a uniform user and then
    # one of its items ("users", LightGCN's sampler: every user weighs the same)
    sampling: typing.Literal["interactions", "users"] = "interactions"
    # negative sampling: redraw negatives that are among the user's training items
    reject_positives: bool = True
    # where batches come from: the train part held in memory ("memory"), or streamed from its
    # Parquet row groups ("stream", recscale.loader.StreamLoader: the loader's memory is
    # bounded by shuffle_buffer rows, whatever the size of the log)
    loader: typing.Literal["memory", "stream"] = "memory"
    # stream: rows shuffled together in memory (the row groups' order is shuffled too)
    shuffle_buffer: int = 1_000_000
    # stream: DataLoader worker processes that read, shuffle and batch beside training
    num_workers: int = 0
    # learning rate over the run: the model's lr throughout ("constant") or decayed to 0 at the
    # last step of `epochs` along half a cosine ("cosine")
    lr_schedule: typing.Literal["constant", "cosine"] = "cosine"
    # validation and early stopping on NDCG@validate_k of the split's valid part
    validate_every: int = 1
    validate_k: int = 20
    # validations in a row without improvement before training stops; 0 = never stop early
    patience: int = 3
    # evaluating on a sample of users keeps validation cheap on big data; 0 = all users
    validate_users: int = 0
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _positive(
            "train",
            epochs=self.epochs,
            batch_size=self.batch_size,
            validate_every=self.validate_every,
            validate_k=self.validate_k,
            num_threads=self.num_threads,
        )
        if self.patience < 0 or self.validate_users < 0:
            raise ConfigError("train: patience and validate_users must be >= 0")
        _positive("train", shuffle_buffer=self.shuffle_buffer)
        if self.num_workers < 0:
            raise ConfigError(f"train: num_workers must be >= 0, got {self.num_workers}")
        if self.loader == "stream" and self.sampling != "interactions":
            raise ConfigError(
                "train: loader = 'stream' reads each training row once per epoch; sampling = "
                f"{self.sampling!r} draws users at random and needs loader = 'memory'"
            )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How a run is evaluated (``recscale evaluate``)."""

    ks: tuple[int, ...] = (10, 20, 50)
    part: typing.Literal["test", "valid"] = "test"
    batch_users: int = 1024
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.ks:
            raise ConfigError("evaluate: ks must name at least one cut-off")
        for k in self.ks:
            _positive("evaluate", k=k)
        _positive("evaluate", batch_users=self.batch_users)
