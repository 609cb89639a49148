"""Training launched by Spark: ``recscale train --spark N`` through TorchDistributor.

``pyspark.ml.torch.distributor.TorchDistributor`` starts ``torchrun`` with ``N`` processes, on
the driver (``local_mode``, when Spark's master is ``local[...]``) or as a barrier job of ``N``
tasks on the cluster's executors. Each process runs :func:`recscale.train.train` with the same
arguments and finds its rank in torchrun's environment, so what is trained is exactly what
``torchrun --nproc-per-node N -m recscale train ...`` trains. pyspark is imported only here, on
use: ``import recscale`` works without it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recscale.config import TrainConfig, config_from_dict, config_to_dict
from recscale.errors import BackendUnavailableError, ConfigError, RecscaleError, RunError
from recscale.loader import World
from recscale.models import get_model_class, model_params
from recscale.train import distributed
from recscale.train.loop import check_world, resolve_device

__all__ = ["train_with_spark"]

log = logging.getLogger("recscale.train")


def train_with_spark(
    dataset: str | Path,
    config: TrainConfig,
    model_params_table: Mapping[str, Any] | None = None,
    *,
    num_processes: int,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> Path:
    """Train as :func:`~recscale.train.train` does, in ``num_processes`` ranks started by Spark.

    The active Spark session is used; without one, a ``local[num_processes]`` session is started
    (and stopped at the end), unless the process was started by ``spark-submit``, whose master
    and configuration are then taken. The ranks train on GPUs, one each, when ``config.device``
    resolves to CUDA on this machine (local mode), or on a cluster when it is ``cuda``, or
    ``auto`` with GPUs scheduled to Spark's tasks (``spark.task.resource.gpu.amount``).
    Returns the run directory. On a cluster, ``dataset`` and ``run_dir`` must be paths every
    executor sees (a shared filesystem).
    """
    if distributed.launched_by_torchrun():
        raise ConfigError(
            "train: --spark starts its own training processes, but this process is already one "
            "rank of a torchrun launch (RANK/WORLD_SIZE are set); use either torchrun or --spark"
        )
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigError(f"train: --spark needs a number of processes >= 1, got {num_processes!r}")
    try:
        from pyspark.ml.torch.distributor import TorchDistributor
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise BackendUnavailableError(
            f"train: --spark needs pyspark, which is not importable ({exc}); "
            "install it with pip install 'recscale[spark]'"
        ) from None

    # bad input is refused here, before Spark and torchrun start
    params = model_params(config.model, model_params_table)
    check_world(get_model_class(config.model), config, World(0, num_processes), params)

    spark = SparkSession.getActiveSession()
    started = spark is None
    if spark is None:
        builder = SparkSession.builder.appName("recscale train")
        # spark-submit hands its master and conf to the Python driver through a running JVM
        # (PYSPARK_GATEWAY_PORT); started from the shell, training runs on this machine
        if "PYSPARK_GATEWAY_PORT" not in os.environ:
            builder = builder.master(f"local[{num_processes}]")
            if resolve_device(config.device).type == "cuda":
                builder = _with_driver_gpus(builder, num_processes)
        spark = builder.getOrCreate()
    try:
        local = spark.sparkContext.master.startswith("local")
        use_gpu = _use_gpu(config.device, spark, local=local)
        log.info(
            "TorchDistributor: %d processes, %s, %s",
            num_processes,
            "on this machine" if local else f"on the executors of {spark.sparkContext.master}",
            "GPUs" if use_gpu else "CPUs",
        )
        distributor = TorchDistributor(
            num_processes=num_processes, local_mode=local, use_gpu=use_gpu
        )
        try:
            path = distributor.run(
                _train_rank,
                str(dataset),
                config_to_dict(config),
                config_to_dict(params),
                None if run_dir is None else str(run_dir),
                resume,
            )
        except RuntimeError as exc:
            # TorchDistributor reports a failed rank as a RuntimeError with the output's tail,
            # where the rank's own error (e.g. RunError: ...) is printed
            raise RunError(f"training under TorchDistributor failed: {exc}") from None
    finally:
        if started:
            spark.stop()
    return Path(path)


def _use_gpu(device: str, spark: Any, *, local: bool) -> bool:
    """Whether the ranks train on GPUs: TorchDistributor then gives each rank its own."""
    if local:  # the ranks run on this machine: its CUDA decides, as for one process
        return resolve_device(device).type == "cuda"
    if device == "auto":
        # the executors train, not this driver: GPUs when Spark schedules some to every task
        return float(spark.conf.get("spark.task.resource.gpu.amount", "0")) > 0
    return device.startswith("cuda")


def _with_driver_gpus(builder: Any, num_processes: int) -> Any:
    """A local session that owns this machine's GPUs, which local TorchDistributor hands out.

    Spark learns a driver's GPUs from a discovery script that prints their addresses.
    """
    import torch

    count = torch.cuda.device_count()
    if count < num_processes:
        raise ConfigError(
            f"train: --spark {num_processes} on CUDA needs one GPU per process, and this machine "
            f"has {count}; use --spark {count} or --device cpu"
        )
    script = Path(tempfile.mkdtemp(prefix="recscale-gpus-")) / "gpus.sh"
    addresses = ", ".join(f'"{i}"' for i in range(count))
    script.write_text(f'#!/bin/sh\necho \'{{"name": "gpu", "addresses": [{addresses}]}}\'\n')
    script.chmod(0o755)
    return builder.config("spark.driver.resource.gpu.amount", str(count)).config(
        "spark.driver.resource.gpu.discoveryScript", str(script)
    )


def _train_rank(
    dataset: str,
    config: dict[str, Any],
    params: dict[str, Any],
    run_dir: str | None,
    resume: bool,
) -> str:
    """What each TorchDistributor process runs (imported by name there, so module-level)."""
    from recscale.train.run import train

    try:
        run = train(
            dataset,
            config_from_dict(TrainConfig, config, where="[train]"),
            params,
            run_dir=run_dir,
            resume=resume,
        )
    except RecscaleError as exc:
        # one line, as the CLI prints it, above torchrun's own report of the failed rank
        print(f"{type(exc).__name__}: {exc}", flush=True)
        raise
    return str(run.path)
