"""Takes docs/status-page.png: the status page after a few minutes of traffic and a failure.

Everything runs on loopback: echo backends, a tcpfwd with two services, clients at a
varying rate. A third of the way in, mail1 stops listening: the first client after that
pays one refused attempt, smtp marks mail1 down and sends everyone to mail2; two thirds
of the way in mail1 listens again and the background probes bring it back. imap2 is away
for a shorter while in between. Then headless Chromium loads the status page and saves a
screenshot.

    python docs/status_screenshot.py              # 6 minutes
    python docs/status_screenshot.py --minutes 2 --output /tmp/status.png
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Echo(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class Backend:
    """An echo server that can stop listening and start again on the same port."""

    def __init__(self) -> None:
        self.server = Echo(("127.0.0.1", 0), EchoHandler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def start(self) -> None:
        self.server = Echo(("127.0.0.1", self.port), EchoHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def client(address: tuple[str, int], size: int) -> None:
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(os.urandom(size))
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--output", default=str(ROOT / "docs" / "status-page.png"))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed")
    backends = {name: Backend() for name in ("mail1", "mail2", "backup", "imap1", "imap2")}
    folder = Path(tempfile.mkdtemp(prefix="tcpfwd-screenshot-"))
    config = folder / "tcpfwd.toml"
    port = {name: backend.port for name, backend in backends.items()}
    config.write_text(
        f"""
[admin]
listen = "127.0.0.1:0"

[services.smtp]
listen = "127.0.0.1:0"
backends = [
    {{ address = "127.0.0.1:{port["mail1"]}", name = "mail1" }},
    {{ address = "127.0.0.1:{port["mail2"]}", name = "mail2" }},
    {{ address = "127.0.0.1:{port["backup"]}", name = "backup", tier = 1 }},
]

[services.imap]
listen = "127.0.0.1:0"
policy = "round-robin"
backends = [
    {{ address = "127.0.0.1:{port["imap1"]}", name = "imap1" }},
    {{ address = "127.0.0.1:{port["imap2"]}", name = "imap2" }},
]
"""
    )
    environment = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tcpfwd", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        listening: dict[str, tuple[str, int]] = {}
        admin = ""
        assert proxy.stderr is not None
        for line in proxy.stderr:
            if match := re.search(r"listening on (\S+):(\d+) for service (\w+)", line):
                listening[match.group(3)] = (match.group(1), int(match.group(2)))
            if match := re.search(r"admin endpoint on (\S+)", line):
                admin = match.group(1)
                break
        threading.Thread(target=lambda: [None for _ in proxy.stderr or ()], daemon=True).start()
        duration = args.minutes * 60
        started = time.monotonic()
        down = up = False
        imap_away = imap_back = False
        while (elapsed := time.monotonic() - started) < duration:
            if not imap_away and elapsed > duration * 0.45:
                backends["imap2"].stop()
                imap_away = True
            if not imap_back and elapsed > duration * 0.55:
                backends["imap2"].start()
                imap_back = True
            if not down and elapsed > duration / 3:
                backends["mail1"].stop()
                down = True
                print(f"{elapsed:5.0f}s mail1 stops listening")
            if not up and elapsed > duration * 2 / 3:
                backends["mail1"].start()
                up = True
                print(f"{elapsed:5.0f}s mail1 listens again")
            # Traffic that ebbs and flows, so the sparklines have a shape.
            wave = 1 + math.sin(elapsed / duration * 4 * math.pi)
            client(listening["smtp"], random.randint(2_000, 40_000))
            if random.random() < 0.4:
                client(listening["imap"], random.randint(500, 5_000))
            time.sleep(0.02 + 0.15 * (2 - wave) / 2)
        time.sleep(1.5)  # the sampler's next reading
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={folder / 'profile'}",
                "--virtual-time-budget=5000",
                "--window-size=1200,1000",
                f"--screenshot={args.output}",
                admin + "/",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        print(f"wrote {args.output}")
    finally:
        proxy.terminate()
        proxy.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
