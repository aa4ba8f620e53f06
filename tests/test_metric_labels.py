"""Metric label values come from a fixed set: what a backend sends cannot mint series.
The access line keeps the detail."""

from __future__ import annotations

import random
import socket
import urllib.request

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from support import ThreadedServer, echo_server, exchange
from tcpfwd.metrics import outcome_label, outcome_labels

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


def label_values(url: str, family_name: str, label: str) -> set[str]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        body = response.read().decode()
    values = set()
    for family in text_string_to_metric_families(body):
        if family.name == family_name:
            values |= {sample.labels[label] for sample in family.samples}
    return values


def test_random_greetings_do_not_create_metric_series(run_tcpfwd, tmp_path):
    with random_greeter(7) as noisy, echo_server(b"220 good\r\n") as good:
        config = tmp_path / "tcpfwd.toml"
        config.write_text(
            f"""
[admin]
listen = "127.0.0.1:0"
[services.mail]
listen = "127.0.0.1:0"
greeting = {{ expect = "^220 " }}
backends = [
    {{ address = "{noisy.address}", name = "noisy", health = {{ passive = false }} }},
    {{ address = "{good.address}", name = "good" }},
]
"""
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        url = proxy.wait_for_event("admin endpoint on ").split("admin endpoint on ", 1)[1]
        for _ in range(CONNECTIONS):
            assert exchange(proxy.address("mail"), b"") == b"220 good\r\n"
        records = proxy.access_records(CONNECTIONS)
        outcomes = label_values(url, "tcpfwd_backend_attempts", "outcome")
        reasons = label_values(url, "tcpfwd_failovers", "reason")
    # The access lines name every greeting's first word ...
    details = {r["failed"].split("/")[2] for r in records}
    assert len(details) > CONNECTIONS // 2
    assert all(d.startswith("greeting_mismatch:") for d in details)
    # ... the metrics only its kind.
    assert outcomes <= {
        "ok",
        "greeting_mismatch_1xx",
        "greeting_mismatch_2xx",
        "greeting_mismatch_3xx",
        "greeting_mismatch_4xx",
        "greeting_mismatch_5xx",
        "greeting_mismatch_other",
    }
    assert "greeting_mismatch_other" in outcomes
    assert reasons == outcomes - {"ok"}


def test_outcomes_map_to_fixed_words():
    assert outcome_label("ok") == "ok"
    assert outcome_label("refused") == "refused"
    assert outcome_label("econnaborted") == "econnaborted"
    assert outcome_label("greeting_mismatch:421") == "greeting_mismatch_4xx"
    assert outcome_label("greeting_mismatch:554") == "greeting_mismatch_5xx"
    assert outcome_label("greeting_mismatch:+OK") == "greeting_mismatch_other"
    assert outcome_label("greeting_mismatch:?") == "greeting_mismatch_other"
    assert outcome_label("greeting_mismatch:٤٢١") == "greeting_mismatch_other"
    assert outcome_label("RuntimeError") == "other"


@given(st.text(max_size=40))
def test_any_outcome_maps_into_the_fixed_set(text):
    fixed = outcome_labels()
    assert outcome_label(text) in fixed
    assert outcome_label(f"greeting_mismatch:{text}") in fixed
