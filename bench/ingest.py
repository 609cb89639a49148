"""Ingest throughput and peak memory: recscale (DuckDB engine) against pandas, side by side.

Generates a CSV of N interaction rows (string ids, unix times, ratings, some repeated pairs), then
runs, each in its own process so peak RSS is its own:

- recscale: ``recscale.ingest.ingest`` (validation, quarantine, dedupe keep-last, id maps, Parquet);
- pandas:   ``read_csv`` + ``drop_duplicates(keep="last")`` + ``to_parquet`` (what a user would write
            by hand, with none of the validation or id mapping).

Prints a table with rows/s, peak RSS and the ratio to pandas, and writes it to bench/out/ingest.md.

    python bench/ingest.py --rows 10000000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

HERE = Path(__file__).resolve().parent

RECSCALE = """
import sys
from recscale.config import IngestConfig
from recscale.ingest import ingest
config = IngestConfig(format="csv", user_col="user_id", item_col="item_id", time_col="timestamp",
                      value_col="rating", dedupe="keep-last", memory_limit=sys.argv[3])
result = ingest([sys.argv[1]], sys.argv[2], config, progress=False)
print(result.dataset.manifest.n_interactions)
"""

PANDAS = """
import sys
import pandas as pd
df = pd.read_csv(sys.argv[1], dtype={"user_id": str, "item_id": str})
df = df.drop_duplicates(["user_id", "item_id"], keep="last")
df.to_parquet(sys.argv[2] + ".parquet", index=False)
print(len(df))
"""


def generate_csv(path: Path, rows: int, seed: int = 0) -> None:
    """Write ``rows`` rows in chunks so generating 100M rows needs little memory."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(rows // 20, 10), max(rows // 50, 10)
    chunk = 2_000_000
    options = pacsv.WriteOptions(include_header=True)
    with pacsv.CSVWriter(
        path,
        pa.schema(
            [
                ("user_id", pa.string()),
                ("item_id", pa.string()),
                ("timestamp", pa.int64()),
                ("rating", pa.float32()),
            ]
        ),
        write_options=options,
    ) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            users = rng.integers(0, n_users, n)
            # skewed item popularity: a few hits, a long tail
            items = (n_items * rng.random(n) ** 3).astype(np.int64)
            writer.write_table(
                pa.table(
                    {
                        "user_id": pa.array(np.char.add("u", users.astype(str))),
                        "item_id": pa.array(np.char.add("i", items.astype(str))),
                        "timestamp": pa.array(1_500_000_000 + rng.integers(0, 10**8, n)),
                        "rating": pa.array(rng.integers(1, 11, n).astype(np.float32) / 2),
                    }
                )
            )


def run_measured(code: str, *args: str) -> tuple[float, float, str]:
    """Run ``code`` in a fresh interpreter; return (seconds, peak RSS in MiB, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out = proc.stdout.read() if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed with exit code {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024, out.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--memory-limit", default="2GB", help="DuckDB memory limit for recscale")
    parser.add_argument("--workdir", default=str(HERE / "out" / "ingest-work"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    csv = work / f"interactions-{args.rows}.csv"
    if not csv.exists():
        t0 = time.perf_counter()
        generate_csv(csv, args.rows)
        print(
            f"generated {csv} ({csv.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t0:.1f} s"
        )

    results = []
    for name, code in (("recscale (DuckDB)", RECSCALE), ("pandas", PANDAS)):
        target = str(work / f"out-{name.split()[0]}")
        seconds, rss, out = run_measured(code, str(csv), target, args.memory_limit)
        results.append((name, seconds, rss, int(out.splitlines()[-1])))
        print(f"{name}: {seconds:.1f} s, peak RSS {rss:,.0f} MiB, {out.splitlines()[-1]} rows kept")

    pandas_s, pandas_rss = results[1][1], results[1][2]
    lines = [
        f"Ingest of a generated {args.rows:,}-row CSV ({csv.stat().st_size / 2**20:,.0f} MiB), "
        f"{os.cpu_count()} cores, one run, side by side:",
        "",
        "| engine | wall s | rows/s | peak RSS MiB | speed vs pandas | memory vs pandas | rows kept |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, seconds, rss, kept in results:
        lines.append(
            f"| {name} | {seconds:.1f} | {args.rows / seconds:,.0f} | {rss:,.0f} | "
            f"{pandas_s / seconds:.2f}x | {rss / pandas_rss:.2f}x | {kept:,} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "ingest.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
