"""Where policy and health meet: a service's plan for each connection (no sockets)."""

from __future__ import annotations

from typing import Any

from support import service
from tcpfwd.accesslog import AccessLog
from tcpfwd.config import parse_config
from tcpfwd.daemonstate import DaemonState
from tcpfwd.health import HealthState, HealthTable
from tcpfwd.monitor import HealthKey, HealthMonitor
from tcpfwd.resolver import Resolver
from tcpfwd.service import ServiceRuntime
from tcpfwd.vocabulary import CheckKind, Outcome, Policy


def runtime(backends: list[Any], **settings: Any) -> tuple[ServiceRuntime, HealthTable[HealthKey]]:
    config = parse_config(
        {"services": {"mail": service(listen=":25", backends=backends, **settings)}}, "test"
    )
    table: HealthTable[HealthKey] = HealthTable()
    monitor = HealthMonitor(table, Resolver(), clock=lambda: 0.0)
    return ServiceRuntime(config.services[0], DaemonState(AccessLog()), monitor, Resolver()), table


def names(service: ServiceRuntime, client: str = "192.0.2.1") -> list[str]:
    return [b.name for b in service.plan(client)]


def backend(name: str, **extra: Any) -> dict[str, Any]:
    return {"address": f"{name}.example:25", "name": name, **extra}


def test_configured_order_while_all_are_up():
    service, _ = runtime([backend("a"), backend("b"), backend("c")])
    assert names(service) == ["a", "b", "c"]


def test_a_failed_backend_moves_to_the_tail_and_a_success_brings_it_back():
    service, table = runtime([backend("a"), backend("b")])
    a = service.targets[0]
    service.failed(a, Outcome.REFUSED)
    assert names(service) == ["b", "a"]
    health = table.get(("mail", "a"))
    assert health is not None and health.state is HealthState.DOWN
    service.succeeded(a)
    assert names(service) == ["a", "b"]


def test_fall_counts_consecutive_failures():
    service, _ = runtime([backend("a"), backend("b")], health={"fall": 3})
    a = service.targets[0]
    for _ in range(2):
        service.failed(a, Outcome.TIMEOUT)
    assert names(service) == ["a", "b"]
    service.failed(a, Outcome.TIMEOUT)
    assert names(service) == ["b", "a"]


def test_without_passive_health_failures_change_nothing():
    service, table = runtime([backend("a"), backend("b")], health={"passive": False})
    service.failed(service.targets[0], Outcome.REFUSED)
    assert names(service) == ["a", "b"]
    # Neither passive nor active: nothing is tracked at all.
    assert len(table) == 0


def test_every_backend_down_still_gives_the_whole_list_in_order():
    service, _ = runtime([backend("a"), backend("b"), backend("c")])
    for each in reversed(service.targets):
        service.failed(each, Outcome.REFUSED)
    assert names(service) == ["a", "b", "c"]


def test_tiers_come_in_order_whatever_the_list_order():
    service, _ = runtime(
        [backend("backup", tier=2), backend("a", tier=1), backend("b", tier=1)],
        policy=Policy.ROUND_ROBIN,
    )
    firsts = [names(service)[0] for _ in range(4)]
    assert firsts == ["a", "b", "a", "b"]
    assert all(names(service)[-1] == "backup" for _ in range(4))


def test_a_full_backend_is_left_out_until_a_slot_is_released():
    service, _ = runtime([backend("a", max_connections=2), backend("b")])
    a = service.targets[0]
    assert service.acquire(a) and service.acquire(a)
    assert not service.acquire(a)
    assert names(service) == ["b"]
    service.release(a)
    assert names(service) == ["a", "b"]


def test_least_connections_follows_live_sessions():
    service, _ = runtime(
        [backend("a"), backend("b"), backend("c")], policy=Policy.LEAST_CONNECTIONS
    )
    a, b, _c = service.targets
    service.acquire(a)
    service.acquire(a)
    service.acquire(b)
    assert names(service)[0] == "c"


def test_source_hash_keeps_a_client_on_one_backend():
    service, _ = runtime([backend(n) for n in "abcdef"], policy=Policy.SOURCE_HASH)
    clients = [f"198.51.100.{i}" for i in range(60)]
    first = {client: names(service, client)[0] for client in clients}
    assert all(names(service, client)[0] == first[client] for client in clients)
    assert len(set(first.values())) > 3


def test_health_state_lives_in_one_table_keyed_by_service_and_backend():
    service, table = runtime([backend("a"), backend("b")], health={"check": CheckKind.TCP})
    assert sorted(key for key, _ in table.items()) == [("mail", "a"), ("mail", "b")]
    service.failed(service.targets[1], Outcome.REFUSED)
    snapshot = {tuple(entry["key"]): entry for entry in table.snapshot()}
    assert snapshot[("mail", "b")]["state"] == "down"
    assert snapshot[("mail", "b")]["last_reason"] == Outcome.REFUSED
