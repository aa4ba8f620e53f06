"""tcpfwd talking to itself, and services sharing the daemon's session places fairly."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from plane import Plane
from support import connect, echo_server, exchange, free_port, recv_exactly, write_config
from tcpfwd.daemonstate import OwnConnections
from tcpfwd.vocabulary import End, Reject


class Ours:
    """A connection of ours as OwnConnections sees it."""

    def __init__(self, remote: tuple[str, int], new: bool) -> None:
        self.remote = remote
        self.new = new

    def is_new(self, now: float) -> bool:
        return self.new


def test_a_peer_with_the_address_of_a_connection_of_ours_is_judged_on_more_than_that():
    own = OwnConnections()
    local, backend, listener = ("127.0.0.1", 40001), ("127.0.0.1", 25), ("127.0.0.1", 10025)
    settled = Ours(backend, new=False)
    own.add(local, settled)
    # Arrived on the very address ours was made to: ours.
    assert own.is_loop(local, backend, 0.0)
    # The kernel gives one local port to connections to different destinations: a
    # client on this host may come from the port a long-lived connection of ours to a
    # backend uses, and is not us.
    assert not own.is_loop(local, listener, 0.0)
    # Unless ours is new and no socket here has those two addresses: sent back by a box
    # in the path (nothing on this host connects from 127.0.0.1:40001 to the listener).
    fresh = Ours(("127.0.0.1", 26), new=True)
    own.add(local, fresh)
    assert own.is_loop(local, listener, 0.0)
    own.discard(local, fresh)
    assert not own.is_loop(local, listener, 0.0)
    own.discard(local, settled)
    assert len(own) == 0


def test_a_local_client_sharing_the_port_of_a_new_connection_of_ours_is_served():
    # A real client socket from the very local address of a new connection of ours: its
    # own socket, from that address to the listener, proves it is not ours.
    listening = socket.create_server(("127.0.0.1", 0))
    arrived_on = listening.getsockname()
    client = socket.create_connection(arrived_on)
    own = OwnConnections()
    own.add(client.getsockname(), Ours(("127.0.0.1", 26), new=True))
    try:
        assert not own.is_loop(client.getsockname(), arrived_on, 0.0)
    finally:
        client.close()
        listening.close()


async def test_a_connection_of_ours_that_comes_back_to_us_is_turned_away():
    # The backend is a listening socket of the test's; each connection the session makes
    # to it is judged as if it had arrived on one of tcpfwd's own listeners there.
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    address = listening.getsockname()
    plane = Plane(backends=[f"127.0.0.1:{address[1]}"])
    loop = asyncio.get_running_loop()
    try:
        client, _session = plane.pair()
        arrived, peer = await loop.sock_accept(listening)
        verdict = plane.service.admit(peer, arrived, address)  # type: ignore[arg-type]
        # A stranger from another address is judged on its own merits.
        stranger = plane.service.admit(("127.0.0.9", peer[1]), arrived, address)  # type: ignore[arg-type]
        arrived.close()
        client.close()
    finally:
        plane.close()
        listening.close()
    assert verdict is not None and verdict[0] == Reject.LOOP
    assert stranger is None


@contextlib.contextmanager
def redirected(from_address: tuple[str, int], to_port: int) -> Iterator[None]:
    """NAT in this host's OUTPUT chain: connections to ``from_address`` reach local
    ``to_port`` instead (a box in the path that sends them back to us)."""
    rule = [
        "OUTPUT", "-t", "nat", "-p", "tcp", "-d", from_address[0],
        "--dport", str(from_address[1]), "-j", "DNAT", "--to-destination", f"127.0.0.1:{to_port}",
    ]  # fmt: skip
    subprocess.run(["iptables", "-A", *rule], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True, capture_output=True)


def _can_nat() -> bool:
    if shutil.which("iptables") is None:
        return False
    probe = subprocess.run(
        ["iptables", "-t", "nat", "-L", "OUTPUT"], check=False, capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_nat(), reason="needs root and iptables' nat table")
def test_a_loop_through_another_box_is_cut_and_the_other_services_keep_serving(
    run_tcpfwd, tmp_path
):
    loop_port = free_port()
    # A backend address that the configuration cannot tell is tcpfwd itself: the NAT
    # rule sends it back to the looping service's own listener.
    hidden = ("127.0.0.77", free_port())
    with echo_server() as backend:
        config = write_config(
            tmp_path,
            f"""
[services.loop]
listen = ["127.0.0.1:{loop_port}"]
backends = ["{hidden[0]}:{hidden[1]}"]

[services.good]
listen = ["127.0.0.1:0"]
backends = ["{backend.address}"]
""",
        )
        with redirected(hidden, loop_port):
            proxy = run_tcpfwd("run", "--config", str(config))
            with connect(("127.0.0.1", loop_port)) as client:
                client.sendall(b"hello")
                client.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    assert client.recv(100) == b""
            event = proxy.wait_for_event(f"({Reject.LOOP})")
            # The looping connection was turned away: the client's session found its
            # backend gone, and the loop did not grow.
            assert proxy.access_records(1)[0]["end"] in (End.BACKEND_CLOSED, End.BACKEND_RESET)
            time.sleep(0.3)
            assert len(proxy.access) == 1
            assert exchange(proxy.address("good"), b"still here") == b"still here"
    assert "tcpfwd's own connection" in event


def test_a_flooded_service_cannot_take_the_places_of_the_others(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        config = write_config(
            tmp_path,
            f"""
[services.busy]
listen = ["127.0.0.1:0"]
backends = ["{backend.address}"]

[services.quiet]
listen = ["127.0.0.1:0"]
backends = ["{backend.address}"]
""",
        )
        proxy = run_tcpfwd(
            "run", "--config", str(config), prefix=["prlimit", "--nofile=160:160", "--"]
        )
        capacity = proxy.capacity()
        busy, quiet = proxy.address("busy"), proxy.address("quiet")
        # Half the places are reserved, split evenly: the busy service may take the
        # capacity less the quiet one's reserve; its other clients wait in its queue.
        reserve = capacity // 4
        flood = []
        for _ in range(capacity):
            client = socket.create_connection(busy, timeout=5)
            client.sendall(b"x")
            flood.append(client)
        served = 0
        for client in flood:
            client.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                served += recv_exactly(client, 1) == b"x"
        assert served == capacity - reserve
        proxy.wait_for_event("service busy has")
        # The quiet service still has its places.
        for _ in range(3):
            assert exchange(quiet, b"hello", timeout=5) == b"hello"
        # Places the flood gives back go to its waiting clients.
        for client in flood[:5]:
            client.close()
        waiting = flood[capacity - reserve :]
        for client in waiting[:5]:
            client.settimeout(5)
            assert recv_exactly(client, 1) == b"x"
        for client in flood:
            client.close()
