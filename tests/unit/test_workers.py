"""Workers without a process: the count and reuse_port settings, and the restart
backoff of a worker that keeps dying. Supervisors and their workers are tested in
tests/e2e/test_workers.py."""

from __future__ import annotations

import os

import pytest

from support import service
from tcpfwd.config import ConfigError, parse_config
from tcpfwd.workerprocess import WorkerProcess


def test_workers_parse_a_count_or_auto():
    base = {"services": {"a": service()}}
    assert parse_config(base, "x").workers == 1
    auto = parse_config({**base, "global": {"workers": "auto"}}, "x")
    assert auto.workers == len(os.sched_getaffinity(0))
    assert parse_config({**base, "global": {"workers": 3}}, "x").workers == 3
    for bad in (0, -1, "many", 1.5, True, 1000):
        with pytest.raises(ConfigError, match=r"global\.workers"):
            parse_config({**base, "global": {"workers": bad}}, "x")
    assert parse_config(base, "x").reuse_port is True
    assert parse_config({**base, "global": {"reuse_port": False}}, "x").reuse_port is False
    with pytest.raises(ConfigError, match=r"global\.reuse_port"):
        parse_config({**base, "global": {"reuse_port": "sometimes"}}, "x")


def test_restarts_back_off_while_a_worker_keeps_dying_young():
    worker = WorkerProcess(0, ["true"])
    worker.started = 100.0
    assert [worker.schedule_restart(101.0) for _ in range(3)] == [0.5, 1.0, 2.0]
    assert max(worker.schedule_restart(101.0) for _ in range(10)) == 30.0
    # After a stable run, at once, and the pauses start over.
    assert worker.schedule_restart(200.0) == 0.0
    assert worker.schedule_restart(101.0) == 0.5
    assert worker.restarts == 15
    assert worker.restart_due(101.5) and not worker.restart_due(101.4)
