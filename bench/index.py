"""ANN quality and latency: FAISS and Milvus Lite index settings against exact search, side by side.

On Gowalla's 40,981 items (iALS, 64 factors; see serving_setup.py), for each index setting:
build seconds, recall@10 of its top 10 against the exact (flat) top 10 for a sample of users,
their seen items excluded as the service does, and the latency of one query at a time (p50,
p99) and queries/s, in this process, one setting after the other. Prints a table and writes it
to bench/out/index.md.

    python bench/index.py --users 2000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serving_setup import gowalla_run  # noqa: E402

SETTINGS = [
    ("faiss", "flat", {}),
    ("faiss", "hnsw", {"m": 32, "ef_search": 32}),
    ("faiss", "hnsw", {"m": 32, "ef_search": 64}),
    ("faiss", "hnsw", {"m": 32, "ef_search": 128}),
    ("faiss", "hnsw", {"m": 32, "ef_search": 256}),
    ("faiss", "ivf", {"nlist": 256, "nprobe": 4}),
    ("faiss", "ivf", {"nlist": 256, "nprobe": 16}),
    ("faiss", "ivf", {"nlist": 256, "nprobe": 64}),
    ("milvus", "flat", {}),
    ("milvus", "hnsw", {"m": 32, "ef_search": 64}),
    ("milvus", "hnsw", {"m": 32, "ef_search": 128}),
    ("milvus", "ivf", {"nlist": 128, "nprobe": 8}),
    ("milvus", "ivf", {"nlist": 128, "nprobe": 32}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2000, help="queries per setting")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()

    import faiss

    from recscale.index import export_index
    from recscale.service import ServedModel

    faiss.omp_set_num_threads(1)  # one query at a time, as a service answers them
    work = args.out / "serving"
    run_dir = gowalla_run(work)
    served = ServedModel.load(run_dir)  # histories, for the exclusions
    rng = np.random.default_rng(0)
    users = rng.choice(served.index.info.n_users, args.users, replace=False)
    exclude = [served.user_history(int(u)) for u in users]
    queries = served.index.user_vectors(users)
    _, truth = served.index.search(queries, args.k, exclude)

    rows = []
    scratch = work / "indexes"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for n, (backend, kind, params) in enumerate(SETTINGS):
        target = scratch / (f"{n}.db" if backend == "milvus" else f"{n}.faiss")
        t0 = time.perf_counter()
        index = export_index(run_dir, target, kind=kind, params=params)
        build = time.perf_counter() - t0
        found = np.empty_like(truth)
        latencies = np.empty(len(users))
        start = time.perf_counter()
        for i in range(len(users)):
            t0 = time.perf_counter()
            found[i] = index.search(queries[i : i + 1], args.k, [exclude[i]])[1][0]
            latencies[i] = time.perf_counter() - t0
        total = time.perf_counter() - start
        index.close()
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth, strict=True)])
        label = ", ".join(f"{k}={v}" for k, v in index.info.params.items()) or "exact"
        rows.append(
            {
                "index": f"{'FAISS' if backend == 'faiss' else 'Milvus Lite'} {kind}",
                "params": label,
                "build": build,
                "recall": recall,
                "p50": np.percentile(latencies, 50) * 1e3,
                "p99": np.percentile(latencies, 99) * 1e3,
                "qps": len(users) / total,
            }
        )
        r = rows[-1]
        print(
            f"{r['index']:<18} {r['params']:<28} build {r['build']:6.1f}s  recall@{args.k} "
            f"{r['recall']:.3f}  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  {r['qps']:,.0f} q/s",
            flush=True,
        )
    shutil.rmtree(scratch, ignore_errors=True)

    exact = {r["index"].split()[0]: r["qps"] for r in rows if r["params"] == "exact"}
    lines = [
        f"| index | parameters | build s | recall@{args.k} vs exact | p50 ms | p99 ms | "
        "queries/s | speed vs exact of its store |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = exact[r["index"].split()[0]]
        lines.append(
            f"| {r['index']} | {r['params']} | {r['build']:.1f} | {r['recall']:.3f} | "
            f"{r['p50']:.2f} | {r['p99']:.2f} | {r['qps']:,.0f} | {r['qps'] / base:.1f}× |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    (args.out / "index.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
