"""The training loop: one function, read top to bottom.

:func:`fit` trains any registered model inside a run directory. A one-shot model (popularity,
iALS) is fitted in one call; a :class:`~recscale.models.TorchRecommender` is trained epoch by
epoch on batches from the in-memory loader, validated, checkpointed after every epoch, and stopped
early when validation stops improving. Everything the next epoch depends on is in the checkpoint,
so a run resumed after a crash ends with exactly the model an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from recscale.config import TrainConfig, config_to_dict
from recscale.dataset import Interactions
from recscale.errors import ConfigError, RunError
from recscale.evaluate import evaluate_model
from recscale.models import Recommender, TorchRecommender
from recscale.train.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from recscale.train.schedule import lr_factor

__all__ = ["FitResult", "fit", "resolve_device"]

log = logging.getLogger("recscale.train")

LAST = "last.pt"
BEST = "best.pt"
LOG_EVERY = 20  # steps between progress-bar loss updates (each one syncs with the device)


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What training did: epochs and steps in total, the best validation, why it stopped."""

    epochs: int
    steps: int
    best_metric: float | None
    best_epoch: int | None
    stopped_early: bool
    seconds: float  # wall time of this call (a resumed run counts only its own part)
    metric: str | None  # e.g. "ndcg@20", or None without validation


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when present, else the CPU; an unusable device is a ConfigError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"train: device {device!r} is not a device; expected auto, cpu, cuda or cuda:N"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train: device {device!r} was asked for, but CUDA is not available here "
            "(torch.cuda.is_available() is False); use device = 'cpu' or 'auto'"
        )
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"train: device {device!r} is not supported; expected cpu or cuda")
    return resolved


def fit(
    model: Recommender,
    train: Interactions,
    valid: Interactions | None,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    run_config: dict[str, Any] | None = None,
    items: pa.Table | None = None,
) -> FitResult:
    """Train ``model`` on ``train`` into ``run_dir``; validate on ``valid`` when there is one.

    Writes ``run_dir/checkpoints/{last,best}.pt``, ``metrics.jsonl`` and ``tensorboard/``.
    ``resume=True`` continues from ``checkpoints/last.pt`` when it exists (else starts afresh).
    ``run_config`` is the full resolved config stored in every checkpoint (default: ``[train]``
    and ``[model]``); ``items`` is the dataset's item table, for models with item features. On return the model holds the best validated weights, or the last ones
    when there was no validation.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "checkpoints" / LAST, run_dir / "checkpoints" / BEST
    device = resolve_device(config.device)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    if run_config is None:
        run_config = {"train": config_to_dict(config), "model": config_to_dict(model.params)}

    checkpoint = load_checkpoint(last_path) if resume and last_path.exists() else None
    if checkpoint is not None and checkpoint["model_name"] != model.name:
        raise RunError(
            f"{last_path} holds a {checkpoint['model_name']!r} model, not {model.name!r}"
        )
    counters: dict[str, Any] = {
        "epoch": 0,  # epochs completed
        "step": 0,  # optimizer steps taken
        "best_metric": None,
        "best_epoch": None,
        "bad_validations": 0,  # validations in a row without improvement
        "finished": False,
        "stopped_early": False,
    }
    if checkpoint is not None:
        counters.update(checkpoint["counters"])
        log.info(
            "resuming %s from epoch %d (step %d)", run_dir, counters["epoch"], counters["step"]
        )

    # metrics of epochs after the checkpoint were written by the crashed run; they are redone
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, counters["epoch"] if checkpoint else 0)
    # TensorBoard drops the events a crashed run logged after its last checkpoint (purge_step)
    with SummaryWriter(
        str(run_dir / "tensorboard"), purge_step=counters["step"] if checkpoint else None
    ) as writer:
        # validation: NDCG@k on the valid part, the user's training items excluded; a fixed sample
        # of users (same every epoch, so epochs compare) when validate_users asks for one
        metric = f"ndcg@{config.validate_k}" if valid is not None else None
        valid_users = None
        if valid is not None and config.validate_users:
            all_users = np.unique(valid.user_idx)
            if config.validate_users < len(all_users):
                rng = np.random.default_rng(config.seed)
                valid_users = np.sort(rng.choice(all_users, config.validate_users, replace=False))

        def validate(target: Interactions, row: dict[str, Any]) -> float:
            """Adds ``valid_ndcg@k`` and ``valid_recall@k`` to ``row``; returns the NDCG."""
            result = evaluate_model(
                model,
                target,
                exclude=train,
                ks=(config.validate_k,),
                device=device,
                users=valid_users,
            )
            for name in ("ndcg", "recall"):
                row[f"valid_{name}@{config.validate_k}"] = float(
                    result[f"{name}@{config.validate_k}"]
                )
            return row[f"valid_ndcg@{config.validate_k}"]

        def write_metrics(row: dict[str, Any]) -> None:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    writer.add_scalar(key.replace("_", "/", 1), value, row["step"])
            writer.flush()

        def make_checkpoint(**extra: Any) -> dict[str, Any]:
            return {
                "model_name": model.name,
                "model": model.state_dict(),
                "counters": dict(counters),
                "config": run_config,
                **extra,
            }

        # ---- one-shot models: fit once, validate once, save ----
        if not isinstance(model, TorchRecommender):
            model.to(device)
            if checkpoint is not None and checkpoint["counters"]["finished"]:
                model.load_state_dict(checkpoint["model"])
                return _result(counters, metric, started)
            model.prepare(train, items)
            t0 = time.perf_counter()
            model.fit(train, progress=config.progress)
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {"epoch": 1, "step": 1, "train_seconds": round(seconds, 3)}
            if valid is not None:
                counters["best_metric"] = validate(valid, row)
                counters["best_epoch"] = 1
            counters.update(epoch=1, step=1, finished=True)
            write_metrics(row)
            save_checkpoint(last_path, make_checkpoint())
            return _result(counters, metric, started)

        # ---- PyTorch models: epochs of batches ----
        # prepared before moving, so what it builds (graphs, histories) moves with the model
        model.prepare(train, items)
        model.to(device)
        optimizer = model.make_optimizer()
        # the schedule scales the lr the model asked for; taken before a checkpoint's state
        # overwrites param_groups with the lr of its last step
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        loader = model.make_loader(train, config)
        total_steps = config.epochs * len(loader)
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            loader.load_state_dict(checkpoint["loader"])
            set_rng_state(checkpoint["rng"])
        else:
            # the loader has its own seeded generators; these cover anything a model draws itself
            random.seed(config.seed)
            np.random.seed(config.seed)
            torch.manual_seed(config.seed)

        early_stopping = valid is not None and config.patience > 0
        if valid is None:
            log.warning(
                "split has no valid part: training the fixed %d epochs; early stopping is off",
                config.epochs,
            )
        elif not early_stopping:
            log.info("patience = 0: early stopping is off; the best validated epoch is kept")

        while counters["epoch"] < config.epochs and not counters["finished"]:
            epoch = counters["epoch"]
            model.train()
            bar = tqdm(
                total=loader.rows_per_epoch,
                initial=min(loader.batch * config.batch_size, loader.rows_per_epoch),
                unit="samples",
                unit_scale=True,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                disable=not config.progress,
                leave=False,
            )
            t0 = time.perf_counter()
            # the loss is summed on the device: reading it every step would sync every step
            loss_sum = torch.zeros((), device=device)
            n_batches = samples = 0
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                factor = lr_factor(config.lr_schedule, counters["step"], total_steps)
                for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base_lr * factor
                loss = model.batch_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                n_batches += 1
                samples += len(batch["users"])
                counters["step"] += 1
                bar.update(len(batch["users"]))
                if counters["step"] % LOG_EVERY == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            train_loss = loss_sum.item() / max(n_batches, 1)  # .item() waits for the device
            seconds = time.perf_counter() - t0
            bar.close()
            if not math.isfinite(train_loss):
                raise RunError(
                    f"training diverged at epoch {epoch + 1}: loss is {train_loss}; "
                    "lower the model's lr (the [model] table) and start a new run"
                )

            counters["epoch"] = epoch + 1
            row = {
                "epoch": epoch + 1,
                "step": counters["step"],
                "train_loss": train_loss,
                "train_lr": optimizer.param_groups[0]["lr"],
                "train_samples_per_s": round(samples / seconds, 1) if seconds > 0 else None,
                "train_seconds": round(seconds, 3),
            }
            improved = False
            last_epoch = counters["epoch"] == config.epochs
            if valid is not None and (counters["epoch"] % config.validate_every == 0 or last_epoch):
                model.eval()
                value = validate(valid, row)
                best = counters["best_metric"]
                # NaN (no user to validate) never counts as an improvement
                improved = math.isfinite(value) and (best is None or value > best)
                if improved:
                    counters.update(
                        best_metric=value, best_epoch=counters["epoch"], bad_validations=0
                    )
                else:
                    counters["bad_validations"] += 1
                if early_stopping and counters["bad_validations"] >= config.patience:
                    log.info(
                        "early stop after epoch %d: %s has not improved for %d validations "
                        "(best %.5f at epoch %d)",
                        counters["epoch"],
                        metric,
                        config.patience,
                        counters["best_metric"],
                        counters["best_epoch"],
                    )
                    counters.update(finished=True, stopped_early=True)
            counters["finished"] = counters["finished"] or last_epoch
            log.info(
                "epoch %d: loss %.5f, %.0f samples/s%s",
                counters["epoch"],
                train_loss,
                row["train_samples_per_s"] or 0.0,
                f", valid {metric} {row[f'valid_{metric}']:.5f}"
                if f"valid_{metric}" in row
                else "",
            )
            # metrics first, then the checkpoint: a crash between the two only loses lines that the
            # resumed run truncates and writes again
            write_metrics(row)
            state = make_checkpoint(
                optimizer=optimizer.state_dict(),
                scheduler=None,
                loader=loader.state_dict(),
                rng=get_rng_state(),
            )
            if improved:
                save_checkpoint(best_path, state)
            save_checkpoint(last_path, state)

    # what the run delivers is the best validated model, not whichever epoch came last
    if counters["best_epoch"] is not None and best_path.exists():
        model.load_state_dict(load_checkpoint(best_path)["model"])
    model.eval()
    return _result(counters, metric, started)


def _result(counters: dict[str, Any], metric: str | None, started: float) -> FitResult:
    return FitResult(
        epochs=counters["epoch"],
        steps=counters["step"],
        best_metric=counters["best_metric"],
        best_epoch=counters["best_epoch"],
        stopped_early=bool(counters["stopped_early"]),
        seconds=time.perf_counter() - started,
        metric=metric,
    )


def _truncate_metrics(path: Path, keep_epochs: int) -> None:
    """Keep only the lines of epochs up to ``keep_epochs`` (rewritten atomically)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("epoch", 0) <= keep_epochs
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
