"""Run directories: train a model into ``runs/<name>/``, reopen it, evaluate it, recommend.

::

    runs/<name>/
      config.toml        the full resolved config: [train], [model] (every hyper-parameter), [data]
      checkpoints/       last.pt (every epoch), best.pt (best validation), atomic writes
      metrics.jsonl      one JSON object per epoch
      tensorboard/       the same scalars for TensorBoard
      embeddings/        users.parquet, items.parquet (idx, vector) for embedding models
      eval.json          the metrics of the last Run.evaluate

Everything needed to rebuild the model is in the directory (config.toml + a checkpoint) and the
dataset it names, so :meth:`Run.open` needs nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recscale.config import (
    EvalConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_toml,
    write_toml,
)
from recscale.dataset import Dataset, Interactions, Split, atomic_directory, open_dataset
from recscale.errors import ConfigError, DatasetError, ModelError, RunError
from recscale.evaluate import evaluate_model, top_k
from recscale.models import Recommender, create_model
from recscale.models import model_params as resolve_params
from recscale.train import distributed
from recscale.train.checkpoint import load_checkpoint
from recscale.train.loop import BEST, LAST, FitResult, check_world, fit, resolve_device

__all__ = ["Run", "default_run_dir", "train", "write_embeddings"]

log = logging.getLogger("recscale.train")

CONFIG_FILE = "config.toml"
# keys that change how a run executes, never what it computes: a resume may change them
OPERATIONAL_KEYS = frozenset({"train.progress", "train.device", "train.num_threads"})


def default_run_dir(dataset: str | Path, model: str) -> Path:
    """``runs/<dataset directory name>-<model>``, relative to the working directory."""
    return Path("runs") / f"{Path(dataset).resolve().name}-{model}"


def train(
    dataset: str | Path,
    config: TrainConfig,
    model_params: Mapping[str, Any] | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> Run:
    """Train ``config.model`` on the dataset's split ``config.split`` into a run directory.

    ``model_params`` is the ``[model]`` table (defaults for what it leaves out). A new run never
    overwrites an existing one: pass ``resume=True`` to continue a run from its last checkpoint,
    which requires the same config (except progress, device and num_threads).

    Under ``torchrun`` every process calls this with the same arguments: the run is trained by
    data-parallel ranks (see :func:`~recscale.train.fit`) and rank 0 alone writes the run
    directory. Every rank returns the same trained model.
    """
    ds = open_dataset(dataset)
    split = ds.split(config.split)
    params = resolve_params(config.model, model_params)
    device = distributed.rank_device(resolve_device(config.device))
    # under torchrun every rank runs this function; the group is joined here so that rank 0 alone
    # prepares the run directory and writes the embeddings (fit joins the same group)
    with distributed.process_group(device) as world:
        main = world.rank == 0
        given = set(model_params or {}) if isinstance(model_params, Mapping) else set(vars(params))
        defaulted = [f"{k}={v!r}" for k, v in vars(params).items() if k not in given]
        if defaulted and main:
            log.info(
                "[model] %s: not given, so the defaults: %s", config.model, ", ".join(defaulted)
            )
        if run_dir is None:
            run_dir = default_run_dir(ds.path, config.model)
            if main:
                log.info("no run directory given: using %s", run_dir)
        run_dir = Path(run_dir)
        resolved = {
            "train": config_to_dict(config),
            "model": config_to_dict(params),
            "data": {"dataset": str(ds.path.resolve()), "split": split.name},
        }
        model = create_model(config.model, params, ds.n_users, ds.n_items, seed=config.seed)
        # bad input is refused before anything is written
        check_world(type(model), config, world, params)
        # rank 0 checks and writes; its error, if any, stops every rank with the same message
        distributed.on_rank0(lambda: _prepare_run_dir(run_dir, resolved, resume=resume))

        train_part = split.interactions("train")
        valid_part = split.interactions("valid") if split.has("valid") else None
        result = fit(
            model,
            train_part,
            valid_part,
            config,
            run_dir,
            resume=resume,
            run_config=resolved,
            items=ds.items,
            train_files=split.path / "train",
        )
        if main:
            write_embeddings(run_dir / "embeddings", model)
    return Run(run_dir, ds, split, model, config, fit_result=result)


def _prepare_run_dir(run_dir: Path, resolved: dict[str, Any], *, resume: bool) -> None:
    """Create ``run_dir`` with ``config.toml``; a resumed run must have asked for the same config."""
    config_path = run_dir / CONFIG_FILE
    if config_path.exists():
        if not resume:
            raise RunError(
                f"run directory {run_dir} already holds a run; pass resume=True (--resume) to "
                "continue it, or choose another run directory (--run-dir)"
            )
        stored = _read_config(run_dir)
        differ = _differences(_flatten(stored), _flatten(resolved))
        if differ:
            raise RunError(
                f"cannot resume {run_dir}: the requested config differs from its {CONFIG_FILE} in "
                + "; ".join(f"{key} (run has {a!r}, requested {b!r})" for key, a, b in differ)
                + ". Resume with the run's config or train into another run directory"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunError(
            f"{run_dir} exists, is not empty and holds no {CONFIG_FILE}: not a run directory; "
            "choose another run directory"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, resolved)


def write_embeddings(directory: str | Path, model: Recommender) -> bool:
    """``users.parquet`` and ``items.parquet`` (idx int32, vector fixed_size_list<float32>).

    Written only for models whose scores are inner products of the vectors; returns whether it
    wrote them. Each file's schema metadata names the model (``recscale.model``) and how it
    compares vectors (``recscale.similarity``: dot or cosine). The directory is replaced as a
    whole, so readers never see half of it.
    """
    vectors = model.export_embeddings()
    if vectors is None:
        return False
    with atomic_directory(directory) as tmp:
        for name, matrix in zip(("users", "items"), vectors, strict=True):
            matrix = np.ascontiguousarray(matrix, dtype=np.float32)
            table = pa.table(
                {
                    "idx": pa.array(np.arange(len(matrix), dtype=np.int32)),
                    "vector": pa.FixedSizeListArray.from_arrays(
                        pa.array(matrix.reshape(-1)), matrix.shape[1]
                    ),
                }
            ).replace_schema_metadata(
                {"recscale.model": model.name, "recscale.similarity": model.similarity}
            )
            pq.write_table(table, tmp / f"{name}.parquet")
    return True


class Run:
    """A trained model in its run directory, with the dataset and split it was trained on."""

    def __init__(
        self,
        path: str | Path,
        dataset: Dataset,
        split: Split,
        model: Recommender,
        config: TrainConfig,
        *,
        fit_result: FitResult | None = None,
    ) -> None:
        self.path = Path(path)
        self.dataset = dataset
        self.split = split
        self.model = model
        self.config = config
        self.fit_result = fit_result  # None for a run opened from disk
        self._observed_all = False  # whether the model has observed train and valid

    @classmethod
    def open(cls, run_dir: str | Path) -> Run:
        """Rebuild a run from ``config.toml`` and its best checkpoint (else its last one)."""
        path = Path(run_dir)
        if not path.is_dir():
            raise RunError(
                f"run directory {str(path)!r} does not exist; create it with `recscale train`"
            )
        tables = _read_config(path)
        try:
            config = config_from_dict(
                TrainConfig, tables.get("train", {}), where=f"{path / CONFIG_FILE} [train]"
            )
            data = tables["data"]
            dataset_path, split_name = data["dataset"], data["split"]
        except (ConfigError, KeyError, TypeError) as exc:
            raise RunError(f"{path / CONFIG_FILE}: unusable run config: {exc}") from None
        try:
            dataset = open_dataset(dataset_path)
            split = dataset.split(split_name)
        except DatasetError as exc:
            raise RunError(
                f"run {path} was trained on {dataset_path} (split {split_name!r}), "
                f"which cannot be opened: {exc}"
            ) from None
        checkpoints = path / "checkpoints"
        ckpt_path = checkpoints / BEST if (checkpoints / BEST).exists() else checkpoints / LAST
        if not ckpt_path.exists():
            raise RunError(
                f"run {path} has no checkpoint (checkpoints/{BEST} or {LAST}): training did not "
                "finish an epoch; continue it with `recscale train ... --resume`"
            )
        checkpoint = load_checkpoint(ckpt_path)
        try:
            model = create_model(
                config.model,
                tables.get("model", {}),
                dataset.n_users,
                dataset.n_items,
                seed=config.seed,
            )
            model.load_state_dict(checkpoint["model"])
        except (ConfigError, ModelError, RuntimeError, KeyError) as exc:
            raise RunError(
                f"{ckpt_path}: cannot rebuild the {config.model!r} model: {exc}"
            ) from None
        if hasattr(model, "eval"):
            model.eval()
        return cls(path, dataset, split, model, config)

    def evaluate(self, config: EvalConfig | None = None) -> dict[str, float]:
        """Full-ranking metrics on the split's ``config.part``; writes them to ``eval.json``.

        The user's training items are excluded from its ranking, and so are its validation items
        when the test part is evaluated: the model may not score points for what it was shown.
        """
        config = config or EvalConfig()
        device = resolve_device(config.device)
        self.model.to(device)
        target = self.split.interactions(config.part)
        exclude = [self.split.interactions("train")]
        if config.part == "test" and self.split.has("valid"):
            exclude.append(self.split.interactions("valid"))
        # what the user had done before the evaluated part: history-based models encode it
        self.model.observe(Interactions.concat(*exclude))
        self._observed_all = config.part == "test" or not self.split.has("valid")
        metrics = evaluate_model(
            self.model,
            target,
            exclude,
            ks=config.ks,
            batch_users=config.batch_users,
            device=device,
        )
        # flat: the metrics as evaluate_model names them (NaN, for no user, as null), and the
        # part they were measured on
        report = {
            "part": config.part,
            **{k: (None if math.isnan(v) else v) for k, v in metrics.items()},
        }
        tmp = self.path / ".eval.json.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, self.path / "eval.json")
        return metrics

    def _observe_everything(self) -> None:
        """Show the model every part it was allowed to see (train, valid) once."""
        if not self._observed_all:
            parts = [self.split.interactions("train")]
            if self.split.has("valid"):
                parts.append(self.split.interactions("valid"))
            self.model.observe(Interactions.concat(*parts))
            self._observed_all = True

    @cached_property
    def _seen(self) -> Any:
        """users × items CSR of what each user has been shown: train and valid parts."""
        return self.split.seen()

    def recommend(self, user_id: str, k: int = 10, *, exclude_seen: bool = True) -> list[dict]:
        """The top ``k`` items for an original user id.

        Each is ``{"item_id", "item_idx", "title", "score", "rank"}``, best first, rank from 1.

        ``exclude_seen`` leaves out the user's train (and valid) items. An unknown user id is an
        :class:`~recscale.errors.UnknownIdError`.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"recommend: k must be an integer >= 1, got {k!r}")
        user = self.dataset.user_index(user_id)
        self._observe_everything()
        scores = self.model.score(np.array([user], dtype=np.int64)).float().cpu()
        if exclude_seen:
            seen = self._seen
            scores[0, seen.indices[seen.indptr[user] : seen.indptr[user + 1]]] = -torch.inf
        available = int(torch.isfinite(scores[0]).sum()) if exclude_seen else scores.shape[1]
        if available == 0:
            return []
        values, indices = top_k(scores, min(k, available))
        items = indices[0].numpy()
        ids = self.dataset.item_ids(items)
        titles = self.dataset.item_titles(items)
        return [
            {"item_id": item_id, "item_idx": idx, "title": title, "score": score, "rank": rank}
            for rank, (item_id, idx, title, score) in enumerate(
                zip(ids, items.tolist(), titles, values[0].tolist(), strict=True), start=1
            )
        ]

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, model={self.model.name!r}, dataset={str(self.dataset.path)!r})"


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise RunError(f"{run_dir} is not a run directory: it has no {CONFIG_FILE}")
    try:
        return load_toml(path)
    except ConfigError as exc:
        raise RunError(f"{path} is corrupt: {exc}") from None


def _write_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    write_toml(tmp, resolved)
    os.replace(tmp, run_dir / CONFIG_FILE)


def _flatten(tables: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tables.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    keys = sorted((set(stored) | set(requested)) - OPERATIONAL_KEYS)
    return [
        (key, stored.get(key), requested.get(key))
        for key in keys
        if stored.get(key) != requested.get(key)
    ]
