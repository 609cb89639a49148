"""LightGCN's time to quality on Gowalla: Recall@20 against wall time, and a reference's epoch time.

Trains LightGCN on the Gowalla split files with ``configs/gowalla/lightgcn.toml`` (what
``recscale train --config`` takes), once per seed, each in its own process, and evaluates the test
part every ``--every`` epochs to draw the curve. The evaluations only watch: the epochs and the
schedule are fixed in the config, and the figure reported is the last epoch's, so nothing is chosen
on the test part. The clock counts the training epochs (building the graph takes under a
second), not the evaluations. Each seed's final figures also go into ``bench/quality.py``'s cache,
so the quality table's Gowalla LightGCN rows are these runs.

With ``--reference-python`` (a Python with RecBole installed, in its own virtual environment), the
same training interactions are written as RecBole atomic files and RecBole's LightGCN trains a few
epochs with the paper's settings (64 dimensions, 3 layers, batch 2048, lr 0.001, one negative);
its seconds per epoch are reported beside ours, measured in the same run on the same machine.
RecBole 1.2.1 needs an older stack than recscale's, hence its own environment::

    python -m venv /opt/recbole && /opt/recbole/bin/pip install torch==2.13.0 recbole==1.2.1 \
        "numpy<2" "pandas<2.3" "scipy<1.12" "setuptools<81"

    python bench/time_to_quality.py                      # 3 seeds, about 20 minutes each on 2 cores
    python bench/time_to_quality.py --seeds 0 --reference-python /opt/recbole/bin/python

Writes ``bench/out/time_to_quality.{md,json,png}``; ``--readme`` puts the table in the README and
the figure in ``bench/figures/``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import BENCHES, CONFIGS, FIGURES, OUT, ROOT, prepare, replace_readme_block

TARGET_RECALL = 0.18

WORKER = r"""
import json, resource, sys, time
from recscale.config import TrainConfig, config_from_dict, load_toml
from recscale.dataset import open_dataset
from recscale.models import create_model
from recscale.train import fit
spec = json.loads(sys.argv[1])
tables = load_toml(spec["config"])
train_table = {**tables.get("train", {}), "seed": spec["seed"], "split": "given", "progress": False,
               "device": "cpu", "patience": 0, "validate_every": spec["every"],
               "validate_k": 20, "validate_users": 0, **spec["train"]}
config = config_from_dict(TrainConfig, train_table, where=spec["config"])
split = open_dataset(spec["dataset"]).split("given")
train, test = split.interactions("train"), split.interactions("test")
model = create_model(config.model, tables.get("model", {}), train.n_users, train.n_items,
                     seed=config.seed)
t0 = time.perf_counter()
fit(model, train, test, config, spec["run"])
wall = time.perf_counter() - t0
rows = [json.loads(line) for line in open(spec["run"] + "/metrics.jsonl")]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
print("RESULT " + json.dumps({"rows": rows, "wall": wall, "peak_rss": peak}))
"""

# RecBole's LightGCN on our training interactions; the test file doubles as valid so that RecBole
# accepts the benchmark files; eval_step 0 skips validation (RecBole still tests once at the end,
# with the last weights: saved=False, as its checkpoint does not load under torch.load defaults)
REFERENCE = r"""
import json, sys, time, logging
from recbole.quick_start import run_recbole
spec = json.loads(sys.argv[1])
config = {
    "data_path": spec["data_path"], "benchmark_filename": ["train", "valid", "test"],
    "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "load_col": {"inter": ["user_id", "item_id"]},
    "epochs": spec["epochs"], "eval_step": 0, "train_batch_size": 2048,
    "learning_rate": 0.001, "embedding_size": 64, "n_layers": 3, "reg_weight": 1e-4,
    "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
    "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "mode": "full"},
    "metrics": ["Recall"], "topk": [20], "valid_metric": "recall@20", "device": "cpu",
    "use_gpu": False, "show_progress": False, "save_dataset": False, "save_dataloaders": False,
    "checkpoint_dir": spec["data_path"] + "/saved", "seed": 0, "worker": 0,
}
run_recbole(model="LightGCN", dataset="gowalla", config_dict=config, saved=False)
"""


def run_ours(
    dataset: Path, seed: int, every: int, runs: Path, train: dict[str, Any]
) -> dict[str, Any]:
    run_dir = runs / "gowalla" / f"lightgcn-seed{seed}"
    cached = run_dir / "curve.json"
    if cached.exists():
        return json.loads(cached.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    spec = {
        "config": str(CONFIGS / "gowalla" / "lightgcn.toml"),
        "seed": seed,
        "dataset": str(dataset),
        "run": str(run_dir),
        "every": every,
        "train": train,
    }
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(spec)], capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT ") :])
    train_seconds = 0.0
    curve = []
    for row in out["rows"]:
        train_seconds += row["train_seconds"]
        if "valid_recall@20" in row:
            curve.append(
                {
                    "epoch": row["epoch"],
                    "train_seconds": train_seconds,
                    "recall@20": row["valid_recall@20"],
                    "ndcg@20": row["valid_ndcg@20"],
                }
            )
    last = curve[-1]
    reached = next((p for p in curve if p["recall@20"] >= TARGET_RECALL), None)
    result = {
        "seed": seed,
        "curve": curve,
        "epochs": last["epoch"],
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / last["epoch"],
        "seconds_to_target": reached["train_seconds"] if reached else None,
        "peak_rss": out["peak_rss"],
    }
    cached.write_text(json.dumps(result, indent=2) + "\n")
    # the quality table's cache entry: the last epoch, as bench/quality.py's worker reports it
    quality = {
        "metrics": {"recall@20": last["recall@20"], "ndcg@20": last["ndcg@20"]},
        "seconds": train_seconds,
        "peak_rss": out["peak_rss"],
        "epochs": last["epoch"],
        "wall": out["wall"],
    }
    (run_dir / "result.json").write_text(json.dumps(quality, indent=2) + "\n")
    return result


def run_reference(python: str, dataset: Path, epochs: int, runs: Path) -> dict[str, Any]:
    """RecBole's LightGCN for a few epochs on the same training interactions: seconds per epoch.

    Kept in ``runs`` like our seeds, so that a later run for other seeds shows it again.
    """
    from recscale.dataset import open_dataset

    cached = runs / "gowalla" / f"recbole-lightgcn-{epochs}-epochs.json"
    if cached.exists():
        return json.loads(cached.read_text())

    split = open_dataset(dataset).split("given")
    work = Path(tempfile.mkdtemp(prefix="recbole-"))
    folder = work / "gowalla"
    folder.mkdir()
    for part, file_part in (("train", "train"), ("test", "valid"), ("test", "test")):
        table = split.interactions(part)
        with (folder / f"gowalla.{file_part}.inter").open("w") as fh:
            fh.write("user_id:token\titem_id:token\n")
            fh.writelines(
                f"{u}\t{i}\n"
                for u, i in zip(table.user_idx.tolist(), table.item_idx.tolist(), strict=True)
            )
    spec = {"data_path": str(work), "epochs": epochs}
    started = time.perf_counter()
    proc = subprocess.run(
        [python, "-c", REFERENCE, json.dumps(spec)], capture_output=True, text=True, cwd=work
    )
    wall = time.perf_counter() - started
    log = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # RecBole colours its log
    times = [float(t) for t in re.findall(r"epoch \d+ training \[time: ([\d.]+)s", log)]
    if proc.returncode != 0 or not times:
        raise SystemExit(f"the reference failed:\n{log[-3000:]}")
    version = subprocess.run(
        [python, "-c", "import recbole; print(recbole.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "name": f"RecBole {version} LightGCN",
        "seconds_per_epoch": sum(times) / len(times),
        "epochs": len(times),
        "wall": wall,
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(ours: list[dict[str, Any]], reference: dict[str, Any] | None) -> str:
    lines = [
        f"| run | epochs | s / epoch | time to Recall@20 ≥ {TARGET_RECALL} | final Recall@20 "
        "| final NDCG@20 | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ours:
        last = r["curve"][-1]
        reached = r["seconds_to_target"]
        epoch = next((p["epoch"] for p in r["curve"] if p["recall@20"] >= TARGET_RECALL), None)
        shown = f"{reached / 60:.1f} min (epoch {epoch})" if reached is not None else "not reached"
        lines.append(
            f"| recscale LightGCN, seed {r['seed']} | {r['epochs']} | "
            f"{r['seconds_per_epoch']:.1f} | {shown} | {last['recall@20']:.4f} | "
            f"{last['ndcg@20']:.4f} | {r['peak_rss'] / 2**30:.1f} GiB |"
        )
    if reference is not None:
        # against the first seed's run: the one to run alone when other jobs share the machine
        ratio = reference["seconds_per_epoch"] / ours[0]["seconds_per_epoch"]
        lines.append(
            f"| {reference['name']} (paper settings) | {reference['epochs']} timed | "
            f"{reference['seconds_per_epoch']:.1f} | — | — | — | — |"
        )
        lines.append("")
        lines.append(
            f"One epoch of the reference takes {ratio:.1f}× as long as one of ours (seed "
            f"{ours[0]['seed']}; each with its own batch size and negatives; same interactions, "
            "same machine, same run)."
        )
    return "\n".join(lines)


def plot(ours: list[dict[str, Any]], path: Path) -> None:
    """Recall@20 against training time for the first seed (the one to run alone, whose clock is
    the machine's), and against epochs for every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    first = ours[0]
    by_time.plot(
        [p["train_seconds"] / 60 for p in first["curve"]],
        [p["recall@20"] for p in first["curve"]],
        marker=".",
        label=f"seed {first['seed']}",
    )
    for r in ours:
        by_epoch.plot(
            [p["epoch"] for p in r["curve"]],
            [p["recall@20"] for p in r["curve"]],
            marker=".",
            label=f"seed {r['seed']}",
        )
    for label, values in BENCHES["gowalla"].published:
        if label.startswith("LightGCN (paper)"):
            for ax in (by_time, by_epoch):
                ax.axhline(values["recall@20"], color="#c44e52", linestyle="--", label=label)
    by_time.axhline(TARGET_RECALL, color="grey", linestyle=":", label=f"target {TARGET_RECALL}")
    by_time.axvline(15, color="grey", linestyle="-.", label="15 min")
    by_time.set_xlabel("training wall time (min, 2 CPU cores)")
    by_epoch.set_xlabel("epoch")
    by_time.set_ylabel("Recall@20 (Gowalla test)")
    for ax in (by_time, by_epoch):
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--every", type=int, default=2, help="evaluate every this many epochs")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--reference-python", help="a Python with RecBole installed")
    parser.add_argument("--reference-epochs", type=int, default=2)
    parser.add_argument(
        "--readme",
        action="store_true",
        help="replace the README's time-to-quality table and its figure in bench/figures/",
    )
    parser.add_argument(
        "--epochs", type=int, help="override the config's epochs (a quick look; not cached)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = prepare(BENCHES["gowalla"], args.out / "data")

    ours = []
    for seed in (int(s) for s in args.seeds.split(",")):
        train = {} if args.epochs is None else {"epochs": args.epochs}
        runs = args.out / ("runs-cpu" if args.epochs is None else "runs-quick")
        r = run_ours(dataset, seed, args.every, runs, train)
        last = r["curve"][-1]
        print(
            f"seed {seed}: {r['seconds_per_epoch']:.1f} s/epoch, Recall@20 {last['recall@20']:.4f}"
            f" NDCG@20 {last['ndcg@20']:.4f}, Recall@20 >= {TARGET_RECALL} after "
            + (f"{r['seconds_to_target'] / 60:.1f} min" if r["seconds_to_target"] else "never"),
            flush=True,
        )
        ours.append(r)
    reference = None
    if args.reference_python:
        reference = run_reference(
            args.reference_python, dataset, args.reference_epochs, args.out / "runs-cpu"
        )
    text = table(ours, reference)
    print(text)
    (args.out / "time_to_quality.md").write_text(text + "\n")
    (args.out / "time_to_quality.json").write_text(
        json.dumps({"ours": ours, "reference": reference}, indent=2) + "\n"
    )
    plot(ours, args.out / "time_to_quality.png")
    if args.readme:
        replace_readme_block(ROOT / "README.md", "time", lambda _: text)
        FIGURES.mkdir(exist_ok=True)
        shutil.copyfile(args.out / "time_to_quality.png", FIGURES / "time_to_quality.png")


if __name__ == "__main__":
    main()
