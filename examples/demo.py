"""Show tcpfwd's ordered failover with three local demo mail servers.

Run from the project folder:  pip install . && python examples/demo.py

It starts tcpfwd with examples/demo.toml (listening on 127.0.0.1:10025, backends
mail-a, mail-b, mail-c on 127.0.0.1:10031-10033), then starts and stops the demo
servers while a client connects, and prints what the client saw and tcpfwd's access
log. Everything stays on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LISTEN = ("127.0.0.1", 10025)
PORTS = {"mail-a": 10031, "mail-b": 10032, "mail-c": 10033}


class DemoMailServer:
    """Greets like an SMTP server and answers every line until QUIT."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", PORTS[name]))
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.sendall(f"220 {self.name}.demo ESMTP ready\r\n".encode())
            for line in conn.makefile("rb"):
                if line.strip().upper() == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                conn.sendall(b"250 ok\r\n")

    def stop(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def ask() -> str:
    """One client session through tcpfwd: read the greeting, say QUIT."""
    with socket.create_connection(LISTEN, timeout=10) as client:
        reader = client.makefile("rb")
        greeting = reader.readline().decode().strip()
        client.sendall(b"QUIT\r\n")
        reader.readline()
        return greeting or "(closed without a greeting: no backend reachable)"


def wait_until_ready(process: subprocess.Popen[str], log_lines: list[str]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if any(" ready: " in line for line in log_lines):
            return
        if process.poll() is not None:
            print("".join(log_lines), end="")
            raise SystemExit("tcpfwd did not start (is 127.0.0.1:10025 in use?)")
        time.sleep(0.05)
    raise SystemExit("tcpfwd did not start listening within 15 s")


def wait_for_log(log_lines: list[str], text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in log_lines):
        if time.monotonic() > deadline:
            raise SystemExit(f"tcpfwd did not log {text!r} within {timeout} s")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-running", action="store_true", help="leave tcpfwd and mail-b up")
    args = parser.parse_args()
    servers = dict.fromkeys(PORTS)
    tcpfwd = subprocess.Popen(
        [sys.executable, "-m", "tcpfwd", "run", "--config", str(HERE / "demo.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log_lines: list[str] = []
    threading.Thread(target=lambda: log_lines.extend(tcpfwd.stdout or []), daemon=True).start()
    try:
        wait_until_ready(tcpfwd, log_lines)
        steps = [
            ("mail-a is down, mail-b and mail-c are up", {"mail-b", "mail-c"}, None),
            ("mail-b goes down too", {"mail-c"}, None),
            ("mail-a comes back", {"mail-a", "mail-c"}, "mail-a"),
            ("everything is down", set(), None),
            ("mail-b comes back", {"mail-b"}, "mail-b"),
        ]
        for title, up, returning in steps:
            for name in PORTS:
                if name in up and servers[name] is None:
                    servers[name] = DemoMailServer(name)
                elif name not in up and servers[name] is not None:
                    servers[name].stop()
                    servers[name] = None
            print(f"\n== {title}")
            for _ in range(2):
                print(f"   client got: {ask()}")
            if returning is not None:
                # Marked down when it failed, it is probed in the background: clients
                # meanwhile go to a backend that is up, and none waits for the test.
                wait_for_log(log_lines, f"backend demo/{returning} is up")
                print(f"   (tcpfwd marked {returning} up again)")
                print(f"   client got: {ask()}")
        if args.keep_running:
            print("\ntcpfwd listens on 127.0.0.1:10025 (try: nc 127.0.0.1 10025); Ctrl-C stops")
            with contextlib.suppress(KeyboardInterrupt):
                tcpfwd.wait()
    finally:
        tcpfwd.send_signal(signal.SIGTERM)
        code = tcpfwd.wait(15)
        for server in servers.values():
            if server is not None:
                server.stop()
    print("\n== tcpfwd's log (one access line per session, and daemon events)")
    time.sleep(0.2)
    for line in log_lines:
        print("  ", line.rstrip())
    print(f"\ntcpfwd stopped with exit code {code}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
