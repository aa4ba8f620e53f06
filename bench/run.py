#!/usr/bin/env python3
"""tcpfwd vs HAProxy vs nginx vs a direct connection, on loopback.

    python bench/run.py [--quick] [--scenarios short,keepalive,bulk,idle,failover]
                        [--repeat 3] [--duration 5] [--json FILE] [--install]

Builds every scenario on 127.0.0.1 from generated configs in a temporary directory,
pins the proxy to CPU 0 and everything else (load generators, backends, this script)
to CPU 1, interleaves the contenders run by run, and prints a markdown table of
median (min-max) over the repeats with the ratio to HAProxy of the same run.

Scenarios:
  short      wrk, one request per connection (Connection: close) to an nginx HTTP
             backend: proxy CPU us per connection (utime+stime of the proxy's whole
             process tree from /proc/PID/stat) and connections/s.
  keepalive  wrk over persistent connections: requests/s, latency p50 and p99.
  bulk       iperf3 to and from (-R) an iperf3 server: Gbit/s and proxy CPU s per GB.
  idle       N idle proxied connections held by a separate process: proxy RSS growth
             per connection (N=9000 by default: the proxy needs two descriptors per
             connection and the machine's hard limit is 20,000).
  failover   first backend refusing / blackholed, second one good: added latency per
             connection vs the direct path (median, p99) and how many paid a timeout.

Nothing here leaves the loopback interface, every load is bounded in count and time,
and every process started is stopped by its own process group on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
HOST = "127.0.0.1"
PROXY_CPU = 0
LOAD_CPU = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Failover: every contender gets the same per-attempt connect timeout, and a connection
# "paid a timeout" when it took most of it.
CONNECT_TIMEOUT = 1.0
TIMEOUT_PAID = 0.9 * CONNECT_TIMEOUT

SCENARIOS = ("short", "keepalive", "bulk", "idle", "failover")
# The contenders of the throughput scenarios, and those of the failover scenario (where
# splicing is irrelevant but HAProxy's health checks change the picture).
THROUGHPUT_CONTENDERS = (
    "direct",
    "tcpfwd",
    "haproxy",
    "haproxy-splice",
    "nginx",
    "python-floor",
)
# The floor forwards to one backend: it has no failover to measure.
FAILOVER_CONTENDERS = ("direct", "tcpfwd", "haproxy", "haproxy-check", "nginx")
COLUMNS = (
    "direct",
    "tcpfwd",
    "haproxy",
    "haproxy-splice",
    "haproxy-check",
    "nginx",
    "python-floor",
)
REFERENCE = "haproxy"


# --- processes ------------------------------------------------------------------------


class Processes:
    """Every process this run started, each in its own session so that stopping one
    also stops what it forked (nginx workers), and nothing else."""

    def __init__(self, workdir: Path, pin: bool) -> None:
        self.workdir = workdir
        self.pin = pin
        self.running: list[subprocess.Popen[bytes]] = []
        self._serial = 0

    def start(
        self,
        argv: Sequence[str],
        *,
        cpu: int,
        env: dict[str, str] | None = None,
        stdout: int | None = subprocess.DEVNULL,
        stdin: int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        self._serial += 1
        log = self.workdir / f"{self._serial:03d}-{Path(argv[0]).name}.stderr"
        command = ["taskset", "-c", str(cpu), *argv] if self.pin else list(argv)
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                command,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=env,
                start_new_session=True,
            )
        process.stderr_path = log  # type: ignore[attr-defined]
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if process in self.running:
            self.running.remove(process)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        # Workers of a stopped master (nginx) may outlive it for a moment.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()

    def stop_all(self) -> None:
        for process in list(reversed(self.running)):
            self.stop(process, grace=2.0)


def stderr_tail(process: subprocess.Popen[bytes]) -> str:
    path: Path = process.stderr_path  # type: ignore[attr-defined]
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """The root and all its descendants (an nginx master and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(root: int) -> float:
    """utime + stime of a process tree, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    ticks = 0
    for pid in process_tree(root):
        fields = _proc_stat(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def rss_bytes(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def listening_ports() -> set[int]:
    """Ports with a listening TCP socket. From `ss`, which asks the kernel for listeners
    only: /proc/net/tcp also lists every TIME_WAIT socket, tens of thousands after the
    short-connection scenario, and reading it costs whole seconds of CPU."""
    done = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, timeout=10, check=True)
    ports = set()
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            ports.add(int(fields[3].rsplit(":", 1)[1]))
    return ports


def wait_listening(process: subprocess.Popen[bytes], ports: Sequence[int], what: str) -> None:
    # Readiness from the kernel's socket table rather than a probe connection: a probe
    # would itself be proxied, and in the failover scenario would start a dial.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{stderr_tail(process)}")
        if set(ports) <= listening_ports():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {list(ports)} within 15 s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


# --- contenders -----------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One listener of a proxy and the backends it tries, in order."""

    name: str
    listen: int
    backends: tuple[int, ...]


@dataclass
class Tuning:
    """Scenario-dependent limits: the idle scenario needs room for thousands of sessions."""

    max_connections: int = 2000


def tcpfwd_argv(route: Route, workdir: Path, tuning: Tuning) -> list[str]:
    backends = ", ".join(f'"{HOST}:{port}"' for port in route.backends)
    config = workdir / f"tcpfwd-{route.name}.toml"
    config.write_text(
        f"""\
[global]
grace_period = "1s"

[services.{route.name}]
listen = ["{HOST}:{route.listen}"]
backends = [{backends}]
connect_timeout = "{CONNECT_TIMEOUT}s"
"""
    )
    return [sys.executable, "-m", "tcpfwd", "run", "--config", str(config)]


def haproxy_argv(
    route: Route, workdir: Path, tuning: Tuning, *, splice: bool = False, check: bool = False
) -> list[str]:
    # Without checks, ordered failover in HAProxy is `balance first` (always the first
    # server) plus `option redispatch 1` so that the one retry goes to another server.
    # With checks, the dead first server is taken out of rotation by the checker.
    servers = "\n".join(
        f"    server s{i} {HOST}:{port}" + (" check inter 1s" if check else "")
        for i, port in enumerate(route.backends)
    )
    failover = "    balance first\n    retries 1\n    option redispatch 1\n"
    # Splicing costs two descriptors per pipe and HAProxy reserves maxconn/4 pipes by
    # default, which no longer fits the descriptor limit in the idle scenario; 512 pipes
    # (the default at maxconn 2048) are plenty, as only busy transfers hold one.
    maxpipes = "    maxpipes 512\n" if splice else ""
    config = workdir / f"haproxy-{route.name}.cfg"
    config.write_text(
        f"""\
global
    nbthread 1
    maxconn {tuning.max_connections}
{maxpipes}
defaults
    mode tcp
    timeout connect {int(CONNECT_TIMEOUT * 1000)}ms
    timeout client 120s
    timeout server 120s
{"    option splice-auto" if splice else ""}

frontend f_{route.name}
    bind {HOST}:{route.listen}
    default_backend b_{route.name}

backend b_{route.name}
{failover if len(route.backends) > 1 else ""}{servers}
"""
    )
    return ["haproxy", "-db", "-f", str(config)]


def nginx_stream_argv(route: Route, workdir: Path, tuning: Tuning) -> list[str]:
    # Ordered failover in nginx: the second server is a backup; the first is marked
    # failed for fail_timeout after one failure (nginx's passive health, its default).
    servers = "\n".join(
        f"        server {HOST}:{port}"
        + (" max_fails=1 fail_timeout=10s;" if i == 0 else " backup;")
        for i, port in enumerate(route.backends)
    )
    prefix = workdir / f"nginx-{route.name}"
    prefix.mkdir(exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(
        f"""\
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
worker_processes 1;
worker_rlimit_nofile {2 * tuning.max_connections + 100};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections {2 * tuning.max_connections + 50};
}}
stream {{
    upstream u_{route.name} {{
{servers}
    }}
    server {{
        listen {HOST}:{route.listen};
        proxy_pass u_{route.name};
        proxy_connect_timeout {int(CONNECT_TIMEOUT * 1000)}ms;
        proxy_timeout 120s;
    }}
}}
"""
    )
    return ["nginx", "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]


def python_floor_argv(route: Route, workdir: Path, tuning: Tuning) -> list[str]:
    # The leanest forwarder CPython can be (no features at all): what a Python data
    # path costs per connection and per idle session, measured beside tcpfwd.
    floor = BENCH_DIR / "floor_proxy.py"
    return [sys.executable, str(floor), str(route.listen), f"{HOST}:{route.backends[-1]}"]


ContenderFactory = Callable[[Route, Path, Tuning], list[str]]
CONTENDERS: dict[str, ContenderFactory] = {
    "tcpfwd": tcpfwd_argv,
    "haproxy": haproxy_argv,
    "haproxy-splice": lambda r, w, t: haproxy_argv(r, w, t, splice=True),
    "haproxy-check": lambda r, w, t: haproxy_argv(r, w, t, check=True),
    "nginx": nginx_stream_argv,
    "python-floor": python_floor_argv,
}
# What each contender is, for the notes under the table.
CONTENDER_NOTES = {
    "direct": "no proxy: the load talks to the backend itself (the baseline)",
    "tcpfwd": "`python -m tcpfwd run` with a generated TOML (uvloop, access log to /dev/null)",
    "haproxy": "HAProxy `nbthread 1`, mode tcp, no logging; failover: `balance first`, "
    "`retries 1`, `option redispatch 1`, no health checks",
    "haproxy-splice": "as haproxy, plus `option splice-auto` and `maxpipes 512`",
    "haproxy-check": "as haproxy (failover), plus `check inter 1s` on both servers; measured "
    "after a 2.5 s warm-up so the first check has run",
    "nginx": "nginx stream, `worker_processes 1`; failover: first server `max_fails=1 "
    "fail_timeout=10s`, second `backup` (passive health, nginx's default behaviour)",
    "python-floor": "`bench/floor_proxy.py`: raw non-blocking sockets and one epoll in "
    "CPython, no features (no timeouts, failover, logging); the floor of a Python data path",
}


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    processes: Processes
    available: set[str]
    env: dict[str, str]
    http_port: int = 0
    iperf_port: int = 0
    current_scenario: str = ""
    # (scenario, figure) -> contender -> one value per repeat, in insertion order so the
    # table lists figures in the order the scenarios produce them.
    results: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=dict)

    def record(self, figure: str, contender: str, value: float) -> None:
        key = (self.current_scenario, figure)
        self.results.setdefault(key, {}).setdefault(contender, []).append(value)

    @contextlib.contextmanager
    def proxy(
        self, contender: str, backends: Sequence[int], tuning: Tuning | None = None
    ) -> Iterator[tuple[int, subprocess.Popen[bytes] | None]]:
        """Start a contender proxying a fresh port to `backends`; yield (port, process).
        The direct contender starts nothing and yields the last backend (in the failover
        scenario, the good one)."""
        if contender == "direct":
            yield backends[-1], None
            return
        route = Route(self.current_scenario, free_port(), tuple(backends))
        argv = CONTENDERS[contender](route, self.workdir, tuning or Tuning())
        process = self.processes.start(argv, cpu=PROXY_CPU, env=self.env)
        try:
            wait_listening(process, [route.listen], contender)
            yield route.listen, process
        finally:
            self.processes.stop(process)

    def contenders(self, names: Sequence[str], repeat: int) -> list[str]:
        # Rotate the starting contender each repeat so that no one always runs first
        # (cold caches) or last (warmest machine, most TIME_WAIT sockets).
        present = [n for n in names if n == "direct" or n.split("-")[0] in self.available]
        shift = repeat % len(present)
        return present[shift:] + present[:shift]


# --- load generators ------------------------------------------------------------------

_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_wrk(output: str) -> dict[str, float]:
    """requests, requests/s and latency percentiles (ms) from wrk's text report."""
    result: dict[str, float] = {}
    if match := re.search(r"^\s*(\d+) requests in", output, re.MULTILINE):
        result["requests"] = float(match.group(1))
    if match := re.search(r"^Requests/sec:\s*([\d.]+)", output, re.MULTILINE):
        result["rps"] = float(match.group(1))
    for pct, value, unit in re.findall(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M):
        result[f"p{pct}"] = float(value) * _WRK_UNITS[unit]
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        result["errors"] = float(sum(int(g) for g in match.groups()))
    return result


def run_wrk(bench: Bench, port: int, duration: float, *, close: bool) -> dict[str, float]:
    argv = ["wrk", "-t1", "-c16", f"-d{max(1, round(duration))}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{HOST}:{port}/")
    if bench.processes.pin:
        argv = ["taskset", "-c", str(LOAD_CPU), *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    result = parse_wrk(done.stdout)
    if done.returncode != 0 or "requests" not in result:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    return result


def run_iperf3(bench: Bench, port: int, duration: float, *, reverse: bool) -> tuple[float, int]:
    """(bits/s, bytes) received, measured by iperf3 through `port`."""
    argv = ["iperf3", "-c", HOST, "-p", str(port), "-t", str(max(1, round(duration))), "-J"]
    if reverse:
        argv.append("-R")
    if bench.processes.pin:
        argv = ["taskset", "-c", str(LOAD_CPU), *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    try:
        received = json.loads(done.stdout)["end"]["sum_received"]
    except (ValueError, KeyError) as error:
        raise RuntimeError(f"iperf3 failed ({done.returncode}): {done.stdout[-1500:]}") from error
    return float(received["bits_per_second"]), int(received["bytes"])


async def _one_request(port: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        response = await reader.read()
    finally:
        writer.close()
    if not response.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected response {response[:40]!r}")
    return time.perf_counter() - started


async def _latencies(port: int, count: int, rate: float) -> tuple[list[float], int]:
    """Latency of `count` connections (connect + one request/response) started at a fixed
    `rate` per second, whatever the earlier ones are doing: an open loop, as real clients
    arrive, so a slow connection delays no other and the whole run lasts count/rate
    seconds plus the slowest connection. One failing or taking over 10 s counts as failed."""

    async def measured() -> float | None:
        try:
            return await asyncio.wait_for(_one_request(port), 10)
        except (TimeoutError, OSError):
            return None

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(measured()))
    results = await asyncio.gather(*tasks)
    latencies = [t for t in results if t is not None]
    return latencies, len(results) - len(latencies)


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# --- scenarios ------------------------------------------------------------------------


def scenario_short(bench: Bench, repeat: int) -> None:
    for contender in bench.contenders(THROUGHPUT_CONTENDERS, repeat):
        with bench.proxy(contender, [bench.http_port]) as (port, process):
            before = cpu_seconds(process.pid) if process else 0.0
            result = run_wrk(bench, port, bench.args.duration, close=True)
            used = cpu_seconds(process.pid) - before if process else 0.0
        bench.record("connections/s", contender, result["rps"])
        if process:
            bench.record("proxy CPU us per connection", contender, used / result["requests"] * 1e6)


def scenario_keepalive(bench: Bench, repeat: int) -> None:
    for contender in bench.contenders(THROUGHPUT_CONTENDERS, repeat):
        with bench.proxy(contender, [bench.http_port]) as (port, process):
            before = cpu_seconds(process.pid) if process else 0.0
            result = run_wrk(bench, port, bench.args.duration, close=False)
            used = cpu_seconds(process.pid) - before if process else 0.0
        bench.record("requests/s", contender, result["rps"])
        bench.record("latency p50 (ms)", contender, result["p50"])
        bench.record("latency p99 (ms)", contender, result["p99"])
        if process:
            bench.record("proxy CPU us per request", contender, used / result["requests"] * 1e6)


def scenario_bulk(bench: Bench, repeat: int) -> None:
    for contender in bench.contenders(THROUGHPUT_CONTENDERS, repeat):
        for reverse, label in ((False, "client->server"), (True, "server->client")):
            with bench.proxy(contender, [bench.iperf_port]) as (port, process):
                before = cpu_seconds(process.pid) if process else 0.0
                bits, received = run_iperf3(bench, port, bench.args.duration, reverse=reverse)
                used = cpu_seconds(process.pid) - before if process else 0.0
            bench.record(f"{label} Gbit/s", contender, bits / 1e9)
            if process:
                bench.record(f"{label} proxy CPU s per GB", contender, used / (received / 1e9))


def scenario_idle(bench: Bench, repeat: int) -> None:
    count = bench.args.idle_connections
    tuning = Tuning(max_connections=count + 100)
    loadgen = [sys.executable, str(BENCH_DIR / "loadgen.py")]
    lifetime = ["--lifetime", "300"]
    for contender in bench.contenders(THROUGHPUT_CONTENDERS, repeat):
        if contender == "direct":
            continue  # no proxy, nothing to weigh
        sink_port = free_port()
        sink = bench.processes.start(
            [*loadgen, "sink", HOST, str(sink_port), *lifetime], cpu=LOAD_CPU
        )
        try:
            wait_listening(sink, [sink_port], "idle sink")
            with bench.proxy(contender, [sink_port], tuning) as (port, process):
                assert process is not None
                time.sleep(0.3)  # let the proxy finish its start-up allocations
                before = rss_bytes(process.pid)
                holder = bench.processes.start(
                    [*loadgen, "hold", HOST, str(port), str(count), *lifetime],
                    cpu=LOAD_CPU,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                try:
                    assert holder.stdout is not None
                    line = holder.stdout.readline().decode().split()
                    if not line or line[0] != "ready":
                        raise RuntimeError(f"idle holder failed:\n{stderr_tail(holder)}")
                    opened = int(line[1])
                    time.sleep(0.5)
                    after = rss_bytes(process.pid)
                finally:
                    bench.processes.stop(holder)
            if opened < count * 0.99:
                raise RuntimeError(f"{contender}: only {opened} of {count} idle connections")
            bench.record(
                "proxy RSS KiB per connection", contender, (after - before) / opened / 1024
            )
        finally:
            bench.processes.stop(sink)


class Blackhole:
    """A listener whose accept queue is full, so that the kernel drops further SYNs and a
    connect to it hangs until the connector's own timeout: a dead host, on loopback."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(0)
        self.port: int = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        # With backlog 0 the queue holds one connection; a few more connects make sure it
        # is full (the extra ones sit in SYN_SENT, which is harmless).
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((HOST, self.port))
            self.fillers.append(filler)
        time.sleep(0.2)
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            probe.connect((HOST, self.port))
            raise RuntimeError("blackhole accepted a connection: its queue is not full")
        except TimeoutError:
            pass
        finally:
            probe.close()

    def close(self) -> None:
        for sock in [*self.fillers, self.listener]:
            sock.close()


def scenario_failover(bench: Bench, repeat: int) -> None:
    count, rate = bench.args.failover_connections, bench.args.failover_rate
    # Refusing: a port that is bound but not listening answers SYN with RST.
    refusing = socket.socket()
    refusing.bind((HOST, 0))
    blackhole = Blackhole()
    try:
        for mode, dead in (("refusing", refusing.getsockname()[1]), ("blackholed", blackhole.port)):
            baseline: float | None = None
            pending: list[tuple[str, list[float]]] = []
            for contender in bench.contenders(FAILOVER_CONTENDERS, repeat):
                with bench.proxy(contender, [dead, bench.http_port]) as (port, _process):
                    if contender == "haproxy-check":
                        time.sleep(2.5)  # the first check must have marked the server down
                    latencies, failed = asyncio.run(_latencies(port, count, rate))
                if not latencies:
                    raise RuntimeError(f"{contender} ({mode}): every connection failed")
                if contender == "direct":
                    baseline = statistics.median(latencies)
                    bench.record(f"{mode}: direct-path latency p50 (ms)", contender, baseline * 1e3)
                    continue
                timeouts = sum(1 for t in latencies if t >= TIMEOUT_PAID) + failed
                bench.record(
                    f"{mode}: connections paying a timeout (of {count})", contender, timeouts
                )
                bench.record(f"{mode}: failed connections", contender, failed)
                pending.append((contender, latencies))
            # Added latency needs the direct baseline of the same repeat, which may have
            # run after the contender (interleaving): computed once all have run.
            assert baseline is not None
            for contender, latencies in pending:
                added = [(t - baseline) * 1e3 for t in latencies]
                bench.record(f"{mode}: added latency p50 (ms)", contender, statistics.median(added))
                bench.record(f"{mode}: added latency p99 (ms)", contender, percentile(added, 99))
    finally:
        refusing.close()
        blackhole.close()


SCENARIO_RUNNERS: dict[str, Callable[[Bench, int], None]] = {
    "short": scenario_short,
    "keepalive": scenario_keepalive,
    "bulk": scenario_bulk,
    "idle": scenario_idle,
    "failover": scenario_failover,
}


# --- shared backends ------------------------------------------------------------------


def start_http_backend(bench: Bench) -> None:
    """nginx serving a small 200 with keep-alive, in its own process on the load CPU."""
    bench.http_port = free_port()
    prefix = bench.workdir / "nginx-http-backend"
    prefix.mkdir()
    config = prefix / "nginx.conf"
    config.write_text(
        f"""\
daemon off;
worker_processes 1;
worker_rlimit_nofile 8192;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {HOST}:{bench.http_port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "hello from the bench backend\\n";
        }}
    }}
}}
"""
    )
    argv = ["nginx", "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]
    process = bench.processes.start(argv, cpu=LOAD_CPU)
    wait_listening(process, [bench.http_port], "nginx HTTP backend")


def start_iperf_server(bench: Bench) -> None:
    bench.iperf_port = free_port()
    process = bench.processes.start(
        ["iperf3", "-s", "-B", HOST, "-p", str(bench.iperf_port)], cpu=LOAD_CPU
    )
    wait_listening(process, [bench.iperf_port], "iperf3 server")


# --- environment ----------------------------------------------------------------------

TOOLS = {"wrk": "short, keepalive", "iperf3": "bulk", "haproxy": "haproxy", "nginx": "nginx"}


def _first_line(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False, env=env
        )
    except OSError:
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def machine_line(env: dict[str, str]) -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = [f"nproc {os.cpu_count()}", model, f"Linux {platform.release()}"]
    if shutil.which("haproxy"):
        match = re.search(r"version (\S+)", _first_line(["haproxy", "-v"]))
        versions.append(f"HAProxy {match.group(1) if match else '?'}")
    if shutil.which("nginx"):
        versions.append(_first_line(["nginx", "-v"]).replace("nginx version: nginx/", "nginx "))
    versions.append(f"Python {platform.python_version()}")
    probe = "import tcpfwd, uvloop; print(tcpfwd.__version__, uvloop.__version__)"
    tcpfwd_version, _, uvloop_version = _first_line([sys.executable, "-c", probe], env).partition(
        " "
    )
    versions += [f"uvloop {uvloop_version or '?'}", f"tcpfwd {tcpfwd_version}"]
    commit = _first_line(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    versions.append(f"commit {commit}")
    if shutil.which("wrk"):
        versions.append(_first_line(["wrk", "-v"]).split(" [")[0])
    if shutil.which("iperf3"):
        versions.append(_first_line(["iperf3", "-v"]).split(" (")[0])
    return "Machine: " + ", ".join(versions)


def tcpfwd_env() -> dict[str, str]:
    # The tcpfwd measured is the one in this checkout, whatever is installed.
    env = dict(os.environ)
    src = str(REPO_DIR / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    return env


# --- report ---------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1000:
        return str(int(value))  # counts
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def summarize(bench: Bench) -> list[dict[str, Any]]:
    figures = []
    for (scenario, figure), by_contender in bench.results.items():
        reference = by_contender.get(REFERENCE)
        ref_median = statistics.median(reference) if reference else None
        for contender, values in by_contender.items():
            median = statistics.median(values)
            figures.append(
                {
                    "scenario": scenario,
                    "figure": figure,
                    "contender": contender,
                    "values": values,
                    "median": median,
                    "min": min(values),
                    "max": max(values),
                    # A ratio of latencies near zero or of counts that can be zero says
                    # nothing: only positive figures get one.
                    "ratio_vs_haproxy": median / ref_median
                    if ref_median and ref_median > 0 and median > 0
                    else None,
                }
            )
    return figures


def markdown_table(figures: list[dict[str, Any]], contenders: Sequence[str]) -> str:
    columns = [c for c in contenders if any(f["contender"] == c for f in figures)]
    rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for figure in figures:
        rows.setdefault((figure["scenario"], figure["figure"]), {})[figure["contender"]] = figure
    lines = [
        "| scenario | figure | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for (scenario, name), cells in rows.items():
        rendered = []
        for contender in columns:
            cell = cells.get(contender)
            if cell is None:
                rendered.append("—")
                continue
            # [min, max] rather than (min-max): ranges of added latency can be negative.
            text = f"{_fmt(cell['median'])} [{_fmt(cell['min'])}, {_fmt(cell['max'])}]"
            ratio = cell["ratio_vs_haproxy"]
            if ratio is not None and contender != REFERENCE:
                text += f" x{ratio:.2f}"
            rendered.append(text)
        lines.append(f"| {scenario} | {name} | " + " | ".join(rendered) + " |")
    return "\n".join(lines)


def _fd_hard_limit() -> str:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return "unlimited" if hard == resource.RLIM_INFINITY else f"{hard:,}"


def notes(bench: Bench, contenders: Sequence[str]) -> str:
    args = bench.args
    lines = [
        "",
        f"Each cell: median [min, max] over {args.repeat} run(s), x ratio to haproxy's median "
        "in the same run; contenders interleaved run by run.",
        f"Proxy pinned to CPU {PROXY_CPU}; wrk, iperf3, backends and the failover client on "
        f"CPU {LOAD_CPU}."
        if bench.processes.pin
        else "Not pinned: fewer than 2 CPUs.",
        f"short/keepalive: wrk -t1 -c16, {args.duration:g} s per run, nginx HTTP backend. "
        f"bulk: iperf3, {args.duration:g} s per direction. idle: "
        f"{args.idle_connections} connections held open after a 1-byte echo (a proxy needs "
        f"two descriptors per connection; this machine's hard limit is {_fd_hard_limit()} "
        "per process, hence 9,000 rather than 10,000 by default). "
        f"failover: {args.failover_connections} connections started at "
        f"{args.failover_rate:g}/s (open loop), each connect + one HTTP/1.0 request; connect "
        f"timeout {CONNECT_TIMEOUT:g} s; added latency = latency - the direct path's median "
        f"in the same run; a connection 'paid a timeout' when it took >= {TIMEOUT_PAID:g} s "
        "or failed. With passive health (nginx) the connections started during the first "
        "timeout all pay it, so that count scales with the arrival rate.",
        "",
    ]
    lines += [f"- {name}: {CONTENDER_NOTES[name]}" for name in contenders]
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        lines.append(f"- not installed, skipped: {', '.join(missing)} (run bench/install.sh)")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test sizes: 1 repeat, 1 s per figure, fewer connections",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument("--repeat", type=int, help="runs per figure (default 3, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 5, quick 1)")
    parser.add_argument(
        "--idle-connections", type=int, help="idle scenario size (default 9000, quick 500)"
    )
    parser.add_argument(
        "--failover-connections", type=int, help="failover scenario size (default 200, quick 40)"
    )
    parser.add_argument(
        "--failover-rate", type=float, default=100.0, help="failover connections started per second"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument(
        "--install", action="store_true", help="run bench/install.sh first (apt-get the tools)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "repeat": (3, 1),
        "duration": (5.0, 1.0),
        "idle_connections": (9000, 500),
        "failover_connections": (200, 40),
    }
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.repeat < 1 or args.duration <= 0 or args.idle_connections < 1:
        parser.error("--repeat, --duration and --idle-connections must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.install:
        subprocess.run(["sh", str(BENCH_DIR / "install.sh")], check=True, timeout=900)
    for tool, needed_by in TOOLS.items():
        if not shutil.which(tool):
            print(
                f"bench: {tool} not found, skipping {needed_by} (bench/install.sh installs it)",
                file=sys.stderr,
            )
    if not shutil.which("wrk"):
        args.scenarios = [s for s in args.scenarios if s not in ("short", "keepalive")]
    if not shutil.which("iperf3"):
        args.scenarios = [s for s in args.scenarios if s != "bulk"]
    # This script is the failover client and starts the load: it belongs on the load CPU,
    # and whatever it starts inherits that unless pinned elsewhere.
    pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if pin:
        os.sched_setaffinity(0, {LOAD_CPU})
    # Stop our children if we are told to stop: SIGTERM becomes SystemExit, and the
    # finally below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = tcpfwd_env()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tcpfwd-bench-") as tmp:
        processes = Processes(Path(tmp), pin)
        available = {t for t in ("haproxy", "nginx") if shutil.which(t)} | {"tcpfwd", "python"}
        bench = Bench(args, Path(tmp), processes, available, env)
        try:
            if any(s in args.scenarios for s in ("short", "keepalive", "failover")):
                start_http_backend(bench)
            if "bulk" in args.scenarios:
                start_iperf_server(bench)
            for scenario in args.scenarios:
                bench.current_scenario = scenario
                for repeat in range(args.repeat):
                    print(
                        f"bench: {scenario} run {repeat + 1}/{args.repeat} "
                        f"({time.monotonic() - started:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                    SCENARIO_RUNNERS[scenario](bench, repeat)
        finally:
            processes.stop_all()
    figures = summarize(bench)
    contenders = [c for c in COLUMNS if c == "direct" or c.split("-")[0] in bench.available]
    machine = machine_line(env)
    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(machine)
    print(f"Command: `{command.strip()}` ({time.monotonic() - started:.0f} s)")
    print()
    print(markdown_table(figures, contenders))
    print(notes(bench, contenders))
    if args.json:
        document = {
            "machine": machine,
            "command": command.strip(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "install")},
            "figures": figures,
        }
        Path(args.json).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
