"""The training loop, checkpoints and run directories, on tiny datasets written to tmp_path."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import recscale.train.checkpoint as checkpoint_module
from recscale.config import EvalConfig, TrainConfig, load_toml
from recscale.errors import ConfigError, RunError, UnknownIdError
from recscale.evaluate import evaluate_model
from recscale.models import MFBPR, TorchRecommender
from recscale.testing import block_log, interactions, write_tiny_dataset
from recscale.train import (
    Run,
    default_run_dir,
    fit,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
    train,
)
from recscale.train.schedule import lr_factor

BPR = {"dim": 8, "lr": 0.05, "n_negatives": 2}


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads() -> Iterator[None]:
    """Training with num_threads=1 sets torch's global thread count; other modules get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 32-user block log with one valid and one test item per user (128 train rows)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "blocks", block_log(valid=True))


@pytest.fixture(scope="module")
def dataset_no_valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "blocks-nv", block_log())


def _config(**changes: Any) -> TrainConfig:
    base = {
        "model": "mf-bpr",
        "split": "given",
        "epochs": 4,
        "batch_size": 48,  # 3 batches per epoch
        "device": "cpu",
        "progress": False,
        "num_threads": 1,  # tiny tensors: thread start-up would cost more than the work
        "validate_k": 5,
        "lr_schedule": "constant",  # the lr a test expects is the model's
    }
    return TrainConfig(**{**base, **changes})


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    timing = ("train_seconds", "train_samples_per_s")
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


# ---- the run directory ---------------------------------------------------------------------


def test_train_writes_the_whole_run_directory(dataset: Path, tmp_path: Path) -> None:
    run = train(dataset, _config(), BPR, run_dir=tmp_path / "run")
    path = tmp_path / "run"
    assert run.path == path and run.model.name == "mf-bpr"

    tables = load_toml(path / "config.toml")
    assert tables["train"]["epochs"] == 4 and tables["train"]["model"] == "mf-bpr"
    # the resolved [model] table holds every hyper-parameter, defaults included
    # TOML has no null: hyper-parameters left at None are left out (and read back as None)
    defaults = {k: v for k, v in dataclasses.asdict(MFBPR.Params()).items() if v is not None}
    assert tables["model"] == {**defaults, **BPR}
    assert tables["data"] == {"dataset": str(dataset.resolve()), "split": "given"}

    assert (path / "checkpoints" / "last.pt").is_file()
    assert (path / "checkpoints" / "best.pt").is_file()
    assert not list((path / "checkpoints").glob(".*"))  # no temporary file left
    assert list((path / "tensorboard").glob("events.out.tfevents.*"))

    rows = _metrics(path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    for row in rows:
        assert set(row) == {
            "epoch",
            "step",
            "train_loss",
            "train_lr",
            "train_samples_per_s",
            "train_seconds",
            "valid_ndcg@5",
            "valid_recall@5",
        }
        assert row["train_lr"] == 0.05 and 0 <= row["valid_ndcg@5"] <= 1
    best = max(rows, key=lambda r: r["valid_ndcg@5"])
    assert run.fit_result is not None
    assert run.fit_result.best_epoch == best["epoch"]
    assert run.fit_result.best_metric == best["valid_ndcg@5"]

    users, items = run.model.export_embeddings()
    for name, expected in (("users", users), ("items", items)):
        table = pq.read_table(path / "embeddings" / f"{name}.parquet")
        assert table.schema.names == ["idx", "vector"]
        assert table.schema.field("idx").type == pa.int32()
        vector_type = table.schema.field("vector").type
        assert pa.types.is_fixed_size_list(vector_type)
        # 8 dimensions, plus 1 for the item bias (the user side's constant 1)
        assert (vector_type.value_type, vector_type.list_size) == (pa.float32(), 9)
        assert table.column("idx").to_pylist() == list(range(len(expected)))
        vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(vectors, expected)


def test_the_returned_model_is_the_best_validated_one(dataset: Path, tmp_path: Path) -> None:
    run = train(dataset, _config(epochs=6), BPR, run_dir=tmp_path / "run")
    split = run.split
    value = evaluate_model(
        run.model, split.interactions("valid"), exclude=split.interactions("train"), ks=(5,)
    )["ndcg@5"]
    assert value == run.fit_result.best_metric  # type: ignore[union-attr]
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["counters"]["epoch"] == run.fit_result.best_epoch  # type: ignore[union-attr]


def test_run_open_rebuilds_the_model(dataset: Path, tmp_path: Path) -> None:
    run = train(dataset, _config(), BPR, run_dir=tmp_path / "run")
    opened = Run.open(tmp_path / "run")
    assert opened.config == run.config and opened.model.params == run.model.params
    users = np.arange(run.dataset.n_users)
    assert torch.equal(opened.model.score(users), run.model.score(users))
    assert opened.split.name == "given" and opened.dataset.path == dataset


def test_evaluate_writes_eval_json(dataset: Path, tmp_path: Path) -> None:
    run = train(dataset, _config(), BPR, run_dir=tmp_path / "run")
    metrics = run.evaluate(EvalConfig(ks=(1, 5), device="cpu"))
    split = run.split
    expected = evaluate_model(
        run.model,
        split.interactions("test"),
        [split.interactions("train"), split.interactions("valid")],
        ks=(1, 5),
    )
    assert metrics == expected
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report == {"part": "test", **expected}


def test_recommend_known_and_unknown_users(tmp_path: Path) -> None:
    data = write_tiny_dataset(tmp_path / "blocks", block_log())
    config = _config(model="ials", epochs=1)
    params = {"factors": 4, "regularization": 0.1, "alpha": 10.0}
    run = train(data, config, params, run_dir=tmp_path / "run")
    # u9 (group 1) has seen items 6, 7, 8, 10, 11 of block 6..11; its held-out item is 9
    recs = run.recommend("u9", k=3)
    assert [r["rank"] for r in recs] == [1, 2, 3]
    assert recs[0] == {
        "item_id": "i9",
        "item_idx": 9,
        "title": "Item 9",
        "score": recs[0]["score"],
        "rank": 1,
    }
    assert not {"i6", "i7", "i8", "i10", "i11"} & {r["item_id"] for r in recs}
    assert recs[0]["score"] >= recs[1]["score"] >= recs[2]["score"]
    with_seen = run.recommend("u9", k=6, exclude_seen=False)
    assert {r["item_id"] for r in with_seen} == {f"i{i}" for i in range(6, 12)}
    assert len(run.recommend("u9", k=100)) == 24 - 5  # all the items it has not seen
    with pytest.raises(UnknownIdError, match=r"unknown user id 'nobody'"):
        run.recommend("nobody")
    with pytest.raises(ConfigError, match="k must be an integer >= 1, got 0"):
        run.recommend("u9", k=0)


def test_one_shot_model_runs_validate_once_and_resume_is_a_no_op(
    dataset: Path, tmp_path: Path
) -> None:
    config = _config(model="popularity")
    run = train(dataset, config, None, run_dir=tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and "valid_ndcg@5" in rows[0]
    assert run.fit_result is not None and run.fit_result.best_epoch == 1
    counts = np.bincount(run.split.interactions("train").item_idx, minlength=24)
    np.testing.assert_array_equal(run.model.score(np.array([0]))[0].numpy(), counts)
    again = train(dataset, config, None, run_dir=tmp_path / "run", resume=True)
    assert len(_metrics(tmp_path / "run")) == 1
    assert torch.equal(again.model.score(np.array([0])), run.model.score(np.array([0])))


def test_without_valid_part_early_stopping_is_off(
    dataset_no_valid: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="recscale.train"):
        run = train(dataset_no_valid, _config(epochs=3), BPR, run_dir=tmp_path / "run")
    assert "split has no valid part: training the fixed 3 epochs; early stopping is off" in (
        caplog.text
    )
    assert [r["epoch"] for r in _metrics(tmp_path / "run")] == [1, 2, 3]
    assert "valid_ndcg@5" not in _metrics(tmp_path / "run")[0]
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert run.fit_result is not None and run.fit_result.best_epoch is None
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert torch.equal(last["model"]["user_emb"], run.model.user_emb.detach())


def test_default_run_dir(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_run_dir(dataset, "ials") == Path("runs") / "blocks-ials"
    run = train(dataset, _config(model="popularity"))
    assert run.path == Path("runs") / "blocks-popularity"
    assert (tmp_path / "runs" / "blocks-popularity" / "config.toml").is_file()


# ---- resume ---------------------------------------------------------------------------------


class Crash(Exception):
    pass


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_after_a_crash_gives_the_same_model(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, schedule: str
) -> None:
    config = _config(lr_schedule=schedule)
    straight = train(dataset, config, BPR, run_dir=tmp_path / "straight")

    # crash in the middle of epoch 3 (step 8 of 12): the last checkpoint is from epoch 2
    calls = {"n": 0}
    original = MFBPR.batch_loss

    def crashing(self: MFBPR, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 8:
            raise Crash
        return original(self, batch)

    monkeypatch.setattr(MFBPR, "batch_loss", crashing)
    with pytest.raises(Crash):
        train(dataset, config, BPR, run_dir=tmp_path / "crashed")
    monkeypatch.undo()
    last = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last.pt")
    assert last["counters"]["epoch"] == 2 and last["loader"]["epoch"] == 2
    # a line written after the checkpoint by the crashed run must not survive the resume
    with (tmp_path / "crashed" / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"epoch": 3, "step": 9, "train_loss": -1.0}) + "\n")

    resumed = train(dataset, config, BPR, run_dir=tmp_path / "crashed", resume=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for key in ("exp_avg", "exp_avg_sq"):
        for p in a["optimizer"]["state"]:
            assert torch.equal(a["optimizer"]["state"][p][key], b["optimizer"]["state"][p][key])
    assert a["counters"] == b["counters"] and a["loader"] == b["loader"]
    assert _without_timing(_metrics(tmp_path / "straight")) == _without_timing(
        _metrics(tmp_path / "crashed")
    )


def test_resume_with_a_different_config_names_the_keys(dataset: Path, tmp_path: Path) -> None:
    train(dataset, _config(epochs=1), BPR, run_dir=tmp_path / "run")
    with pytest.raises(RunError) as info:
        train(
            dataset,
            _config(epochs=1, batch_size=64),
            {**BPR, "lr": 0.1},
            run_dir=tmp_path / "run",
            resume=True,
        )
    message = str(info.value)
    assert "differs from its config.toml in model.lr (run has 0.05, requested 0.1); " in message
    assert "train.batch_size (run has 48, requested 64)" in message
    # progress, device and num_threads change how it runs, not what it computes
    run = train(
        dataset, _config(epochs=1, progress=True), BPR, run_dir=tmp_path / "run", resume=True
    )
    assert run.fit_result is not None and run.fit_result.epochs == 1


def test_a_new_run_never_overwrites_an_old_one(dataset: Path, tmp_path: Path) -> None:
    train(dataset, _config(model="popularity"), run_dir=tmp_path / "run")
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(RunError, match=r"already holds a run; pass resume=True \(--resume\)"):
        train(dataset, _config(model="popularity"), run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=r"is not empty and holds no config\.toml"):
        train(dataset, _config(model="popularity"), run_dir=tmp_path / "other")


def test_cosine_schedule() -> None:
    assert lr_factor("constant", 7, 10) == 1.0
    assert [lr_factor("cosine", s, 4) for s in range(6)] == pytest.approx(
        [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2, 0.0, 0.0]
    )
    with pytest.raises(ConfigError, match="lr_schedule 'step' is unknown"):
        lr_factor("step", 0, 1)


def test_cosine_schedule_sets_the_lr_of_every_step(dataset: Path, tmp_path: Path) -> None:
    train(dataset, _config(lr_schedule="cosine"), BPR, run_dir=tmp_path / "run")
    # 12 steps in all; the lr of the last step of epoch e is 0.05 * factor(3e - 1)
    lrs = [row["train_lr"] for row in _metrics(tmp_path / "run")]
    assert lrs == pytest.approx([0.05 * lr_factor("cosine", 3 * e - 1, 12) for e in (1, 2, 3, 4)])
    assert lrs[-1] == pytest.approx(0.05 * (1 - math.cos(math.pi / 12)) / 2)


# ---- early stopping, on a model whose validation curve is known ------------------------------


@dataclasses.dataclass(frozen=True)
class ScriptedParams:
    pass


class Scripted(TorchRecommender):
    """One SGD step per epoch moves w by +1; item 0's score -|w - 2| peaks after epoch 2."""

    name = "scripted"
    Params = ScriptedParams

    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__(ScriptedParams(), n_users, n_items)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return -self.w + 0.0 * batch["users"].sum()

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def score(self, users: np.ndarray) -> torch.Tensor:
        row = torch.stack(
            [
                -(self.w.detach() - 2).abs(),
                torch.tensor(-0.5),
                torch.tensor(-1.5),
                torch.tensor(0.0),
            ]
        )
        return row.expand(len(users), -1).clone()


def test_early_stopping_keeps_the_best_epoch(tmp_path: Path) -> None:
    train_part = interactions([0, 1], [3, 3], 2, 4)  # item 3 is excluded from every ranking
    valid_part = interactions([0, 1], [0, 0], 2, 4)
    model = Scripted(2, 4)
    config = _config(epochs=10, batch_size=8, patience=2, validate_k=3)
    result = fit(model, train_part, valid_part, config, tmp_path / "run")
    # ndcg@3 of item 0 by epoch: rank 2, 1, 2, 3 -> 1/log2(3), 1, 1/log2(3), 1/2: stop after 4
    values = [r["valid_ndcg@3"] for r in _metrics(tmp_path / "run")]
    assert values == pytest.approx([1 / math.log2(3), 1.0, 1 / math.log2(3), 0.5])
    assert result.epochs == 4 and result.stopped_early
    assert result.best_epoch == 2 and result.best_metric == 1.0
    assert model.w.item() == 2.0  # the best weights, not the last ones (4.0)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["model"]["w"].item() == 4.0 and last["counters"]["finished"]
    # resuming a finished run trains nothing more
    again = Scripted(2, 4)
    result = fit(again, train_part, valid_part, config, tmp_path / "run", resume=True)
    assert result.epochs == 4 and again.w.item() == 2.0


class Diverging(Scripted):
    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.w * float("nan")


def test_a_diverging_loss_stops_training(tmp_path: Path) -> None:
    train_part = interactions([0, 1], [3, 3], 2, 4)
    with pytest.raises(RunError, match=r"training diverged at epoch 1: loss is nan; lower the"):
        fit(Diverging(2, 4), train_part, None, _config(batch_size=8), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_validation_on_a_sample_of_users(dataset: Path, tmp_path: Path) -> None:
    run = train(dataset, _config(epochs=1, validate_users=5), BPR, run_dir=tmp_path / "run")
    valid, train_part = run.split.interactions("valid"), run.split.interactions("train")
    sample = np.sort(np.random.default_rng(0).choice(np.unique(valid.user_idx), 5, replace=False))
    expected = evaluate_model(run.model, valid, train_part, ks=(5,), users=sample)
    assert expected["users"] == 5
    row = _metrics(tmp_path / "run")[0]
    assert row["valid_ndcg@5"] == expected["ndcg@5"]
    assert row["valid_recall@5"] == expected["recall@5"]


def test_patience_zero_trains_every_epoch(tmp_path: Path) -> None:
    train_part = interactions([0, 1], [3, 3], 2, 4)
    valid_part = interactions([0, 1], [0, 0], 2, 4)
    model = Scripted(2, 4)
    config = _config(epochs=6, batch_size=8, patience=0, validate_k=3, validate_every=2)
    result = fit(model, train_part, valid_part, config, tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert [("valid_ndcg@3" in r) for r in rows] == [False, True, False, True, False, True]
    assert result.epochs == 6 and not result.stopped_early
    assert result.best_epoch == 2 and model.w.item() == 2.0


# ---- checkpoints ----------------------------------------------------------------------------


def test_a_crash_while_writing_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"weights": torch.ones(3)})

    def torn_save(obj: Any, fh: Any) -> None:
        fh.write(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"weights": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["weights"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_unreadable_checkpoints_are_run_errors(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"checkpoint .*missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(RunError, match=r"torn.pt is unreadable \(corrupt or truncated\)"):
        load_checkpoint(tmp_path / "torn.pt")
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(RunError, match=r"format None, expected 'recscale-checkpoint-1'"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_run_open_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"run directory '.*nowhere' does not exist"):
        Run.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"empty is not a run directory: it has no config.toml"):
        Run.open(tmp_path / "empty")
    train(dataset, _config(model="popularity"), run_dir=tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(RunError, match=r"last.pt is unreadable"):
        Run.open(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "last.pt").unlink()
    with pytest.raises(RunError, match=r"has no checkpoint \(checkpoints/best.pt or last.pt\)"):
        Run.open(tmp_path / "run")
    (tmp_path / "run" / "config.toml").write_text("[train\n")
    with pytest.raises(RunError, match=r"config.toml is corrupt"):
        Run.open(tmp_path / "run")


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match=r"device 'tpu0' is not a device"):
        resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"CUDA is not available here"):
            resolve_device("cuda")


def test_public_surface() -> None:
    import recscale.loader
    import recscale.models
    import recscale.train

    assert recscale.train.__all__ == [
        "FitResult",
        "Run",
        "default_run_dir",
        "fit",
        "load_checkpoint",
        "resolve_device",
        "save_checkpoint",
        "train",
        "write_embeddings",
    ]
    # what training and the models rely on (the loader's own tests pin the rest of its surface)
    assert set(recscale.loader.__all__) >= {
        "InMemoryLoader",
        "SequenceLoader",
        "World",
        "last_items",
        "partition",
    }
    assert set(recscale.models.__all__) >= {
        "Recommender",
        "TorchRecommender",
        "MODELS",
        "create_model",
        "get_model_class",
        "model_params",
    }
    for module in (recscale.loader, recscale.models, recscale.train):
        for name in module.__all__:
            assert hasattr(module, name), (module.__name__, name)
