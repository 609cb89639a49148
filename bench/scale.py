"""How cost grows with the log: ingest → split → one epoch of MF-BPR → evaluation, at 1M, 10M
and 100M interactions.

For each size N a synthetic log is written as CSV (integer ids, unix times): users and items
grow with the log as they do in real services, ``users ∝ N^0.85`` and ``items ∝ N^0.75``,
anchored at 10M interactions ≈ 1M users × 200k items; activity and popularity are skewed. Then,
each stage in its own process so its peak RSS is its own:

- ingest: ``recscale.ingest.ingest`` (DuckDB engine, 2GB memory limit: validation, dedupe,
  id maps, quality report, Parquet);
- split: leave-last (DuckDB, 2GB): each user's last interaction to test, the one before to valid;
- train: one epoch of MF-BPR (dim 32, 4 negatives, hardest of them, item bias, sparse gradients
  + SparseAdam) over ``StreamLoader`` batches of 8,192 with known positives rejected;
- evaluate: Recall@20 / NDCG@20 of 10,000 sampled test users, ranked over all items with their
  train and valid items excluded (only those users' rows are read).

Prints wall time, rows/s and peak RSS per stage and size, and the growth exponent ``k`` of
``time ∝ N^k`` (least squares on log-log); writes bench/out/scale.md, scale.json and the
log-log plot bench/figures/scale.png (``--figure``).

    python bench/scale.py --sizes 1000000 10000000 100000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

HERE = Path(__file__).resolve().parent
STAGES = ("ingest", "split", "train", "evaluate")

STAGE = r"""
import json, sys, time
from pathlib import Path
stage, work = sys.argv[1], Path(sys.argv[2])
t0 = time.perf_counter()
info = {}
MF_BPR = {"dim": 32, "n_negatives": 4, "sparse": True, "lr": 0.02}
if stage == "ingest":
    from recscale.config import IngestConfig
    from recscale.ingest import ingest
    config = IngestConfig(format="csv", user_col="user_id", item_col="item_id",
                          time_col="timestamp", memory_limit="2GB")
    result = ingest([work / "log.csv"], work / "dataset", config, progress=False)
    m = result.dataset.manifest
    info = {"rows": m.n_interactions, "users": m.n_users, "items": m.n_items}
elif stage == "split":
    from recscale.config import SplitConfig
    from recscale.ingest import make_split
    split = make_split(work / "dataset", SplitConfig(strategy="leave-last", memory_limit="2GB"))
    info = {"rows": sum(split.meta["counts"].values()), **split.meta["counts"]}
elif stage == "train":
    import torch
    from tqdm import tqdm
    from recscale.dataset import open_dataset
    from recscale.loader import StreamLoader
    from recscale.models import create_model
    torch.manual_seed(0)
    # one thread: the steps are small sparse ops, and a second thread's barrier cost more than
    # it gave (measured: 4.5x slower with 2 threads when another process shared the cores)
    torch.set_num_threads(1)
    ds = open_dataset(work / "dataset")
    model = create_model("mf-bpr", MF_BPR, ds.n_users, ds.n_items, seed=0)
    loader = StreamLoader(ds.split("leave-last").path / "train", n_items=ds.n_items,
                          batch_size=8192, n_negatives=4, seed=0)
    optimizer = model.make_optimizer()
    model.train()
    samples, loss_sum, steps = 0, 0.0, 0  # .item() per step: on the CPU it costs no sync
    for batch in tqdm(loader, total=len(loader), unit="batch", mininterval=10, file=sys.stderr):
        loss = model.batch_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += len(batch["users"])
        loss_sum += loss.item()
        steps += 1
    torch.save(model.state_dict(), work / "model.pt")
    info = {"rows": samples, "loss": loss_sum / max(steps, 1)}
elif stage == "evaluate":
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import torch
    from recscale.dataset import Interactions, open_dataset
    from recscale.evaluate import evaluate_model
    from recscale.models import create_model
    ds = open_dataset(work / "dataset")
    split = ds.split("leave-last")
    model = create_model("mf-bpr", MF_BPR, ds.n_users, ds.n_items, seed=0)
    model.load_state_dict(torch.load(work / "model.pt"))
    model.eval()
    test_users = np.unique(pads.dataset(split.path / "test").to_table(columns=["user_idx"])
                           .column("user_idx").to_numpy())
    users = np.sort(np.random.default_rng(0).choice(test_users, min(10_000, len(test_users)),
                                                    replace=False))
    import pyarrow as pa
    pa_users = pa.array(users.astype(np.int32))
    def rows_of(part):
        table = pads.dataset(split.path / part).to_table(
            filter=pc.field("user_idx").isin(pa_users))
        return Interactions.from_table(table, ds.n_users, ds.n_items)
    scanned = sum(pads.dataset(split.path / p).count_rows() for p in ("train", "valid", "test"))
    # 128 users at a time: evaluation holds about three 128 × n_items float buffers (1.7 GB at
    # 1.1M items); its default of 1,024 users needed 15 GB there
    metrics = evaluate_model(model, rows_of("test"), [rows_of("train"), rows_of("valid")],
                             ks=(20,), users=users, batch_users=128)
    info = {"rows": scanned, "users": int(metrics["users"]),
            "recall@20": metrics["recall@20"], "ndcg@20": metrics["ndcg@20"]}
info["seconds"] = time.perf_counter() - t0
print(json.dumps(info))
"""


def log_shape(rows: int) -> tuple[int, int]:
    """Users and items of a log of ``rows`` interactions (10M ≈ 1M users × 200k items)."""
    scale = rows / 10_000_000
    return max(int(1_000_000 * scale**0.85), 100), max(int(200_000 * scale**0.75), 50)


def write_log(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` CSV lines, written in chunks so 100M rows need little memory."""
    n_users, n_items = log_shape(rows)
    rng = np.random.default_rng(seed)
    # a random relabelling, so ids carry no hint of activity or popularity
    user_ids = rng.permutation(n_users).astype(np.int64) + 1_000_000
    item_ids = rng.permutation(n_items).astype(np.int64) + 1
    schema = pa.schema(
        [("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())]
    )
    chunk = 2_000_000
    tmp = path.with_suffix(".tmp")
    with pacsv.CSVWriter(tmp, schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            # activity and popularity: P(index < x) = (x / n) ** (1/2) and ** (1/3)
            users = user_ids[(n_users * rng.random(n) ** 2).astype(np.int64)]
            items = item_ids[(n_items * rng.random(n) ** 3).astype(np.int64)]
            ts = 1_500_000_000 + start + np.arange(n, dtype=np.int64)
            writer.write_table(
                pa.table({"user_id": users, "item_id": items, "timestamp": ts}, schema=schema)
            )
    os.replace(tmp, path)


def run_stage(stage: str, work: Path) -> dict:
    """One stage in its own process: its result, wall time and peak RSS (the kernel's count)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", STAGE, stage, str(work)], stdout=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read() if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed on {work} (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["wall"] = wall
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def growth_exponent(sizes: list[int], seconds: list[float]) -> float:
    """``k`` of ``seconds ∝ size^k``, least squares on log-log."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def plot(results: dict[int, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for stage in STAGES:
        seconds = [results[n][stage]["wall"] for n in sizes]
        k = growth_exponent(sizes, seconds) if len(sizes) > 1 else float("nan")
        ax.plot(sizes, seconds, marker="o", label=f"{stage} (k = {k:.2f})")
    ref = [results[sizes[0]]["train"]["wall"] * n / sizes[0] for n in sizes]
    ax.plot(sizes, ref, color="grey", linestyle=":", label="linear (k = 1)")
    ax.set(xscale="log", yscale="log", xlabel="interactions", ylabel="wall seconds")
    ax.set_title("recscale: cost of each stage against log size (2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--keep", action="store_true", help="keep each size's files")
    parser.add_argument("--figure", type=Path, default=HERE / "figures" / "scale.png")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="where a size's files are still there, run only the stages not measured yet",
    )
    args = parser.parse_args()

    results_path = args.out / "scale.json"
    results: dict[int, dict[str, dict]] = {}
    if results_path.exists():  # sizes measured earlier, e.g. 100M on its own
        results = {int(k): v for k, v in json.loads(results_path.read_text()).items()}
    for rows in args.sizes:
        work = args.out / "scale" / f"rows-{rows}"
        done = results.get(rows, {}) if args.resume and work.exists() else {}
        if not done:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            t0 = time.perf_counter()
            write_log(work / "log.csv", rows)
            users, items = log_shape(rows)
            print(
                f"{rows:,} rows ({users:,} users × {items:,} items): CSV of "
                f"{(work / 'log.csv').stat().st_size / 2**20:,.0f} MiB in "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        results[rows] = dict(done)
        for stage in STAGES:
            if stage in done:
                print(f"  {stage:9s} (measured earlier, kept)", flush=True)
                continue
            r = results[rows][stage] = run_stage(stage, work)
            extra = (
                f", Recall@20 {r['recall@20']:.4f} on {r['users']:,} users"
                if stage == "evaluate"
                else ""
            )
            print(
                f"  {stage:9s} {r['wall']:8.1f} s  {r['rows'] / r['wall']:>12,.0f} rows/s  "
                f"peak RSS {r['peak_rss_mib']:>7,.0f} MiB{extra}",
                flush=True,
            )
            # after every stage: a size that fails later keeps what it measured (--resume)
            results_path.write_text(json.dumps({str(k): v for k, v in sorted(results.items())}))
        if not args.keep:
            shutil.rmtree(work)

    sizes = sorted(results)
    lines = [
        "| interactions | users × items | stage | wall s | rows/s | peak RSS MiB |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for n in sizes:
        users, items = log_shape(n)
        for stage in STAGES:
            r = results[n][stage]
            lines.append(
                f"| {n:,} | {users:,} × {items:,} | {stage} | {r['wall']:,.1f} | "
                f"{r['rows'] / r['wall']:,.0f} | {r['peak_rss_mib']:,.0f} |"
            )
    if len(sizes) > 1:
        # the fit over all sizes, and between the two largest, where fixed costs (start-up,
        # imports, the evaluated sample) weigh least
        a, b = sizes[-2], sizes[-1]
        lines += [
            "",
            f"| stage | k over all sizes (time ∝ N^k) | k from {a:,} to {b:,} |",
            "|---|---:|---:|",
        ]
        for stage in (*STAGES, "total"):
            seconds = [
                sum(results[n][s]["wall"] for s in STAGES)
                if stage == "total"
                else results[n][stage]["wall"]
                for n in sizes
            ]
            last_two = growth_exponent([a, b], seconds[-2:])
            lines.append(f"| {stage} | {growth_exponent(sizes, seconds):.2f} | {last_two:.2f} |")
        plot(results, args.figure)
    table = "\n".join(lines)
    print()
    print(table)
    (args.out / "scale.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
