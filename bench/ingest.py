"""Ingest throughput and peak memory: recscale's DuckDB and Spark engines against pandas, side by side.

Generates a CSV of N interaction rows (string ids, unix times, ratings, some repeated pairs), then
runs, each in its own process so peak memory is its own:

- recscale (DuckDB): ``ingest(engine="duckdb")`` (validation, quarantine, dedupe keep-last, id maps,
  quality report, Parquet);
- recscale (Spark):  the same with ``engine="spark"`` on ``local[N]`` (``--spark-cores``), same output;
- pandas:            ``read_csv`` + ``drop_duplicates(keep="last")`` + ``to_parquet`` (what a user
  would write by hand, with none of the validation or id mapping).

Peak memory is the largest sum of the resident sets of the process and its children (the Spark JVM
is a child of the Python driver), sampled every 0.2 s with psutil. Prints a table with rows/s, peak
memory and the ratios to pandas, and writes it to bench/out/ingest.md.

    python bench/ingest.py --rows 10000000            # all three
    python bench/ingest.py --rows 100000000 --engines duckdb,spark
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.csv as pacsv

HERE = Path(__file__).resolve().parent

RECSCALE = """
import sys
from recscale.config import IngestConfig
from recscale.ingest import ingest
config = IngestConfig(format="csv", user_col="user_id", item_col="item_id", time_col="timestamp",
                      value_col="rating", dedupe="keep-last", memory_limit=sys.argv[3])
spark = None
if sys.argv[4] == "spark":
    from recscale.ingest.spark_engine import spark_session
    spark = spark_session(f"local[{sys.argv[5]}]")
    # the driver only plans; executors (threads of the JVM in local mode) get the memory
    spark.sparkContext.setLogLevel("ERROR")
result = ingest([sys.argv[1]], sys.argv[2], config, progress=True, engine=sys.argv[4], spark=spark)
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
    """Run ``code`` in a fresh interpreter; return (seconds, peak RSS in MiB with children, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    peak = 0
    watched = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            family = [watched, *watched.children(recursive=True)]
            rss = 0
            for p in family:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    rss += p.memory_info().rss
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    out = proc.stdout.read() if proc.stdout else ""
    proc.wait()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed with exit code {proc.returncode}")
    return seconds, peak / 2**20, out.strip()


ENGINES = {"duckdb": "recscale (DuckDB)", "spark": "recscale (Spark)", "pandas": "pandas"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--memory-limit", default="2GB", help="DuckDB memory limit for recscale")
    parser.add_argument(
        "--engines",
        default="duckdb,spark,pandas",
        help="comma-separated: duckdb, spark, pandas (ratios are to pandas when it runs)",
    )
    parser.add_argument("--spark-cores", type=int, default=2, help="Spark runs on local[N]")
    parser.add_argument("--workdir", default=str(HERE / "out" / "ingest-work"))
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        parser.error(f"--engines: unknown {unknown}; expected some of {', '.join(ENGINES)}")
    if args.rows < 1 or args.spark_cores < 1:
        parser.error("--rows and --spark-cores must be positive")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    csv = work / f"interactions-{args.rows}.csv"
    if not csv.exists():
        t0 = time.perf_counter()
        print(f"generating {args.rows:,} rows into {csv} ...", flush=True)
        generate_csv(csv, args.rows)
        print(
            f"generated {csv} ({csv.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t0:.1f} s"
        )

    results = []
    for engine in engines:
        name = ENGINES[engine]
        target = work / f"out-{engine}"
        shutil.rmtree(target, ignore_errors=True)
        print(f"{name}: running ...", flush=True)
        if engine == "pandas":
            seconds, rss, out = run_measured(PANDAS, str(csv), str(target))
        else:
            seconds, rss, out = run_measured(
                RECSCALE, str(csv), str(target), args.memory_limit, engine, str(args.spark_cores)
            )
        kept = int(out.splitlines()[-1])
        results.append((name, seconds, rss, kept))
        print(f"{name}: {seconds:.1f} s, peak RSS {rss:,.0f} MiB, {kept:,} rows kept", flush=True)

    base = next((r for r in results if r[0] == "pandas"), results[0])
    lines = [
        f"Ingest of a generated {args.rows:,}-row CSV ({csv.stat().st_size / 2**20:,.0f} MiB), "
        f"{os.cpu_count()} cores, one run, side by side (Spark on local[{args.spark_cores}], DuckDB "
        f"memory_limit {args.memory_limit}; peak RSS includes child processes):",
        "",
        f"| engine | wall s | rows/s | peak RSS MiB | speed vs {base[0]} | memory vs {base[0]} "
        "| rows kept |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, seconds, rss, kept in results:
        lines.append(
            f"| {name} | {seconds:.1f} | {args.rows / seconds:,.0f} | {rss:,.0f} | "
            f"{base[1] / seconds:.2f}x | {rss / base[2]:.2f}x | {kept:,} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "ingest.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
