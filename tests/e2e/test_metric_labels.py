"""Metric label values come from a fixed set: what a backend sends cannot mint series.
The access line keeps the detail. The mapping itself is tested in
tests/unit/test_metric_labels.py."""

from __future__ import annotations

import random
import socket

from support import (
    ThreadedServer,
    admin_url,
    echo_server,
    exchange,
    metric_samples,
    service_config,
    toml_table,
    write_config,
)
from tcpfwd.vocabulary import Outcome

CONNECTIONS = 120


def random_greeter(seed: int) -> ThreadedServer:
    """Greets every connection with a different first word, then closes."""
    chooser = random.Random(seed)
    words = [f"{chooser.randrange(300, 600)}" for _ in range(CONNECTIONS // 2)]
    words += [f"W{chooser.getrandbits(40):x}" for _ in range(CONNECTIONS // 2)]
    chooser.shuffle(words)

    def handle(conn: socket.socket) -> None:
        word = words.pop() if words else "x"
        conn.sendall(word.encode() + b" not today\r\n")
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(5)
        while conn.recv(4096):
            pass

    return ThreadedServer(handle)


def label_values(url: str, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample, labels in metric_samples(url) if sample == name}


def test_random_greetings_do_not_create_metric_series(run_tcpfwd, tmp_path):
    with random_greeter(7) as noisy, echo_server(b"220 good\r\n") as good:
        backends = [
            {"address": noisy.address, "name": "noisy", "health": {"passive": False}},
            {"address": good.address, "name": "good"},
        ]
        config = write_config(
            tmp_path,
            toml_table("admin", listen="127.0.0.1:0")
            + service_config(backends, name="mail", greeting={"expect": "^220 "}),
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        url = admin_url(proxy)
        for _ in range(CONNECTIONS):
            assert exchange(proxy.address("mail"), b"") == b"220 good\r\n"
        records = proxy.access_records(CONNECTIONS)
        outcomes = label_values(url, "tcpfwd_backend_attempts_total", "outcome")
        reasons = label_values(url, "tcpfwd_failovers_total", "reason")
    # The access lines name every greeting's first word ...
    details = {r["failed"].split("/")[2] for r in records}
    assert len(details) > CONNECTIONS // 2
    mismatch = Outcome.GREETING_MISMATCH
    assert all(d.startswith(f"{mismatch}:") for d in details)
    # ... the metrics only its kind.
    assert outcomes <= {
        Outcome.OK,
        f"{mismatch}_1xx",
        f"{mismatch}_2xx",
        f"{mismatch}_3xx",
        f"{mismatch}_4xx",
        f"{mismatch}_5xx",
        f"{mismatch}_other",
    }
    assert f"{mismatch}_other" in outcomes
    assert reasons == outcomes - {Outcome.OK}
