"""Load test of `recscale serve` on loopback: requests/s and latency at concurrency 1, 16 and 64.

On Gowalla (29,858 users, 40,981 items; iALS with 64 factors, see serving_setup.py), for each
index — FAISS exact, FAISS IVF (recall@10 0.92, see bench/index.py), Milvus Lite — the service is started the way users start it
(``recscale serve --run R --index I``, one uvicorn process) and `wrk` sends
``GET /v1/users/{random user}/recommendations?k=10`` with the API key, over keep-alive
connections: a fixed number of requests per concurrency level (``--requests``), with a time cap
(``--seconds``), after a warm-up. Errors are socket errors plus non-200 answers. Prints a table
and writes it to bench/out/serve.md.

wrk is Debian's ``wrk`` package (``apt-get install wrk``); it runs on one thread, so the service
and the load generator share the machine's cores, as on a laptop.

    python bench/serve.py --requests 20000
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serving_setup import gowalla_run  # noqa: E402

KEY = "bench-key"

# each wrk thread stops after its share of the requests; done() prints one JSON line
LUA = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } recscale_timespec;
int clock_gettime(int clock, recscale_timespec *t);
]]
local clock = ffi.new("recscale_timespec")
local function now()
  ffi.C.clock_gettime(1, clock)  -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) * 1e-9
end
local ids = {%(ids)s}
local limit = %(limit)d
local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) count = 0; started = now(); finished = 0 end
request = function()
  local user = ids[math.random(#ids)]
  return wrk.format("GET", "/v1/users/" .. user .. "/recommendations?k=10", {["X-API-Key"] = "%(key)s"})
end
response = function(status, headers, body)
  count = count + 1
  finished = now()
  if count == limit then wrk.thread:stop() end
end
done = function(summary, latency, requests)
  local t = threads[1]
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "seconds": %%f, "p50": %%f, "p95": %%f, "p99": %%f, "socket_errors": %%d, "non_2xx": %%d}\n',
    t:get("count"), t:get("finished") - t:get("started"), latency:percentile(50) / 1e3,
    latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(run_dir: Path, index: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    recscale = Path(sys.executable).with_name("recscale")
    command = [str(recscale), "serve", "--run", str(run_dir), "--index", str(index)]
    command += ["--port", str(port), "--api-key", KEY, "--log-level", "warning"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"recscale serve exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("recscale serve did not become ready in 120 s")


def load(url: str, script: Path, concurrency: int, seconds: int) -> dict:
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "5s"]
    command += ["-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = re.search(r"^\{.*\}$", out, re.MULTILINE)
    if match is None:
        raise SystemExit(f"wrk printed no summary:\n{out}")
    return json.loads(match.group(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="per concurrency level")
    parser.add_argument("--seconds", type=int, default=30, help="time cap per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")

    work = args.out / "serving"
    run_dir = gowalla_run(work)
    users = pq.read_table(work / "gowalla" / "users.parquet", columns=["user_id"]).column("user_id")
    ids = ",".join(json.dumps(str(u)) for u in users.to_pylist())
    indexes = [
        ("FAISS flat (exact)", work / "flat.faiss", "flat", {}),
        (
            "FAISS IVF (nlist=256, nprobe=16)",
            work / "ivf.faiss",
            "ivf",
            {"nlist": 256, "nprobe": 16},
        ),
        ("Milvus Lite flat (exact)", work / "milvus.db", "flat", {}),
    ]
    rows = []
    for label, target, kind, params in indexes:
        # as users do it, in its own process: Milvus Lite lets one process open a file at a time
        command = [str(Path(sys.executable).with_name("recscale")), "export", "--run", str(run_dir)]
        command += ["--index", str(target), "--kind", kind]
        command += [arg for k, v in params.items() for arg in ("--param", f"{k}={v}")]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        proc, url = start_service(run_dir, target)
        try:
            for concurrency in args.concurrency:
                script = work / f"load-{concurrency}.lua"
                warm = work / "warm.lua"
                warm.write_text(LUA % {"ids": ids, "limit": max(200, concurrency * 10), "key": KEY})
                load(url, warm, concurrency, 5)
                script.write_text(LUA % {"ids": ids, "limit": args.requests, "key": KEY})
                r = load(url, script, concurrency, args.seconds)
                r.update(index=label, concurrency=concurrency, rate=r["requests"] / r["seconds"])
                rows.append(r)
                print(
                    f"{label:<34} c={concurrency:<3} {r['rate']:8,.0f} req/s  p50 {r['p50']:6.2f} ms  "
                    f"p95 {r['p95']:6.2f} ms  p99 {r['p99']:6.2f} ms  errors "
                    f"{r['socket_errors'] + r['non_2xx']} ({r['requests']:,} requests)",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)

    lines = [
        "| index | concurrency | requests | requests/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['index']} | {r['concurrency']} | {r['requests']:,} | {r['rate']:,.0f} | "
            f"{r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | "
            f"{r['socket_errors'] + r['non_2xx']} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    (args.out / "serve.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
