#!/usr/bin/env python3
"""Connection rate of tcpfwd with 1 worker vs N workers (``[global] workers``).

    python bench/workers.py [--workers 1,2,2s] [--repeat 3] [--duration 5] [--connections 16]

A count with an ``s`` (``2s``) sets ``reuse_port = false``: one accept queue per address
shared by the workers, instead of one per worker with SO_REUSEPORT.

wrk, one request per connection (``Connection: close``), through tcpfwd to an nginx
HTTP backend, as the ``short`` scenario of bench/run.py. The load (wrk) and the backend
are pinned to CPU 1; tcpfwd is pinned to nothing, whatever the worker count, so that
more workers can use both CPUs (pinning them to one would defeat the purpose) — which
also means they compete with the load for CPU 1, as a proxy sharing its host would.
Counts are interleaved run by run; prints the median (min-max) connections/s, the ratio
to the first count, and the CPU time of tcpfwd's whole process tree per connection and
per wall second (1.0 = one CPU busy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run as bench_run  # bench/run.py: processes, nginx backend, wrk, CPU accounting


def tcpfwd_config(workdir: Path, contender: str, listen: int, backend: int) -> Path:
    config = workdir / f"tcpfwd-{contender}.toml"
    shared = contender.endswith("s")
    config.write_text(
        f"""\
[global]
grace_period = "1s"
workers = {contender.rstrip("s")}
reuse_port = {str(not shared).lower()}
access_log = "off"

[services.short]
listen = ["{bench_run.HOST}:{listen}"]
backends = ["{bench_run.HOST}:{backend}"]
"""
    )
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,2s", help="worker counts to compare")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16, help="wrk -c")
    args = parser.parse_args()
    counts = args.workers.split(",")
    os.sched_setaffinity(0, {bench_run.LOAD_CPU})
    env = bench_run.tcpfwd_env()
    rates: dict[str, list[float]] = {n: [] for n in counts}
    cpu_per_conn: dict[str, list[float]] = {n: [] for n in counts}
    cpu_load: dict[str, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="tcpfwd-workers-bench-") as tmp:
        workdir = Path(tmp)
        pinned = bench_run.Processes(workdir, pin=True)
        # tcpfwd: no taskset, and this script's own affinity (CPU 1) must not be inherited.
        free = bench_run.Processes(workdir, pin=False)
        bench = bench_run.Bench(args, workdir, pinned, {"nginx"}, env)
        try:
            bench_run.start_http_backend(bench)
            for repeat in range(args.repeat):
                order = counts[repeat % len(counts) :] + counts[: repeat % len(counts)]
                for workers in order:
                    port = bench_run.free_port()
                    config = tcpfwd_config(workdir, workers, port, bench.http_port)
                    argv = [
                        "taskset",
                        "-c",
                        f"0-{(os.cpu_count() or 1) - 1}",
                        sys.executable,
                        "-m",
                        "tcpfwd",
                        "run",
                        "--config",
                        str(config),
                    ]
                    process = free.start(argv, cpu=0, env=env)
                    try:
                        bench_run.wait_listening(process, [port], f"tcpfwd {workers}w")
                        # Every worker up (they print "ready" as they come).
                        time.sleep(0.5 + 0.3 * int(workers.rstrip("s")))
                        before = bench_run.cpu_seconds(process.pid)
                        started = time.monotonic()
                        result = run_wrk(bench, port, args.duration, args.connections)
                        wall = time.monotonic() - started
                        used = bench_run.cpu_seconds(process.pid) - before
                    finally:
                        free.stop(process)
                    rates[workers].append(result["rps"])
                    cpu_per_conn[workers].append(used / result["requests"] * 1e6)
                    cpu_load[workers].append(used / wall)
                    print(
                        f"run {repeat + 1} workers={workers}: {result['rps']:,.0f} conn/s, "
                        f"{used / wall:.2f} CPUs, errors {result.get('errors', 0):.0f}",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            free.stop_all()
            pinned.stop_all()
    base = statistics.median(rates[counts[0]])
    print(
        f"wrk -t1 -c{args.connections} -d{args.duration:.0f}s Connection: close, "
        f"median (min-max) of {args.repeat}; load and backend on CPU 1, tcpfwd unpinned"
    )
    print()
    print("| workers | connections/s | ratio | tcpfwd CPU us/conn | tcpfwd CPUs busy |")
    print("| --- | --- | --- | --- | --- |")
    for workers in counts:
        median = statistics.median(rates[workers])
        print(
            f"| {workers} | {median:,.0f} ({min(rates[workers]):,.0f}-{max(rates[workers]):,.0f})"
            f" | x{median / base:.2f} | {statistics.median(cpu_per_conn[workers]):.0f}"
            f" | {statistics.median(cpu_load[workers]):.2f} |"
        )
    return 0


def run_wrk(
    bench: bench_run.Bench, port: int, duration: float, connections: int
) -> dict[str, float]:
    argv = ["taskset", "-c", str(bench_run.LOAD_CPU), "wrk", "-t1", f"-c{connections}"]
    argv += [f"-d{max(1, round(duration))}s", "-H", "Connection: close"]
    argv.append(f"http://{bench_run.HOST}:{port}/")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    result = bench_run.parse_wrk(done.stdout)
    if done.returncode != 0 or "requests" not in result:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    return result


if __name__ == "__main__":
    sys.exit(main())
