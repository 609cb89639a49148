"""Data-parallel training started the way users start it: ``torchrun -m recscale train``.

Each comparison trains the same config twice, once in one process and once in two torchrun
processes with the same global batch, and compares the per-epoch train loss of metrics.jsonl and
the final metrics. The two set-ups see the same positives in every step (the loaders deal each
epoch's rows round-robin, so the ranks' batch b together are the single process's batch b):

- SASRec with the full softmax and no dropout draws nothing at random while training, so two
  ranks compute the single process's steps up to float rounding (the all-reduce adds the ranks'
  halves of each gradient in another order): a tight tolerance.
- MF-BPR draws its negatives per rank, so the two runs see different negatives and agree only
  statistically; the tolerance comes from the spread measured between such runs, and it sits
  well below what a wrong global batch changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from recscale.cli import main
from recscale.config import EvalConfig, TrainConfig
from recscale.dataset import Interactions
from recscale.errors import ConfigError
from recscale.loader import World
from recscale.models import EASE, MFBPR
from recscale.testing import write_tiny_dataset
from recscale.train import Run
from recscale.train.distributed import rank_device
from recscale.train.loop import check_world

N_USERS, N_ITEMS, HISTORY = 1000, 200, 14  # 12 train items per user, then one valid, one test
EPOCHS = 4

# mf-bpr: 12,000 train rows in 20 global batches of 600, each rank taking 300 of them
MF = [
    "--model=mf-bpr",
    "--batch-size=600",
    "--param=dim=16",
    "--param=n_negatives=4",
    "--param=lr=0.01",
]
# sasrec: one row per user, every one of the 8 positions a real one (12 train items per user), so
# each rank's loss is a mean over the same number of cells and the ranks' mean gradient is the
# single process's; nothing drawn at random: the full softmax, no dropout, no length buckets
SASREC = [
    "--model=sasrec",
    "--batch-size=100",
    "--param=loss='softmax'",
    "--param=dropout=0.0",
    "--param=bucket_batches=0",
    "--param=max_len=8",
    "--param=dim=16",
    "--param=n_layers=1",
]

# SASRec, measured: per-epoch train loss within 3e-7 (relative) and metrics within 1e-6 between
# one and two processes: float rounding. 1e-5 leaves room for other BLAS builds, and is five
# orders of magnitude below what one changed step (a wrong batch) moves.
EXACT_LOSS_RTOL = 1e-5
EXACT_METRIC_ATOL = 1e-4
# MF-BPR, measured on this data: per-epoch train loss within 4e-4 (relative) between one and two
# processes (same rows, different negatives) and NDCG/recall within 0.006. Training the two
# processes with their batch_size taken per rank instead (a global batch of 1,200) moves every
# epoch's loss by 0.7% to 1.8%, which the loss tolerance of 2e-3 catches.
MF_LOSS_RTOL = 2e-3
MF_METRIC_ATOL = 0.05


def _walk_log() -> dict[str, Interactions]:
    """Each user walks the item ring in steps of 1 or 2: a next item that history predicts."""
    rng = np.random.default_rng(7)
    start = rng.integers(0, N_ITEMS, N_USERS)
    steps = rng.integers(1, 3, (N_USERS, HISTORY))
    steps[:, 0] = 0
    items = (start[:, None] + np.cumsum(steps, axis=1)) % N_ITEMS  # distinct: 13 steps < 200
    users = np.repeat(np.arange(N_USERS), HISTORY).reshape(N_USERS, HISTORY)
    ts = np.broadcast_to(np.arange(HISTORY, dtype=np.int64) * 60, (N_USERS, HISTORY))

    def part(cols: slice) -> Interactions:
        return Interactions(
            users[:, cols].reshape(-1).astype(np.int32),
            items[:, cols].reshape(-1).astype(np.int32),
            ts[:, cols].reshape(-1).copy(),
            np.ones(users[:, cols].size, np.float32),
            N_USERS,
            N_ITEMS,
        )

    return {
        "train": part(slice(0, HISTORY - 2)),
        "valid": part(slice(HISTORY - 2, HISTORY - 1)),
        "test": part(slice(HISTORY - 1, HISTORY)),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "walks", _walk_log())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # one thread per process: two ranks on CI's two cores, and the same sums as one process
    env["OMP_NUM_THREADS"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _command(args: Sequence[str], nproc: int | None) -> list[str]:
    """``python -m recscale train ARGS`` or ``torchrun --standalone ... -m recscale train ARGS``."""
    if nproc is None:
        return [sys.executable, "-m", "recscale", "train", *args]
    torchrun = Path(sys.executable).with_name("torchrun")
    assert torchrun.exists(), f"torchrun is not beside {sys.executable}"
    return [
        str(torchrun),
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "recscale",
        "train",
        *args,
    ]


def _train_args(dataset: Path, args: Sequence[str]) -> list[str]:
    """``train`` arguments into ``./run`` with the test's common flags, then ``args``."""
    common = ["--split=given", f"--epochs={EPOCHS}", "--device=cpu", "--run-dir=run", "--quiet"]
    return [str(dataset), *common, *args]


def _train(
    dataset: Path, cwd: Path, args: Sequence[str], *, nproc: int | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """Train into ``cwd/run`` with the test's common flags; with ``ok`` the process must succeed."""
    cwd.mkdir(parents=True, exist_ok=True)
    command = _command(_train_args(dataset, args), nproc)
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if ok:
        assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines]


def _final(run_dir: Path) -> dict[str, float]:
    """The last epoch's validation and the test metrics of the run as Run.open rebuilds it."""
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    metrics = Run.open(run_dir).evaluate(EvalConfig(ks=(10, 20), device="cpu"))
    return {
        "valid_ndcg@20": last["valid_ndcg@20"],
        "valid_recall@20": last["valid_recall@20"],
        **{f"test_{k}": metrics[k] for k in ("ndcg@10", "ndcg@20", "recall@20")},
    }


def _assert_close(
    one: Path, two: Path, loss_rtol: float, metric_atol: float
) -> tuple[float, float]:
    """Loss curves within ``loss_rtol`` and final metrics within ``metric_atol``; the gaps."""
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == EPOCHS
    loss_gap = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
    assert loss_gap <= loss_rtol, f"train_loss per epoch: one process {a}, two {b}"
    fa, fb = _final(one), _final(two)
    metric_gap = max(abs(fa[k] - fb[k]) for k in fa)
    assert metric_gap <= metric_atol, f"final metrics: one process {fa}, two {fb}"
    print(f"{one} vs {two}: loss gap {loss_gap:.2e} (relative), metric gap {metric_gap:.2e}")
    return loss_gap, metric_gap


@pytest.fixture(scope="module")
def sasrec_runs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SASRec trained alone and by two torchrun ranks: ``{"one": cwd, "two": cwd}``."""
    root = tmp_path_factory.mktemp("sasrec")
    _train(dataset, root / "one", SASREC)
    _train(dataset, root / "two", SASREC, nproc=2)
    return {"one": root / "one", "two": root / "two"}


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_compute_the_steps_of_one_process(sasrec_runs: dict[str, Path]) -> None:
    one, two = sasrec_runs["one"] / "run", sasrec_runs["two"] / "run"
    _assert_close(one, two, EXACT_LOSS_RTOL, EXACT_METRIC_ATOL)
    # the model learnt the walks: far above the 1/200 of a random ranking
    assert _final(two)["test_recall@20"] > 0.3


@pytest.mark.distributed
@pytest.mark.slow
def test_only_rank_0_writes(sasrec_runs: dict[str, Path]) -> None:
    cwd = sasrec_runs["two"]
    # nothing beside the run directory (no default runs/, no stray files of another rank)
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]
    run = cwd / "run"
    written = {p.name for p in run.iterdir()} - {"eval.json"}  # eval.json: the tests' evaluate
    assert sorted(written) == [
        "checkpoints",
        "config.toml",
        "embeddings",
        "metrics.jsonl",
        "tensorboard",
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    # one writer: one event file, one line per epoch (two writers would double them)
    assert len(list((run / "tensorboard").iterdir())) == 1
    assert [
        json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ] == list(range(1, EPOCHS + 1))
    assert sorted(p.name for p in (run / "embeddings").iterdir()) == [
        "items.parquet",
        "users.parquet",
    ]
    # rank 0 kept every rank's generator state, for an exact resume of each
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert len(last["rank_rngs"]) == 2 and last["loader"]["world_size"] == 2


@pytest.mark.distributed
@pytest.mark.slow
def test_mf_bpr_two_ranks_match_one_process(dataset: Path, tmp_path: Path) -> None:
    _train(dataset, tmp_path / "one", MF)
    _train(dataset, tmp_path / "two", MF, nproc=2)
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    _assert_close(one, two, MF_LOSS_RTOL, MF_METRIC_ATOL)
    assert _final(two)["test_recall@20"] > 0.1


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_under_torchrun(dataset: Path, sasrec_runs: dict[str, Path], tmp_path: Path) -> None:
    """Two ranks stopped after a checkpoint and resumed end where the uninterrupted ones did."""
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(
        _command(_train_args(dataset, SASREC), 2),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # stop the ranks (torchrun passes SIGTERM on) once the first epoch's checkpoint is written
    # (renamed into place whole, so it exists only once complete)
    while proc.poll() is None and not last.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    stopped_at = torch.load(last, weights_only=True)
    assert proc.returncode != 0 and stopped_at["counters"]["epoch"] < EPOCHS, output

    _train(dataset, tmp_path, [*SASREC, "--resume"], nproc=2)
    _assert_close(sasrec_runs["two"] / "run", tmp_path / "run", EXACT_LOSS_RTOL, EXACT_METRIC_ATOL)


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_needs_the_same_number_of_processes(
    dataset: Path, sasrec_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(sasrec_runs["two"] / "run", tmp_path / "run")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    args = [str(dataset), "--split=given", f"--epochs={EPOCHS}", "--device=cpu", "--quiet"]
    assert main(["train", *args, f"--run-dir={tmp_path / 'run'}", *SASREC, "--resume"]) == 1
    assert "was written by a run of 2 processes; resume it with the same number (now 1)" in (
        capsys.readouterr().err
    )
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.spark
def test_spark_torch_distributor_matches_one_process(
    dataset: Path, sasrec_runs: dict[str, Path], tmp_path: Path
) -> None:
    """``--spark 2``: a local Spark session's TorchDistributor runs the two ranks."""
    done = _train(dataset, tmp_path, [*SASREC, "--spark=2"])
    assert "run written to run" in done.stdout
    _assert_close(sasrec_runs["one"] / "run", tmp_path / "run", EXACT_LOSS_RTOL, EXACT_METRIC_ATOL)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["loader"]["world_size"] == 2
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 1


# ---- bad input: refused before anything is written ----------------------------------------


@pytest.mark.distributed
@pytest.mark.slow
def test_a_global_batch_the_ranks_cannot_share_is_refused(dataset: Path, tmp_path: Path) -> None:
    done = _train(dataset, tmp_path, ["--model=mf-bpr", "--batch-size=601"], nproc=2, ok=False)
    assert done.returncode != 0
    assert (
        "ConfigError: train: batch_size 601 is the global batch and must be divisible by the 2 "
        "training processes" in done.stderr
    )
    assert not (tmp_path / "run").exists()


def test_one_shot_models_are_refused_under_several_processes() -> None:
    with pytest.raises(ConfigError, match="model 'ease' is fitted in one call by one process"):
        check_world(EASE, TrainConfig(model="ease"), World(0, 2))
    with pytest.raises(ConfigError, match=r"batch_size 2048 .* divisible by the 3 training"):
        check_world(MFBPR, TrainConfig(), World(1, 3))
    check_world(EASE, TrainConfig(model="ease"), World())  # one process: anything goes
    check_world(MFBPR, TrainConfig(batch_size=2048), World(1, 4))


def test_sparse_gradients_are_refused_under_several_processes() -> None:
    sparse = MFBPR.Params(sparse=True)
    with pytest.raises(ConfigError, match="sparse = true trains in one process"):
        check_world(MFBPR, TrainConfig(), World(0, 2), sparse)
    check_world(MFBPR, TrainConfig(), World(), sparse)


def test_one_gpu_for_every_rank_is_refused() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    with pytest.raises(ConfigError, match="'cuda:0' would put all 2 torchrun processes on one GPU"):
        rank_device(torch.device("cuda", 0), env)
    assert rank_device(torch.device("cpu"), env) == torch.device("cpu")


def test_spark_under_torchrun_is_refused(
    dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("TORCHELASTIC_RUN_ID", "x")):
        monkeypatch.setenv(name, value)
    assert main(["train", str(dataset), "--split=given", "--spark=2"]) == 1
    assert capsys.readouterr().err.startswith(
        "ConfigError: train: --spark starts its own training processes, but this process is "
        "already one rank of a torchrun launch"
    )


def test_spark_refuses_bad_input_before_starting(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", str(dataset), "--split=given", f"--run-dir={tmp_path / 'run'}", "--spark=2"]
    assert main([*base, "--model=ease"]) == 1
    assert "ConfigError: train: model 'ease' is fitted in one call" in capsys.readouterr().err
    assert main([*base, "--batch-size=101"]) == 1
    assert "ConfigError: train: batch_size 101 is the global batch" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_spark_without_pyspark_names_the_extra(
    dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes `import pyspark...` raise ImportError, as if it were not installed
    for name in [m for m in sys.modules if m == "pyspark" or m.startswith("pyspark.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pyspark", None)
    assert main(["train", str(dataset), "--split=given", "--spark=2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("BackendUnavailableError: train: --spark needs pyspark")
    assert "pip install 'recscale[spark]'" in err


@pytest.mark.slow
def test_recscale_imports_without_pyspark() -> None:
    code = (
        "import sys; sys.modules['pyspark'] = None; "
        "import recscale, recscale.cli, recscale.train, recscale.train.spark"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
