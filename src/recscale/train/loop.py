"""The training loop: one function, read top to bottom.

:func:`fit` trains any registered model inside a run directory. A one-shot model (popularity,
iALS) is fitted in one call; a :class:`~recscale.models.TorchRecommender` is trained epoch by
epoch on batches from the in-memory loader, validated, checkpointed after every epoch, and stopped
early when validation stops improving. Everything the next epoch depends on is in the checkpoint,
so a run resumed after a crash ends with exactly the model an uninterrupted run would have.

Under torchrun the same function runs in every process (:mod:`recscale.train.distributed`):
each rank trains a replica on its share of every global batch, DDP averages the gradients, and
rank 0 alone validates and writes.
"""

from __future__ import annotations

import contextlib
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
from recscale.loader import World
from recscale.models import Recommender, TorchRecommender
from recscale.models.base import rank_batch_size
from recscale.train import distributed
from recscale.train.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from recscale.train.schedule import lr_factor

__all__ = ["FitResult", "check_world", "fit", "resolve_device"]

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
    train_files: str | Path | None = None,
) -> FitResult:
    """Train ``model`` on ``train`` into ``run_dir``; validate on ``valid`` when there is one.

    Writes ``run_dir/checkpoints/{last,best}.pt``, ``metrics.jsonl`` and ``tensorboard/``.
    ``resume=True`` continues from ``checkpoints/last.pt`` when it exists (else starts afresh).
    ``run_config`` is the full resolved config stored in every checkpoint (default: ``[train]``
    and ``[model]``); ``items`` is the dataset's item table, for models with item features;
    ``train_files`` is the train part's Parquet directory, which ``loader = "stream"`` reads. On
    return the model holds the best validated weights, or the last ones when there was no
    validation.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) every process calls ``fit`` with the
    same arguments and trains one data-parallel replica; ``config.batch_size`` is the global
    batch, so the steps are those of one process with the same batch. Rank 0 alone writes
    ``run_dir`` and validates; every rank returns the same model.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "checkpoints" / LAST, run_dir / "checkpoints" / BEST
    device = distributed.rank_device(resolve_device(config.device))
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    if run_config is None:
        run_config = {"train": config_to_dict(config), "model": config_to_dict(model.params)}

    with contextlib.ExitStack() as stack:
        world = stack.enter_context(distributed.process_group(device))
        # rank 0 alone writes the run directory and shows progress: the other ranks compute the
        # same model, and two writers would interleave lines and race on every file
        main = world.rank == 0
        check_world(type(model), config, world, model.params)

        # every rank resumes from the same checkpoint, as rank 0 sees it
        checkpoint = None
        if distributed.broadcast(resume and last_path.exists()):
            checkpoint = load_checkpoint(last_path)
        if checkpoint is not None and checkpoint["model_name"] != model.name:
            raise RunError(
                f"{last_path} holds a {checkpoint['model_name']!r} model, not {model.name!r}"
            )
        trained_by = (checkpoint or {}).get("loader", {}).get("world_size", world.world_size)
        if trained_by != world.world_size:
            raise RunError(
                f"{last_path} was written by a run of {trained_by} processes; resume it with "
                f"the same number (now {world.world_size}), so that its batches and steps "
                "continue as they were"
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
            if main:
                log.info(
                    "resuming %s from epoch %d (step %d)",
                    run_dir,
                    counters["epoch"],
                    counters["step"],
                )

        metrics_path = run_dir / "metrics.jsonl"
        writer = None
        if main:
            # metrics of epochs after the checkpoint were written by the crashed run; they are
            # redone. TensorBoard drops the events it logged after its last checkpoint too
            _truncate_metrics(metrics_path, counters["epoch"] if checkpoint else 0)
            writer = stack.enter_context(
                SummaryWriter(
                    str(run_dir / "tensorboard"),
                    purge_step=counters["step"] if checkpoint else None,
                )
            )

        # validation: NDCG@k on the valid part, the user's training items excluded; a fixed sample
        # of users (same every epoch, so epochs compare) when validate_users asks for one
        metric = f"ndcg@{config.validate_k}" if valid is not None else None
        valid_users = None
        if valid is not None and config.validate_users:
            all_users = np.unique(valid.user_idx)
            if config.validate_users < len(all_users):
                rng = np.random.default_rng(config.seed)
                valid_users = np.sort(rng.choice(all_users, config.validate_users, replace=False))

        def validate(target: Interactions) -> dict[str, float]:
            """``valid_ndcg@k`` and ``valid_recall@k`` of the model on ``target``."""
            result = evaluate_model(
                model,
                target,
                exclude=train,
                ks=(config.validate_k,),
                device=device,
                users=valid_users,
            )
            k = config.validate_k
            return {
                f"valid_{name}@{k}": float(result[f"{name}@{k}"]) for name in ("ndcg", "recall")
            }

        def write_metrics(row: dict[str, Any]) -> None:
            assert writer is not None  # only rank 0 writes
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
                row.update(validate(valid))
                counters["best_metric"] = row[f"valid_{metric}"]
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
        # this rank's share of every epoch, batch_size / world_size rows per step: the ranks'
        # batch b together are the global batch b of one process
        loader = model.make_loader(train, config, world=world, source=train_files)
        total_steps = config.epochs * len(loader)
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            loader.load_state_dict(checkpoint["loader"])
            set_rng_state(checkpoint.get("rank_rngs", [checkpoint["rng"]])[world.rank])
        else:
            # the loader has its own seeded generators; these cover anything a model draws itself
            # (dropout masks, in-model negatives), which is per row, so each rank draws its own.
            # The initial weights come from the model's own seeded generator, equal on every rank
            random.seed(config.seed + world.rank)
            np.random.seed(config.seed + world.rank)
            torch.manual_seed(config.seed + world.rank)
        # under torchrun, DDP: backward all-reduces the gradients, so every rank steps the same
        batch_loss = distributed.data_parallel(model, device)

        early_stopping = valid is not None and config.patience > 0
        if valid is None and main:
            log.warning(
                "split has no valid part: training the fixed %d epochs; early stopping is off",
                config.epochs,
            )
        elif not early_stopping and main:
            log.info("patience = 0: early stopping is off; the best validated epoch is kept")

        while counters["epoch"] < config.epochs and not counters["finished"]:
            epoch = counters["epoch"]
            model.train()
            # the bar counts the samples of all ranks; only rank 0 shows it
            epoch_rows = loader.rows_per_epoch * world.world_size
            bar = tqdm(
                total=epoch_rows,
                initial=min(loader.batch * config.batch_size, epoch_rows),
                unit="samples",
                unit_scale=True,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                disable=not (config.progress and main),
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
                loss = batch_loss(batch)  # the mean over this rank's rows
                optimizer.zero_grad(set_to_none=True)
                # under DDP the gradients are averaged over the ranks while backward runs (bucket
                # by bucket, overlapping the rest of backward): the step below is the same on all
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                n_batches += 1
                samples += len(batch["users"])
                counters["step"] += 1
                bar.update(len(batch["users"]) * world.world_size)
                if counters["step"] % LOG_EVERY == 0 and main:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            # one all-reduce per epoch: the logged loss is the mean over every rank's batches,
            # which is the single-process mean when the ranks' batches are equal shares
            totals = distributed.all_sum(torch.stack([loss_sum, loss_sum.new_tensor(samples)]))
            train_loss = totals[0].item() / max(n_batches * world.world_size, 1)
            samples = int(totals[1].item())
            seconds = time.perf_counter() - t0
            bar.close()
            if not math.isfinite(train_loss):  # the same on every rank: all of them stop
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
                # rank 0 validates alone and hands its numbers to every rank, so the decisions
                # below (best epoch, early stop) are taken from the same value everywhere and
                # all ranks stop together
                row.update(distributed.on_rank0(lambda: validate(valid)))
                value = row[f"valid_{metric}"]
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
                    if main:
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
            # each rank's generators have drawn differently: rank 0 keeps all of them, so that a
            # resumed rank continues its own streams
            rngs = distributed.gather(get_rng_state())
            if not main:
                continue
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
            assert rngs is not None
            state = make_checkpoint(
                optimizer=optimizer.state_dict(),
                scheduler=None,
                loader=loader.state_dict(),
                rng=rngs[0],
                **({"rank_rngs": rngs} if world.world_size > 1 else {}),
            )
            if improved:
                save_checkpoint(best_path, state)
            save_checkpoint(last_path, state)

        # what the run delivers is the best validated model, not whichever epoch came last
        if counters["best_epoch"] is not None:
            if main and best_path.exists():
                model.load_state_dict(load_checkpoint(best_path)["model"])
            # the other ranks take rank 0's copy: the run directory may not be on their machine
            distributed.broadcast_state(model)
        model.eval()
        return _result(counters, metric, started)


def check_world(
    model_class: type[Recommender], config: TrainConfig, world: World, params: Any = None
) -> None:
    """What training by ``world.world_size`` processes needs: a batched model, equal shares.

    One-shot models (popularity, iALS, EASE, ...) are a ConfigError rather than fitted by rank 0
    alone: the other processes would only wait, and the user asked for something else. So are
    sparse gradients (``params.sparse``): DDP all-reduces dense gradient buckets.
    """
    if world.world_size == 1:
        return
    if not issubclass(model_class, TorchRecommender):
        raise ConfigError(
            f"train: model {model_class.name!r} is fitted in one call by one process and has no batches "
            f"to share between {world.world_size} processes; train it without torchrun or --spark"
        )
    if getattr(params, "sparse", False):
        raise ConfigError(
            f"train: model {model_class.name!r} with sparse = true trains in one process; "
            f"DDP across {world.world_size} processes all-reduces dense gradients: set "
            "sparse = false"
        )
    rank_batch_size(config.batch_size, world)


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
