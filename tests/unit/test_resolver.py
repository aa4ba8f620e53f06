"""The backend name cache: TTL, shared lookups, negative caching, serve-stale."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from tcpfwd.resolver import NEGATIVE_TTL, Resolver

TWO = (("192.0.2.1", 25), ("192.0.2.2", 25))


class FakeDns:
    """Stands in for getaddrinfo and the clock: counts queries, answers what it is told."""

    def __init__(self) -> None:
        self.queries = 0
        self.answer = ["192.0.2.1", "192.0.2.2", "192.0.2.1"]
        self.error: OSError | None = None
        self.gate: asyncio.Event | None = None
        self.now = 1000.0

    async def getaddrinfo(self, host: str, port: int, **_kwargs: Any) -> list[tuple[Any, ...]]:
        self.queries += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in self.answer]

    def resolver(self) -> Resolver:
        return Resolver(getaddrinfo=self.getaddrinfo, clock=lambda: self.now)


async def test_every_address_once_in_order_and_ip_literals_without_a_query():
    dns = FakeDns()
    resolver = dns.resolver()
    assert await resolver.resolve("mx.example", 25, 30) == TWO
    assert await resolver.resolve("192.0.2.9", 25, 30) == (("192.0.2.9", 25),)
    assert dns.queries == 1


async def test_answer_is_reused_within_the_ttl():
    dns = FakeDns()
    resolver = dns.resolver()
    for _ in range(5):
        await resolver.resolve("mx.example", 25, 30)
        dns.now += 5
    assert dns.queries == 1


async def test_expired_answer_is_served_while_one_refresh_runs():
    dns = FakeDns()
    resolver = dns.resolver()
    await resolver.resolve("mx.example", 25, 30)
    dns.now += 31
    dns.answer = ["192.0.2.3"]
    dns.gate = asyncio.Event()  # the refresh hangs
    assert await resolver.resolve("mx.example", 25, 30) == TWO
    await asyncio.sleep(0)
    assert await resolver.resolve("mx.example", 25, 30) == TWO
    await asyncio.sleep(0)
    assert dns.queries == 2
    dns.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await resolver.resolve("mx.example", 25, 30) == (("192.0.2.3", 25),)


async def test_a_failed_refresh_keeps_the_old_answer():
    dns = FakeDns()
    resolver = dns.resolver()
    await resolver.resolve("mx.example", 25, 30)
    dns.now += 31
    dns.error = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert await resolver.resolve("mx.example", 25, 30) == TWO
    await asyncio.sleep(0)
    assert await resolver.resolve("mx.example", 25, 30) == TWO


async def test_a_name_that_no_longer_exists_is_forgotten():
    dns = FakeDns()
    resolver = dns.resolver()
    await resolver.resolve("mx.example", 25, 30)
    dns.now += 31
    dns.error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    await resolver.resolve("mx.example", 25, 30)  # stale, while the refresh finds out
    await asyncio.sleep(0)
    with pytest.raises(socket.gaierror):
        await resolver.resolve("mx.example", 25, 30)


async def test_failure_is_remembered_briefly_so_a_dead_dns_costs_one_wait():
    dns = FakeDns()
    dns.error = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    resolver = dns.resolver()
    for _ in range(3):
        with pytest.raises(socket.gaierror):
            await resolver.resolve("mx.example", 25, 30)
    assert dns.queries == 1
    dns.now += NEGATIVE_TTL + 0.1
    dns.error = None
    assert await resolver.resolve("mx.example", 25, 30) == TWO
    assert dns.queries == 2


async def test_concurrent_lookups_share_one_query_and_a_caller_giving_up_does_not_cancel_it():
    dns = FakeDns()
    dns.gate = asyncio.Event()
    resolver = dns.resolver()
    impatient = asyncio.ensure_future(resolver.resolve("mx.example", 25, 30))
    patient = [asyncio.ensure_future(resolver.resolve("mx.example", 25, 30)) for _ in range(3)]
    await asyncio.sleep(0)
    impatient.cancel()
    dns.gate.set()
    assert await asyncio.gather(*patient) == [TWO] * 3
    assert dns.queries == 1


async def test_ttl_zero_resolves_every_time():
    dns = FakeDns()
    resolver = dns.resolver()
    for _ in range(3):
        await resolver.resolve("mx.example", 25, 0)
    assert dns.queries == 3
