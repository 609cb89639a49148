"""``recscale demo``: the whole pipeline on a synthetic viewing log, printed as it goes.

raw CSV (with dirty rows) -> ingest -> quality report -> leave-last split -> popularity, iALS,
MF-BPR -> full-ranking metrics against popularity -> sample recommendations with titles.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from recscale.config import EvalConfig, IngestConfig, SplitConfig, TrainConfig
from recscale.errors import ConfigError

__all__ = ["DEMO_MODELS", "DemoConfig", "DemoResult", "run_demo"]

#: The models the demo trains, popularity first: it is the bar the others must clear.
DEMO_MODELS = ("popularity", "ials", "mf-bpr")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    users: int = 8000
    items: int = 3000
    events: int = 300_000
    epochs: int = 30
    seed: int = 0
    ks: tuple[int, ...] = (10, 20, 50)

    def __post_init__(self) -> None:
        for name in ("users", "items", "events", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo: {name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class DemoResult:
    dataset_path: Path
    metrics: dict[str, dict[str, float]]  # model -> metrics on the test part
    seconds: float


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(
    out: str | Path, config: DemoConfig = DemoConfig(), *, progress: bool = True
) -> DemoResult:
    """Run every stage under ``out`` (raw/, dataset/, runs/) and print what each one found."""
    from recscale.evaluate import format_metrics_table
    from recscale.ingest import format_quality, ingest
    from recscale.ingest.split import make_split
    from recscale.ingest.synthetic import generate_viewing_log
    from recscale.train import train

    started = time.perf_counter()
    out = Path(out)
    _say(
        f"== 1/5 generating a synthetic viewing log: {config.users:,} users, {config.items:,} titles, {config.events:,} events"
    )
    log = generate_viewing_log(
        out / "raw", users=config.users, items=config.items, events=config.events, seed=config.seed
    )
    dirty = ", ".join(f"{k} {v:,}" for k, v in log.dirty.items())
    _say(f"   wrote {log.events_path} ({log.n_lines:,} lines; planted dirty rows: {dirty})")

    _say("\n== 2/5 ingest (DuckDB): validate, quarantine, dedupe, map ids")
    ingest_config = IngestConfig(
        format="csv",
        user_col="user_id",
        item_col="title_id",
        time_col="watched_at",
        value_col="watch_fraction",
        dedupe="keep-last",
        items_file=str(log.titles_path),
    )
    result = ingest(
        [log.events_path], out / "dataset", ingest_config, append=False, progress=progress
    )
    _say(format_quality(result.quality))
    dataset = result.dataset

    _say(
        "\n== 3/5 split: each user's last view (by time) is the test item, the one before it validation"
    )
    split = make_split(dataset, SplitConfig(strategy="leave-last", k=1, seed=config.seed))
    counts = split.meta["counts"]
    _say(f"   train {counts['train']:,}  valid {counts['valid']:,}  test {counts['test']:,}")

    _say("\n== 4/5 training " + ", ".join(DEMO_MODELS))
    runs = {}
    for model in DEMO_MODELS:
        t0 = time.perf_counter()
        train_config = TrainConfig(
            model=model, split=split.name, epochs=config.epochs, seed=config.seed, progress=progress
        )
        run_dir = out / "runs" / model
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo owns its output folder
        runs[model] = train(dataset.path, train_config, None, run_dir=run_dir)
        _say(f"   {model:<11} trained in {time.perf_counter() - t0:6.1f} s -> {run_dir}")

    _say(
        f"\n== 5/5 full-ranking evaluation on the test part ({dataset.n_items:,} titles, seen titles excluded)"
    )
    eval_config = EvalConfig(ks=config.ks)
    metrics = {model: run.evaluate(eval_config) for model, run in runs.items()}
    _say(format_metrics_table(list(metrics.items()), config.ks))
    base = metrics["popularity"]
    k = 20 if 20 in config.ks else config.ks[0]
    for model in DEMO_MODELS[1:]:
        ratio = metrics[model][f"ndcg@{k}"] / max(base[f"ndcg@{k}"], 1e-12)
        _say(f"   {model}: NDCG@{k} {ratio:.2f}x popularity")

    _say("\n== sample recommendations (mf-bpr)")
    _print_samples(runs["mf-bpr"], split, n_users=2, seed=config.seed)
    seconds = time.perf_counter() - started
    _say(f"\ndemo finished in {seconds:.0f} s; everything is under {out}/")
    return DemoResult(dataset_path=dataset.path, metrics=metrics, seconds=seconds)


def _print_samples(run: Any, split: Any, *, n_users: int, seed: int) -> None:
    dataset = run.dataset
    train = split.interactions("train")
    rng = np.random.default_rng(seed)
    counts = np.bincount(train.user_idx, minlength=dataset.n_users)
    candidates = np.flatnonzero(counts >= 8)
    for user_idx in rng.choice(candidates, size=min(n_users, len(candidates)), replace=False):
        user_id = str(dataset.users.column("user_id")[int(user_idx)])
        seen = train.item_idx[train.user_idx == user_idx][-5:]
        genres = _genres(dataset, seen)
        _say(f"\nuser {user_id} recently watched:")
        for title, genre in zip(dataset.item_titles(seen), genres, strict=True):
            _say(f"      {title}  [{genre}]")
        _say("   recommended:")
        recs = run.recommend(user_id, 5)
        rec_genres = _genres(dataset, np.array([r["item_idx"] for r in recs]))
        for rec, genre in zip(recs, rec_genres, strict=True):
            _say(f"   {rec['rank']:>2}. {rec['title']}  [{genre}]")


def _genres(dataset: Any, idx: np.ndarray) -> list[str]:
    if "genres" not in dataset.items.column_names:
        return [""] * len(idx)
    values = dataset.items.column("genres").to_pylist()
    return [
        ", ".join(values[i]) if isinstance(values[i], list) else str(values[i] or "")
        for i in np.asarray(idx, dtype=np.int64)
    ]
