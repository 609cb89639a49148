"""Model quality on the shared real data sets: every model, every data set, three seeds.

For each data set found under ``$RECSCALE_DATA`` (default ``../shared/data``) the benchmark ingests
it once (into ``bench/out/data/``), makes its split, then trains and evaluates every model with the
config in ``configs/<dataset>/<model>.toml`` (the same file ``recscale train --config`` takes), once
per seed, each run in its own process so that its peak RSS is its own. It prints one table —
dataset, model, metrics as mean ± std over the seeds, the published figure where one exists, train
time and peak RSS — writes it to ``bench/out/quality.md`` and ``bench/out/quality.json``, draws
``bench/out/quality.png``, and with ``--readme`` replaces those data sets' tables in the README's
results (the other data sets' tables stay).

    python bench/quality.py                        # everything (hours on 2 cores)
    python bench/quality.py --datasets gowalla --models lightgcn,ease --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = ROOT / "configs"
OUT = HERE / "out"
# the figures the README shows (bench/out is not kept in the repository)
FIGURES = HERE / "figures"

MODELS = (
    "popularity",
    "itemknn",
    "ease",
    "bspm",
    "ials",
    "mf-bpr",
    "lightgcn",
    "two-tower",
    "sasrec",
)
# models whose result does not depend on the seed: trained once
DETERMINISTIC = {"popularity", "itemknn", "ease"}


@dataclasses.dataclass(frozen=True)
class Bench:
    """One data set: where it is, how it is ingested and split, what is reported."""

    name: str
    folder: str
    protocol: str
    split: dict[str, Any]  # SplitConfig fields; {"strategy": "given"} uses the files' own split
    metrics: tuple[str, ...]
    ingest: dict[str, Any] = dataclasses.field(default_factory=dict)
    # published (model label, {metric: value}) rows shown beside ours
    published: tuple[tuple[str, dict[str, float]], ...] = ()


BENCHES = {
    "gowalla": Bench(
        "gowalla",
        "gowalla",
        "LightGCN split, full ranking, train items excluded",
        {"strategy": "given"},
        ("recall@20", "ndcg@20"),
        published=(
            ("MF-BPR (NGCF paper)", {"recall@20": 0.1291, "ndcg@20": 0.1109}),
            ("EASE (BARS re-run)", {"recall@20": 0.1765, "ndcg@20": 0.1467}),
            ("LightGCN (paper)", {"recall@20": 0.1830, "ndcg@20": 0.1554}),
            ("LightGCN (official PyTorch re-run)", {"recall@20": 0.1824, "ndcg@20": 0.1547}),
            ("SimpleX (BARS)", {"recall@20": 0.1872, "ndcg@20": 0.1557}),
            ("MF-CCL (BARS)", {"recall@20": 0.1837, "ndcg@20": 0.1493}),
            ("UltraGCN (authors)", {"recall@20": 0.1862, "ndcg@20": 0.1580}),
            ("BSPM-EM (best published)", {"recall@20": 0.1920, "ndcg@20": 0.1597}),
        ),
    ),
    "beauty": Bench(
        "beauty",
        "amazon-beauty-bert4rec/beauty.txt.gz",
        "leave-one-out (last item test, one before valid), full ranking",
        {"strategy": "leave-last", "k": 1},
        ("hr@10", "ndcg@10"),
        # "user item" per line, each user's items in time order, no header
        ingest={"order_from_input": True, "delimiter": " ", "header": False},
    ),
    "ml-latest-small": Bench(
        "ml-latest-small",
        "ml-latest-small",
        "leave-one-out by timestamp, full ranking",
        {"strategy": "leave-last", "k": 1},
        ("hr@10", "ndcg@10"),
    ),
}

KS = {"recall@20": 20, "ndcg@20": 20, "hr@10": 10, "ndcg@10": 10}


def data_root() -> Path:
    return Path(os.environ.get("RECSCALE_DATA", ROOT.parent / "shared" / "data")).resolve()


def prepare(bench: Bench, work: Path) -> Path:
    """Ingest and split once; later runs reuse the dataset directory."""
    from recscale.config import IngestConfig, SplitConfig
    from recscale.dataset import open_dataset
    from recscale.ingest import ingest, make_split

    path = work / bench.name
    split_name = bench.split.get("name", bench.split["strategy"])
    if not (path / "manifest.json").exists():
        ingest([data_root() / bench.folder], path, IngestConfig(**bench.ingest), progress=False)
    if split_name not in open_dataset(path).split_names():
        make_split(path, SplitConfig(**bench.split))
    return path


WORKER = r"""
import json, resource, sys, time
from pathlib import Path
from recscale.config import EvalConfig, TrainConfig, config_from_dict, load_toml
from recscale.train import train
spec = json.loads(sys.argv[1])
tables = load_toml(spec["config"])
train_table = {**tables.get("train", {}), "seed": spec["seed"], "split": spec["split"],
               "progress": False, "device": spec["device"]}
config = config_from_dict(TrainConfig, train_table, where=spec["config"])
t0 = time.perf_counter()
run = train(spec["dataset"], config, tables.get("model", {}), run_dir=spec["run"])
seconds = time.perf_counter() - t0
metrics = run.evaluate(EvalConfig(ks=tuple(spec["ks"]), device=spec["device"]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
print("RESULT " + json.dumps({"metrics": metrics, "seconds": seconds, "peak_rss": peak,
                              "epochs": run.fit_result.epochs if run.fit_result else None}))
"""


def run_one(
    bench: Bench, dataset: Path, model: str, seed: int, device: str, runs: Path
) -> dict[str, Any]:
    config = CONFIGS / bench.name / f"{model}.toml"
    run_dir = runs / bench.name / f"{model}-seed{seed}"
    if (run_dir / "result.json").exists():
        return json.loads((run_dir / "result.json").read_text())
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    spec = {
        "config": str(config),
        "seed": seed,
        "split": bench.split.get("name", bench.split["strategy"]),
        "dataset": str(dataset),
        "run": str(run_dir),
        "device": device,
        "ks": sorted({KS[m] for m in bench.metrics}),
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(spec)], capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0], "wall": wall}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall"] = wall
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def summarize(results: list[dict[str, Any]], metric: str) -> tuple[float, float] | None:
    values = [r["metrics"][metric] for r in results if "metrics" in r]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = (
        (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0
    )
    return mean, std


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table: one block of rows per data set, published figures after ours."""
    out: list[str] = []
    for bench_name in dict.fromkeys(r["dataset"] for r in rows):
        bench = BENCHES[bench_name]
        m1, m2 = bench.metrics
        out.append(f"**{bench_name}** — {bench.protocol}\n")
        out.append(f"| model | {m1} | {m2} | seeds | train time | peak RSS |")
        out.append("|---|---|---|---|---|---|")
        for r in (r for r in rows if r["dataset"] == bench_name):
            if r.get("error"):
                out.append(f"| {r['model']} | — | — | — | — | {r['error']} |")
                continue
            cells = []
            for m in (m1, m2):
                mean, std = r[m]
                cells.append(f"{mean:.4f} ± {std:.4f}")
            out.append(
                f"| {r['model']} | {cells[0]} | {cells[1]} | {r['seeds']} | "
                f"{r['seconds']:.0f} s | {fmt_bytes(r['peak_rss'])} |"
            )
        for label, values in bench.published:
            out.append(f"| *{label}* | *{values[m1]:.4f}* | *{values[m2]:.4f}* | | | |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        metric = BENCHES[name].metrics[1]
        ok = [r for r in rows if r["dataset"] == name and not r.get("error")]
        means = [r[metric][0] for r in ok]
        stds = [r[metric][1] for r in ok]
        ax.barh([r["model"] for r in ok], means, xerr=stds, color="#4c72b0")
        for label, values in BENCHES[name].published[-1:]:
            ax.axvline(values[metric], color="#c44e52", linestyle="--", label=label)
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title(f"{name}: {metric}")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table_sections(text: str) -> dict[str, str]:
    """The per-data-set blocks of a table made by :func:`table`, by data-set name."""
    sections: dict[str, str] = {}
    for block in re.split(r"\n(?=\*\*[^*\n]+\*\* — )", "\n" + text.strip()):
        match = re.match(r"\s*\*\*([^*\n]+)\*\* — ", block)
        if match:
            sections[match.group(1)] = block.strip()
    return sections


def replace_readme_block(readme: Path, marker: str, make: Callable[[str], str]) -> None:
    """Replace what stands between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in the
    README by ``make(what stood there)``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    content = readme.read_text()
    pattern = re.compile(re.escape(start) + "(.*?)" + re.escape(end), re.S)
    if pattern.search(content) is None:
        raise SystemExit(f"{readme} has no {start} ... {end} block to replace")
    readme.write_text(pattern.sub(lambda m: f"{start}\n{make(m.group(1))}\n{end}", content))


def update_readme(readme: Path, text: str) -> None:
    """Replace the data sets of ``text`` in the README's results block; keep the others.

    A run of one data set (``--datasets beauty``) so updates its own table without dropping
    those measured in earlier runs; the blocks stay in the order of :data:`BENCHES`.
    """

    def merge(old: str) -> str:
        sections = {**table_sections(old), **table_sections(text)}
        order = [name for name in BENCHES if name in sections]
        order += [name for name in sections if name not in BENCHES]
        return "\n\n".join(sections[name] for name in order) + "\n"

    replace_readme_block(readme, "quality", merge)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(BENCHES))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--readme", action="store_true", help="replace these data sets' tables in the README"
    )
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="train nothing: build the table from the runs already finished under --out",
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / f"runs-{args.device.replace(':', '')}"

    rows: list[dict[str, Any]] = []
    for name in args.datasets.split(","):
        bench = BENCHES[name]
        if not (data_root() / bench.folder).exists():
            print(f"skipping {name}: {data_root() / bench.folder} does not exist")
            continue
        dataset = prepare(bench, args.out / "data")
        for model in args.models.split(","):
            if not (CONFIGS / name / f"{model}.toml").exists():
                print(f"skipping {name}/{model}: no configs/{name}/{model}.toml")
                continue
            model_seeds = seeds[:1] if model in DETERMINISTIC else seeds
            if args.cached_only:
                model_seeds = [
                    seed
                    for seed in model_seeds
                    if (runs / name / f"{model}-seed{seed}" / "result.json").exists()
                ]
                if not model_seeds:
                    continue
            results = []
            for seed in model_seeds:
                result = run_one(bench, dataset, model, seed, args.device, runs)
                results.append(result)
                shown = (
                    result.get("error")
                    or "  ".join(f"{m} {result['metrics'][m]:.4f}" for m in bench.metrics)
                    + f"  {result['seconds']:.0f} s"
                )
                print(f"{name:16} {model:11} seed {seed}: {shown}", flush=True)
            done = [r for r in results if "metrics" in r]
            row: dict[str, Any] = {"dataset": name, "model": model, "seeds": len(done)}
            if not done:
                row["error"] = results[-1].get("error", "failed")
            else:
                for m in bench.metrics:
                    row[m] = summarize(done, m)
                row["seconds"] = sum(r["seconds"] for r in done) / len(done)
                row["peak_rss"] = max(r["peak_rss"] for r in done)
            rows.append(row)

    text = table(rows)
    print()
    print(text)
    (args.out / "quality.md").write_text(text + "\n")
    (args.out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    if rows:
        plot(rows, args.out / "quality.png")
    if args.readme:
        update_readme(ROOT / "README.md", text)
        FIGURES.mkdir(exist_ok=True)
        for name in dict.fromkeys(r["dataset"] for r in rows):
            plot([r for r in rows if r["dataset"] == name], FIGURES / f"quality-{name}.png")


if __name__ == "__main__":
    main()
