"""Several worker processes: shared listeners, supervision, signals, summed metrics, checks.

The settings and the restart backoff are tested without processes in
tests/unit/test_workers.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from support import (
    WORKERS_READY,
    NotifyRecorder,
    Tcpfwd,
    admin_url,
    connect,
    echo_server,
    exchange,
    failed_attempts,
    get_json,
    metric_samples,
    named_backends,
    refused_port,
    run_command,
    service_config,
    socket_activation,
    toml_table,
    wait_until,
    wait_until_async,
    write_config,
)
from tcpfwd.vocabulary import AdminState
from tcpfwd.workerprocess import WorkerProcess


def workers_config(folder: Path, services: str, *, workers: int = 2, **global_keys: object) -> Path:
    return write_config(
        folder,
        toml_table("global", workers=workers, grace_period="10s", **global_keys)
        + toml_table("admin", listen="127.0.0.1:0")
        + services,
    )


def alive(pid: int) -> bool:
    """Running: not gone, and not a zombie its new parent has yet to reap."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture
def supervised(run_tcpfwd: Callable[..., Tcpfwd]) -> Iterator[Callable[[Path], Tcpfwd]]:
    """A supervisor with its workers; workers still running afterwards are killed by pid."""
    started: list[Tcpfwd] = []

    def start(config: Path) -> Tcpfwd:
        proxy = run_tcpfwd("run", "--config", str(config), ready=WORKERS_READY)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.kill_workers()


def metric(url: str, name: str) -> float:
    """The sum of every sample called ``name``, whatever its labels."""
    return sum(value for (sample, _), value in metric_samples(url).items() if sample == name)


def session_prefixes(proxy: Tcpfwd) -> set[str]:
    """Session ids start with a random prefix per process: one per serving worker."""
    return {record["session"].split("-")[0] for record in proxy.access_records(0)}


@pytest.mark.parametrize("reuse_port", ["true", "false"])
def test_both_workers_serve_and_metrics_sum_them(supervised, tmp_path, reuse_port):
    with echo_server() as backend:
        path = workers_config(
            tmp_path,
            service_config(backend.address),
            reuse_port=reuse_port == "true",
        )
        proxy = supervised(path)
        url = admin_url(proxy)
        pids = proxy.worker_pids()
        assert len(set(pids.values())) == 2 and proxy.pid not in pids.values()
        for pid in pids.values():
            proxy.wait_for_event(f"pid {pid}] ready:")
        count = 60
        if reuse_port == "true":
            # SO_REUSEPORT: the kernel spreads connections over both workers' queues by
            # their addresses (60 coin tosses).
            for i in range(count):
                assert exchange(proxy.address("main"), b"x%d" % i) == b"x%d" % i
        else:
            # One shared queue: whichever worker is first to accept takes each, so one
            # may take them all; with the other stopped, each must serve in turn.
            for number, pid in enumerate(pids.values()):
                others = [p for p in pids.values() if p != pid]
                for other in others:
                    os.kill(other, signal.SIGSTOP)
                try:
                    for i in range(count // 2):
                        payload = b"x%d-%d" % (number, i)
                        assert exchange(proxy.address("main"), payload) == payload
                finally:
                    for other in others:
                        os.kill(other, signal.SIGCONT)
        proxy.wait_for_access(count)
        assert len(session_prefixes(proxy)) == 2
        wait_until(lambda: metric(url, "tcpfwd_sessions_total") == count, "summed sessions")
        assert metric(url, "tcpfwd_backend_sessions_total") == count
        assert metric(url, "tcpfwd_connect_duration_seconds_count") == count
        status = get_json(url + "/status")
        assert status["pid"] == proxy.pid
        assert sorted(w["pid"] for w in status["workers"]) == sorted(pids.values())
        assert status["services"][0]["sessions_total"] == count
        assert proxy.stop() == 0


@pytest.mark.parametrize("reuse_port", ["true", "false"])
def test_a_killed_worker_is_replaced_and_the_service_goes_on(supervised, tmp_path, reuse_port):
    with echo_server() as backend:
        path = workers_config(
            tmp_path,
            service_config(backend.address),
            reuse_port=reuse_port == "true",
        )
        proxy = supervised(path)
        url = admin_url(proxy)
        victim = proxy.worker_pids()[1]
        failures: list[str] = []
        done = 0
        stop = threading.Event()

        def clients() -> None:
            nonlocal done
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    assert exchange(proxy.address("main"), b"ping", timeout=5) == b"ping"
                    done += 1
                except (OSError, AssertionError) as error:
                    failures.append(repr(error))

        thread = threading.Thread(target=clients)
        thread.start()
        try:
            wait_until(lambda: done >= 50, "50 connections before the kill")
            wait_until(lambda: metric(url, "tcpfwd_sessions_total") > 0, "counted sessions")
            before = metric(url, "tcpfwd_sessions_total")
            os.kill(victim, signal.SIGKILL)
            proxy.wait_for_event("exited unexpectedly (signal SIGKILL)")
            replacement_ready = proxy._wait(
                lambda: next(
                    (e for e in proxy.events if "worker 1 (pid" in e and e.endswith(") ready")),
                    None,
                ),
                15,
                "the replacement ready",
            )
            at_replacement = done
            wait_until(lambda: done >= at_replacement + 50, "50 connections after the replacement")
        finally:
            stop.set()
            thread.join(10)
        replacement = proxy.worker_pids()[1]
        assert replacement != victim and f"pid {replacement}" in replacement_ready
        assert not alive(victim)
        # The supervisor holds every listening socket, so what waited in the dead worker's
        # queue is accepted by its replacement: only a session in flight on the killed
        # worker can fail, and this client has one connection at a time.
        print(f"worker kill: {len(failures)} failed of {done + len(failures)}: {failures}")
        assert len(failures) <= 1
        # Counters do not go back: the dead worker's last snapshot is kept.
        wait_until(lambda: metric(url, "tcpfwd_sessions_total") >= before, "kept counters")
        assert proxy.stop() == 0


def test_sigterm_drains_every_worker_and_exits_zero(supervised, tmp_path):
    with echo_server() as backend:
        proxy = supervised(workers_config(tmp_path, service_config(backend.address)))
        address = proxy.address("main")
        pids = proxy.worker_pids()
        # Enough live sessions that both workers hold some (the kernel picks per connection).
        live = [connect(address) for _ in range(16)]
        for sock in live:
            sock.sendall(b"a")
            assert sock.recv(1) == b"a"
        proxy.signal(signal.SIGTERM)
        for pid in pids.values():
            proxy.wait_for_event(f"pid {pid}] stop from the supervisor received")
        with pytest.raises(ConnectionRefusedError):
            connect(address, timeout=2).close()
        for sock in live:
            sock.sendall(b"b")
            assert sock.recv(1) == b"b"
            sock.close()
        assert proxy.wait(20) == 0
        assert not any(alive(pid) for pid in pids.values())
        proxy.wait_for_event("stopped")


def test_reload_is_validated_by_the_supervisor_then_reaches_every_worker(supervised, tmp_path):
    with echo_server() as backend:
        path = workers_config(tmp_path, service_config(backend.address))
        proxy = supervised(path)
        pids = proxy.worker_pids()
        write_config(tmp_path, path.read_text() + "\n[services.broken]\nlisten = 5\n")
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_event("reload rejected")
        assert any("reload: " in e and "services.broken" in e for e in proxy.events)
        # A service added on a new "any port" address: bound once by the supervisor, so
        # every worker serves the same port.
        workers_config(
            tmp_path,
            service_config(backend.address) + service_config(backend.address, name="extra"),
        )
        proxy.signal(signal.SIGHUP)
        for pid in pids.values():
            proxy.wait_for_event(f"pid {pid}] reloaded")
        assert sum("reloaded" in e for e in proxy.events) == 2
        wait_until(lambda: len(proxy.listening.get("extra", [])) == 2, "both workers on extra")
        assert len(set(proxy.listening["extra"])) == 1
        count = 40
        for i in range(count):
            assert exchange(proxy.address("extra"), b"%d" % i) == b"%d" % i
        records = proxy.access_records(count)
        assert len({r["session"].split("-")[0] for r in records if r["service"] == "extra"}) == 2
        assert proxy.stop() == 0


def test_admin_actions_reach_every_worker(supervised, tmp_path):
    with echo_server() as first, echo_server() as second:
        backends = named_backends(a=first.address, b=second.address)
        proxy = supervised(workers_config(tmp_path, service_config(backends)))
        url = admin_url(proxy)
        request = urllib.request.Request(
            url + "/backends/main/a/disable", method="POST", headers={"X-Tcpfwd-Action": "disable"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        count = 40
        for _ in range(count):
            assert exchange(proxy.address("main"), b"q") == b"q"
        records = proxy.access_records(count)
        assert {r["backend"] for r in records} == {"b"}
        assert len({r["session"].split("-")[0] for r in records}) == 2
        backend_a = get_json(url + "/status")["services"][0]["backends"][0]
        assert backend_a["admin_state"] == AdminState.DISABLED
        assert proxy.stop() == 0


def test_health_checks_run_once_not_once_per_worker(supervised, tmp_path):
    interval = 0.2
    window = 3.0
    with echo_server() as checked, refused_port() as dead:
        health = {"check": "tcp", "interval": f"{interval}s"}
        backends = [
            {"address": dead, "name": "dead", "health": health},
            {"address": checked.address, "name": "live", "health": health},
        ]
        proxy = supervised(workers_config(tmp_path, service_config(backends)))
        url = admin_url(proxy)
        time.sleep(1.0)
        before = checked.accepted
        time.sleep(window)
        checks = checked.accepted - before
        print(f"{checks} checks of one backend in {window}s at {interval}s with 2 workers")
        # One checker: window / interval (jitter 0.9-1.1); two would make about twice that.
        assert window / interval * 0.6 <= checks <= window / interval * 1.3
        # Worker 1 never checked "dead" itself, yet both workers know it is down.
        status = get_json(url + "/status")
        assert status["services"][0]["backends"][0]["health"] == "down"
        count = 30
        for _ in range(count):
            assert exchange(proxy.address("main"), b"h") == b"h"
        records = proxy.access_records(count)
        assert len({r["session"].split("-")[0] for r in records}) == 2
        assert all(failed_attempts(r) == [] for r in records)
        assert proxy.stop() == 0


def test_systemd_sees_the_supervisor_alone_with_shared_inherited_sockets(run_tcpfwd, tmp_path):
    recorder = NotifyRecorder(tmp_path / "notify.sock")
    pid_file = tmp_path / "tcpfwd.pid"
    proxy = None
    try:
        with echo_server() as backend, socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen(128)
            port = listening.getsockname()[1]
            path = workers_config(
                tmp_path,
                service_config(backend.address, listen=f"127.0.0.1:{port}"),
                pid_file=str(pid_file),
            )
            proxy = run_tcpfwd(
                "run",
                "--config",
                str(path),
                ready=None,
                env={"NOTIFY_SOCKET": str(recorder.path), "WATCHDOG_USEC": "400000"},
                **socket_activation(listening),
            )
            ready = recorder.wait_for("READY", 20)
            assert ready["MAINPID"] == str(proxy.pid)
            proxy.wait_for_event(WORKERS_READY)
            assert int(pid_file.read_text()) == proxy.pid
            pids = proxy.worker_pids()
            # Both workers accept on the one socket systemd passed.
            assert proxy.listening["main"] == [("127.0.0.1", port)] * 2
            for i in range(10):
                assert exchange(("127.0.0.1", port), b"%d" % i) == b"%d" % i
            result = run_command("reload", "--config", str(path))
            assert result.returncode == 0, result.stderr
            for pid in pids.values():
                proxy.wait_for_event(f"pid {pid}] reloaded")
            recorder.wait_for("RELOADING")
            assert recorder.wait_for("WATCHDOG")["WATCHDOG"] == "1"
            assert proxy.stop() == 0
            assert recorder.wait_for("STOPPING")["STOPPING"] == "1"
            with contextlib.suppress(AssertionError):
                recorder.wait_for("never", 0.5)
            # Workers have no NOTIFY_SOCKET: every message came from the supervisor.
            assert {m.get("MAINPID", str(proxy.pid)) for m in recorder.messages} == {str(proxy.pid)}
            assert not pid_file.exists()
    finally:
        recorder.close()
        if proxy is not None:
            proxy.kill_workers()


def snapshot_pid(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def test_workers_stop_when_the_supervisor_dies(supervised, tmp_path):
    with echo_server() as backend:
        proxy = supervised(workers_config(tmp_path, service_config(backend.address)))
        pids = proxy.worker_pids()
        proxy.kill()
        # Their stderr is still the test's pipe: read on after the supervisor is gone.
        for pid in pids.values():
            wanted = f"pid {pid}] supervisor gone received: stopping"
            wait_until(lambda w=wanted: any(w in e for e in proxy.events), wanted)
        wait_until(lambda: not any(alive(pid) for pid in pids.values()), "workers gone")
        # The last one out removed the runtime folder the supervisor could not (other
        # runs' folders may be there too: only these workers' snapshots count).
        runtime = Path(tempfile.gettempdir())
        left = [snapshot_pid(p) for p in runtime.glob("tcpfwd-workers-*/worker-*.json")]
        assert not set(left) & set(pids.values())


def test_a_port_in_use_fails_the_start_with_workers(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = workers_config(tmp_path, service_config("127.0.0.1:1", listen=f"127.0.0.1:{port}"))
        result = run_command("run", "--config", str(path))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "worker" not in result.stderr


def test_changing_the_worker_count_needs_a_restart(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        path = workers_config(tmp_path, service_config(backend.address), workers=1)
        proxy = run_tcpfwd("run", "--config", str(path))
        workers_config(tmp_path, service_config(backend.address), workers=2)
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_event("workers = 2 needs a restart; still 1")
        assert exchange(proxy.address("main"), b"z") == b"z"
        assert not proxy.worker_pids()
        assert proxy.stop() == 0


def test_sigusr1_reopens_the_log_files_of_every_worker(supervised, tmp_path):
    access_log = tmp_path / "access.log"
    with echo_server() as backend:
        path = workers_config(
            tmp_path,
            service_config(backend.address),
            access_log=str(access_log),
        )
        proxy = supervised(path)
        pids = proxy.worker_pids()
        access_log.rename(tmp_path / "access.log.1")
        proxy.signal(signal.SIGUSR1)
        for pid in pids.values():
            proxy.wait_for_event(f"pid {pid}] SIGUSR1 received: reopened 1 log files")
        proxy.wait_for_event("passed on to the workers")
        count = 30
        for _ in range(count):
            assert exchange(proxy.address("main"), b"l") == b"l"
        wait_until(lambda: len(access_log.read_text().splitlines()) == count, "access lines")
        prefixes = {line.split()[1].split("-")[0] for line in access_log.read_text().splitlines()}
        assert len(prefixes) == 2
        assert proxy.stop() == 0


def test_health_stays_unknown_until_some_worker_tried_the_backend(supervised, tmp_path):
    with echo_server(b"hi\n") as live, echo_server() as spare:
        backends = named_backends(a=live.address, b=spare.address)
        proxy = supervised(workers_config(tmp_path, service_config(backends)))
        url = admin_url(proxy)

        def health() -> dict[str, str]:
            (shown,) = get_json(url + "/status")["services"]
            return {b["name"]: b["health"] for b in shown["backends"]}

        wait_until(lambda: len(get_json(url + "/status")["workers"]) == 2, "both snapshots")
        assert health() == {"a": "unknown", "b": "unknown"}
        assert exchange(proxy.address("main"), b"x") == b"hi\nx"
        # Whichever worker served it, its verdict is the one shown.
        wait_until(lambda: health() == {"a": "up", "b": "unknown"}, "a known to be up")
        assert proxy.stop() == 0


# --- one worker process, as the supervisor drives it -----------------------------------

# A stand-in worker: says it is ready on its control channel, then answers pings or not.
_STAND_IN = """
import json, os, socket, sys, time
channel = socket.socket(fileno=json.loads(os.environ["TCPFWD_WORKER"])["control"])
channel.send(b'{"op": "ready"}')
if sys.argv[1] == "silent":
    time.sleep(60)
while channel.recv(1 << 16):
    channel.send(b'{"op": "pong"}')
"""


@contextlib.asynccontextmanager
async def stand_in(behaviour: str) -> AsyncIterator[WorkerProcess]:
    command = [sys.executable, "-c", _STAND_IN, behaviour]
    worker = WorkerProcess(0, command, ping_interval=0.05, ping_timeout=0.6)
    assert worker.spawn("", [], [])
    try:
        await wait_until_async(lambda: worker.ready, "ready")
        yield worker
    finally:
        worker.kill()
        await wait_until_async(lambda: worker.exited() is not None or not worker.running, "exit")
        worker.close()


async def test_a_worker_that_answers_pings_is_alive():
    async with stand_in("answering") as worker:
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            assert worker.ping(time.monotonic()), "an answering worker taken for hung"
            await asyncio.sleep(0.05)


async def test_a_worker_whose_loop_is_stuck_is_found_hung_and_killed():
    async with stand_in("silent") as worker:
        pid = worker.pid
        started = time.monotonic()
        await wait_until_async(lambda: not worker.ping(time.monotonic()), "hung verdict")
        assert time.monotonic() - started >= 0.5
        worker.kill()
        exits: list[str] = []
        await wait_until_async(lambda: exits.append(worker.exited() or "") or exits[-1], "exit")
        assert exits[-1] == "signal SIGKILL"
        assert worker.pid is None and not alive(pid or 0)
