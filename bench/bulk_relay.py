"""One bulk TCP stream through each relay: CPU seconds per GB and throughput, vs HAProxy.

    python bench/bulk_relay.py [--runs 5] [--seconds 5]

Each proxy forwards 127.0.0.1:<port> to a sink; one stream goes through it. The proxy
under test is pinned to core 0; this script, the sender and the sink, to core 1. The
peers must cost less than the proxy, or they and not the proxy set the speed (iperf3's
receiver copies every byte; on a shared core that capped every proxy alike): the sender
uses sendfile(2) from a file in the page cache, the sink splice(2)s into /dev/null.
CPU is what /proc/PID/stat says the proxy used (utime + stime) during the stream;
throughput is bytes over the time between the sink's first and last byte.

Proxies: tcpfwd with ``--relay copy`` and ``--relay splice`` (this checkout, from
``src/``), and HAProxy in ``mode tcp`` with ``nbthread 1`` four ways: no splice,
``option splice-auto``, splice forced (``option splice-request`` + ``splice-response``),
and forced with ``tune.pipesize 1048576`` (tcpfwd's pipe size). ``splice-auto`` is the
documented choice, but HAProxy 2.6 only splices once it judges a stream "fast", and for
this stream it may never do so (strace shows recvfrom/sendto only): the forced variants
show what HAProxy's splicing costs. Ratios compare with HAProxy's best in the same round
(least CPU per GB; most Gbit/s), then take the median over rounds. All proxies run side by
side; each round runs each once, in an order that rotates, so slow drifts of a shared
machine fall on all of them.

Needs: Linux, haproxy, 2+ cores. Network: loopback only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROXY_CORE = "0"
PEER_CORE = 1
GB = 1e9
SOURCE_SIZE = 64 << 20
CHUNK = 1 << 20

HAPROXY_CONFIG = """\
global
    nbthread 1
{tuning}    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen bulk
    bind 127.0.0.1:{port}
{options}    server sink 127.0.0.1:{sink}
"""


FORCED_SPLICE = "    option splice-request\n    option splice-response\n"
HAPROXIES = (
    ("haproxy", "", ""),
    ("haproxy splice-auto", "    option splice-auto\n", ""),
    ("haproxy splice", FORCED_SPLICE, ""),
    ("haproxy splice 1MiB pipes", FORCED_SPLICE, "    tune.pipesize 1048576\n"),
)


@dataclass
class Proxy:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    cpu_per_gb: float
    gbit_per_s: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Wait for a LISTEN socket on ``port`` without connecting (that would reach the sink)."""
    wanted = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with open("/proc/net/tcp") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                if (fields[1] + " ").endswith(wanted) and fields[3] == "0A":
                    return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


@contextmanager
def running(command: Sequence[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, **kwargs)  # type: ignore[call-overload]
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def start_proxies(stack: ExitStack, sink: int, workdir: Path) -> list[Proxy]:
    pinned = ["taskset", "-c", PROXY_CORE]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proxies: list[Proxy] = []
    for relay in ("copy", "splice"):
        port = free_port()
        command = [sys.executable, "-m", "tcpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{sink}"]
        command += ["--relay", relay, "--log-level", "warning"]
        process = stack.enter_context(
            running([*pinned, *command], env=env, stdout=subprocess.DEVNULL)
        )
        proxies.append(Proxy(f"tcpfwd {relay}", port, process))
    for name, options, tuning in HAPROXIES:
        port = free_port()
        config = workdir / f"{name.replace(' ', '-')}.cfg"
        config.write_text(
            HAPROXY_CONFIG.format(port=port, sink=sink, options=options, tuning=tuning)
        )
        process = stack.enter_context(
            running([*pinned, "haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL)
        )
        proxies.append(Proxy(name, port, process))
    for proxy in proxies:
        wait_listening(proxy.port, proxy.process)
    return proxies


class Sink:
    """Accepts one connection at a time and discards what it reads, with splice(2)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port: int = self.listener.getsockname()[1]
        self.null = os.open(os.devnull, os.O_WRONLY)
        self.pipe = os.pipe()

    def drain_one(self, into: dict[str, float]) -> None:
        conn, _ = self.listener.accept()
        with conn:
            received, first = 0, 0.0
            while True:
                moved = os.splice(conn.fileno(), self.pipe[1], CHUNK)
                if not moved:
                    break
                if not received:
                    first = time.monotonic()
                received += moved
                while moved:
                    moved -= os.splice(self.pipe[0], self.null, moved)
            into["bytes"] = received
            into["seconds"] = time.monotonic() - first

    def close(self) -> None:
        self.listener.close()
        os.close(self.null)
        for fd in self.pipe:
            os.close(fd)


def measure(proxy: Proxy, sink: Sink, source: int, seconds: float) -> Sample:
    result: dict[str, float] = {}
    drainer = threading.Thread(target=sink.drain_one, args=(result,))
    drainer.start()
    before = proxy.cpu_seconds()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        # Blocking sendfile, bounded by the kernel's send timeout rather than a poll loop.
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 30, 0))
        deadline = time.monotonic() + seconds
        offset = 0
        while time.monotonic() < deadline:
            offset += os.sendfile(sock.fileno(), source, offset, SOURCE_SIZE - offset)
            offset %= SOURCE_SIZE
        sock.shutdown(socket.SHUT_WR)
        drainer.join(seconds + 60)
    used = proxy.cpu_seconds() - before
    if drainer.is_alive() or not result.get("bytes"):
        raise RuntimeError(f"the stream through {proxy.name} did not complete")
    return Sample(used / (result["bytes"] / GB), result["bytes"] * 8 / result["seconds"] / 1e9)


def summary(values: Sequence[float], digits: int) -> str:
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (each runs every proxy)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one stream")
    args = parser.parse_args()
    for tool in ("haproxy", "taskset"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    os.sched_setaffinity(0, {PEER_CORE})
    samples: dict[str, list[Sample]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(dir="/dev/shm") as workdir:
        source_path = Path(workdir) / "source"
        source_path.write_bytes(os.urandom(SOURCE_SIZE))
        source = os.open(source_path, os.O_RDONLY)
        stack.callback(os.close, source)
        sink = Sink()
        stack.callback(sink.close)
        proxies = start_proxies(stack, sink.port, Path(workdir))
        for run in range(args.runs):
            order = proxies[run % len(proxies) :] + proxies[: run % len(proxies)]
            for proxy in order:
                sample = measure(proxy, sink, source, args.seconds)
                samples.setdefault(proxy.name, []).append(sample)
                print(
                    f"run {run + 1} {proxy.name:20} {sample.cpu_per_gb:.3f} s/GB "
                    f"{sample.gbit_per_s:.2f} Gbit/s",
                    file=sys.stderr,
                )
    haproxy = [runs for name, runs in samples.items() if name.startswith("haproxy")]
    least_cpu = [min(each.cpu_per_gb for each in round_) for round_ in zip(*haproxy, strict=True)]
    fastest = [max(each.gbit_per_s for each in round_) for round_ in zip(*haproxy, strict=True)]
    print(f"{args.runs} runs of {args.seconds:g}s, one stream; median (min-max)\n")
    print("| proxy | CPU s/GB | CPU vs HAProxy's best | Gbit/s | Gbit/s vs HAProxy's best |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in samples.items():
        cpu_ratio = [s.cpu_per_gb / b for s, b in zip(runs, least_cpu, strict=True)]
        speed_ratio = [s.gbit_per_s / f for s, f in zip(runs, fastest, strict=True)]
        print(
            f"| {name} | {summary([s.cpu_per_gb for s in runs], 3)} "
            f"| {summary(cpu_ratio, 2)}x "
            f"| {summary([s.gbit_per_s for s in runs], 1)} "
            f"| {summary(speed_ratio, 2)}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
