"""Running tcpfwd as a daemon: reload, hand-over, systemd, access control, limits, logs."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support import (
    NotifyRecorder,
    Tcpfwd,
    connect,
    echo_server,
    exchange,
    free_port,
    recv_all,
    recv_exactly,
    run_command,
    service_config,
    socket_activation,
    toml_table,
    wait_until,
    write_config,
)
from tcpfwd.vocabulary import Reject


def wait_until_count(proxy: Tcpfwd, endings: tuple[str, ...], count: int) -> None:
    """Wait until ``count`` daemon events contain one of ``endings`` (reload outcomes)."""

    def counted() -> bool:
        seen = sum(1 for e in proxy.events if any(end in e for end in endings))
        # Failing, the wait names the last events.
        assert seen >= count, "\n".join(proxy.events[-10:])
        return True

    wait_until(counted, f"{count} reload outcomes", 15, interval=0.02)


# --- access control and limits ----------------------------------------------------------


def test_denied_client_is_closed_at_once_and_never_reaches_a_backend(run_tcpfwd, tmp_path):
    with echo_server(b"hi\n") as backend:
        config = write_config(
            tmp_path,
            service_config(backend.address, deny=["127.0.0.2"]),
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        address = proxy.address("main")
        # Turned away with a FIN: a reset would raise.
        with socket.create_connection(
            address, source_address=("127.0.0.2", 0), timeout=5
        ) as denied:
            assert recv_all(denied) == b""
        assert backend.accepted == 0
        proxy.wait_for_event(f"({Reject.DENIED}), the latest from 127.0.0.2")
        # Other clients are served as usual.
        assert exchange(address, b"x") == b"hi\nx"


def test_allow_list_admits_only_the_networks_it_names(run_tcpfwd, tmp_path):
    with echo_server(b"hi\n") as backend:
        config = write_config(
            tmp_path,
            service_config(backend.address, allow=["127.0.0.2/32", "::1"]),
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        address = proxy.address("main")
        with socket.create_connection(
            address, source_address=("127.0.0.2", 0), timeout=5
        ) as allowed:
            allowed.sendall(b"x")
            allowed.shutdown(socket.SHUT_WR)
            assert recv_all(allowed) == b"hi\nx"
        with connect(address) as other:
            assert recv_all(other) == b""
        assert backend.accepted == 1


def test_connections_beyond_the_service_limit_are_closed_at_once(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        config = write_config(tmp_path, service_config(backend.address, max_connections=3))
        proxy = run_tcpfwd("run", "--config", str(config))
        address = proxy.address("main")
        held = [connect(address) for _ in range(3)]
        for client in held:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"
        with connect(address) as excess:
            assert recv_all(excess) == b""
        proxy.wait_for_event(f"({Reject.SERVICE_LIMIT})")
        held.pop().close()
        proxy.wait_for_access(1)
        # A place is free again.
        assert exchange(address, b"y") == b"y"
        for client in held:
            client.close()


def test_one_client_address_cannot_take_more_than_its_share(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        config = write_config(
            tmp_path,
            service_config(backend.address, max_connections_per_client=2),
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        address = proxy.address("main")
        greedy = [connect(address) for _ in range(2)]
        for client in greedy:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"
        with connect(address) as third:
            assert recv_all(third) == b""
        proxy.wait_for_event(f"({Reject.CLIENT_LIMIT})")
        # Another address is not affected by the first one's share.
        with socket.create_connection(address, source_address=("127.0.0.3", 0), timeout=5) as other:
            other.sendall(b"z")
            assert recv_exactly(other, 1) == b"z"
        for client in greedy:
            client.close()


def test_global_limit_counts_every_service(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        config = write_config(
            tmp_path,
            toml_table("global", max_connections=2)
            + service_config(backend.address, name="a")
            + service_config(backend.address, name="b"),
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        first = connect(proxy.address("a"))
        second = connect(proxy.address("b"))
        for client in (first, second):
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"
        with connect(proxy.address("b")) as excess:
            assert recv_all(excess) == b""
        proxy.wait_for_event(f"({Reject.GLOBAL_LIMIT})")
        first.close()
        second.close()


def test_accept_rate_spreads_a_burst_over_time_without_refusing_it(run_tcpfwd, tmp_path):
    with echo_server(b"hi\n") as backend:
        config = write_config(tmp_path, service_config(backend.address, accept_rate=5))
        proxy = run_tcpfwd("run", "--config", str(config))
        address = proxy.address("main")
        started = time.monotonic()
        clients = [connect(address, timeout=15) for _ in range(15)]
        greeted_at = []
        for client in clients:
            assert recv_exactly(client, 3) == b"hi\n"
            greeted_at.append(time.monotonic() - started)
            client.close()
        # 5 at once (one second's worth), then 5 a second: the 15th cannot come before 2 s.
        assert greeted_at[-1] >= 1.8
        assert backend.accepted == 15


# --- reload -----------------------------------------------------------------------------


class ClientLoop:
    """Connections one after another, checking each answer, in a thread.

    It makes at least ``minimum`` connections and then goes on until ``stop`` is set,
    so the load spans whatever the test does meanwhile; ``maximum`` bounds it anyway.
    """

    def __init__(
        self,
        address: tuple[str, int],
        expected: Callable[[bytes], bool],
        *,
        minimum: int,
        maximum: int,
        stop: threading.Event,
    ) -> None:
        self.failures: list[str] = []
        self.count = 0
        self._args = (address, expected, minimum, maximum, stop)
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        address, expected, minimum, maximum, stop = self._args
        while self.count < maximum and (self.count < minimum or not stop.is_set()):
            i = self.count
            self.count += 1
            try:
                answer = exchange(address, b"ping %d" % i, timeout=10)
            except OSError as error:
                self.failures.append(f"{i}: {error!r}")
                continue
            if not expected(answer):
                self.failures.append(f"{i}: unexpected {answer!r}")

    def join(self) -> None:
        self.thread.join(120)
        assert not self.thread.is_alive()


def test_reload_under_load_loses_no_connection_and_rejects_a_broken_config(run_tcpfwd, tmp_path):
    with echo_server(b"A\n") as backend_a, echo_server(b"B\n") as backend_b:
        port = free_port()
        listen = f"127.0.0.1:{port}"
        config = write_config(tmp_path, service_config(backend_a.address, listen=listen))
        proxy = run_tcpfwd("run", "--config", str(config))
        address = proxy.address("main")
        done = threading.Event()
        loops = [
            ClientLoop(
                address,
                lambda answer: answer[2:].startswith(b"ping"),
                minimum=500,
                maximum=5000,
                stop=done,
            )
            for _ in range(4)
        ]
        versions = [
            service_config(backend_b.address, listen=listen),
            service_config(backend_b.address, listen=listen) + "\nbroken = [",
            service_config(backend_a.address, listen=listen, connect_timeout="soon"),
            service_config(backend_a.address, listen=listen),
            service_config(backend_b.address, listen=listen),
        ]
        for applied, text in enumerate(versions, start=1):
            time.sleep(0.3)
            write_config(tmp_path, text)
            proxy.signal(signal.SIGHUP)
            # One at a time: signals sent faster than they are handled would merge.
            wait_until_count(proxy, ("reloaded", "the running configuration is kept"), applied)
        done.set()
        for loop in loops:
            loop.join()
        total = sum(loop.count for loop in loops)
        assert [f for loop in loops for f in loop.failures] == []
        assert total >= 2000
        assert len(proxy.wait_for_access(total, timeout=30)) >= total
        assert sum(1 for e in proxy.events if e.endswith("the running configuration is kept")) == 2
        assert any("connect_timeout: 'soon' is not a duration" in e for e in proxy.events)
        # The last good configuration (backend B) is the one in force.
        answer = exchange(address, b"last")
        assert answer == b"B\nlast", "\n".join(proxy.events[-3:] + proxy.access[-3:])
        assert backend_a.accepted > 0
        assert backend_b.accepted > 0


def test_reload_adds_and_removes_listeners_and_keeps_live_sessions(run_tcpfwd, tmp_path):
    with echo_server(b"A\n") as backend_a, echo_server(b"B\n") as backend_b:
        old_port, new_port = free_port(), free_port()
        config = write_config(
            tmp_path,
            service_config(backend_a.address, name="old", listen=f"127.0.0.1:{old_port}"),
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        live = connect(("127.0.0.1", old_port))
        assert recv_exactly(live, 2) == b"A\n"
        write_config(
            tmp_path, service_config(backend_b.address, name="new", listen=f"127.0.0.1:{new_port}")
        )
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_event("reloaded")
        assert exchange(("127.0.0.1", new_port), b"n") == b"B\nn"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", old_port), timeout=2)
        # The session that began before the reload goes on with its backend.
        live.sendall(b"still here")
        assert recv_exactly(live, 10) == b"still here"
        live.close()


def test_reload_command_validates_then_signals_the_daemon(run_tcpfwd, tmp_path):
    with echo_server(b"A\n") as backend_a, echo_server(b"B\n") as backend_b:
        pid_file = tmp_path / "tcpfwd.pid"
        header = toml_table("global", pid_file=str(pid_file))
        listen = f"127.0.0.1:{free_port()}"
        config = write_config(tmp_path, header + service_config(backend_a.address, listen=listen))
        proxy = run_tcpfwd("run", "--config", str(config))
        assert pid_file.read_text().strip() == str(proxy.pid)

        write_config(
            tmp_path, header + service_config(backend_b.address, listen=listen) + "oops = 1\n"
        )
        refused = run_command("reload", "--config", str(config))
        assert refused.returncode == 2
        assert "oops: unknown key" in refused.stderr
        write_config(tmp_path, header + service_config(backend_b.address, listen=listen))
        accepted = run_command("reload", "--config", str(config))
        assert accepted.returncode == 0, accepted.stderr
        assert f"reload sent to pid {proxy.pid}" in accepted.stdout
        proxy.wait_for_event("reloaded")
        assert exchange(proxy.address("main"), b"x") == b"B\nx"
        assert proxy.stop() == 0
        assert not pid_file.exists()


# --- hand-over and systemd ----------------------------------------------------------------


def test_socket_activation_serves_the_inherited_socket(run_tcpfwd, tmp_path):
    with echo_server(b"hi\n") as backend, socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(128)
        port = listening.getsockname()[1]
        config = write_config(tmp_path, service_config(backend.address, listen=f"127.0.0.1:{port}"))
        proxy = run_tcpfwd("run", "--config", str(config), **socket_activation(listening))
        assert proxy.address("main") == ("127.0.0.1", port)
        assert exchange(("127.0.0.1", port), b"x") == b"hi\nx"


def test_restart_with_an_inherited_socket_refuses_no_connection(run_tcpfwd, tmp_path):
    """The hand-over that refuses nothing: the socket outlives the processes serving it.

    systemd (or any holder) keeps the listening socket; the old process stops accepting
    and drains while connections queue in the kernel until the new one accepts them.
    """
    with echo_server(b"hi\n") as backend, socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1024)
        port = listening.getsockname()[1]
        config = write_config(tmp_path, service_config(backend.address, listen=f"127.0.0.1:{port}"))
        old = run_tcpfwd("run", "--config", str(config), **socket_activation(listening))
        done = threading.Event()
        loops = [
            ClientLoop(
                ("127.0.0.1", port),
                lambda answer: answer.startswith(b"hi\n"),
                minimum=300,
                maximum=10000,
                stop=done,
            )
            for _ in range(3)
        ]
        old.wait_for_access(100)
        # The restart: the old process stops accepting and drains; the new one starts.
        old.signal(signal.SIGTERM)
        new = run_tcpfwd("run", "--config", str(config), **socket_activation(listening))
        assert old.wait(15) == 0
        new.wait_for_access(100, timeout=30)
        done.set()
        for loop in loops:
            loop.join()
        assert [f for loop in loops for f in loop.failures] == []
        total = sum(loop.count for loop in loops)
        assert len(old.access) + len(new.wait_for_access(total - len(old.access))) == total


def test_sd_notify_ready_reloading_watchdog_and_stopping(run_tcpfwd, tmp_path):
    recorder = NotifyRecorder(tmp_path / "notify.sock")
    try:
        with echo_server() as backend:
            config = write_config(tmp_path, service_config(backend.address))
            proxy: Tcpfwd = run_tcpfwd(
                "run",
                "--config",
                str(config),
                env={"NOTIFY_SOCKET": str(recorder.path), "WATCHDOG_USEC": "400000"},
            )
            ready = recorder.wait_for("READY")
            assert ready["READY"] == "1"
            assert ready["MAINPID"] == str(proxy.pid)
            assert recorder.wait_for("WATCHDOG")["WATCHDOG"] == "1"
            proxy.signal(signal.SIGHUP)
            reloading = recorder.wait_for("RELOADING")
            assert int(reloading["MONOTONIC_USEC"]) > 0
            proxy.signal(signal.SIGTERM)
            assert recorder.wait_for("STOPPING")["STOPPING"] == "1"
            assert proxy.wait(10) == 0
    finally:
        recorder.close()


# --- logs and privileges ----------------------------------------------------------------


def test_access_log_file_is_reopened_on_sigusr1(run_tcpfwd, tmp_path):
    access_log = tmp_path / "access.log"
    with echo_server() as backend:
        config = write_config(
            tmp_path,
            toml_table("global", access_log=str(access_log), log_format="json")
            + service_config(backend.address),
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        address = proxy.address("main")
        assert exchange(address, b"1") == b"1"
        rotated = tmp_path / "access.log.1"
        wait_until(lambda: access_log.exists() and access_log.read_text(), "the access line", 10)
        access_log.rename(rotated)
        proxy.signal(signal.SIGUSR1)
        proxy.wait_for_event("reopened 1 log files")
        assert exchange(address, b"2") == b"2"
        proxy.stop()
        assert len(rotated.read_text().splitlines()) == 1
        (line,) = access_log.read_text().splitlines()
        assert '"from_client":1' in line


def test_privileges_are_dropped_after_binding(run_tcpfwd, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root can drop privileges")
    with echo_server() as backend:
        config = write_config(
            tmp_path,
            toml_table("global", user="nobody", group="nogroup")
            + service_config(backend.address, listen="127.0.0.1:0"),
        )
        os.chmod(tmp_path, 0o755)
        proxy = run_tcpfwd("run", "--config", str(config))
        status = Path(f"/proc/{proxy.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["65534"] * 4
        assert exchange(proxy.address("main"), b"x") == b"x"
        assert proxy.stop() == 0
