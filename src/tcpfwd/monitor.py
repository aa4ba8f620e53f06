"""Health over time: the one place where backend health changes, and the tasks that check.

The state itself is a pure `HealthTable` (health.py) keyed by ``(service, backend name)``;
the server owns it, so later an admin page can read it and a reload can keep it. This
module feeds it three kinds of evidence and logs every change of state once:

- passive: each session's attempts (``passive_success`` / ``passive_failure``);
- active checks: one task per backend with ``health.check`` set, forever, at a jittered
  interval;
- recovery probes: a backend without an active check that passive marks took down is
  probed in the background (TCP connect, or the service's greeting) until ``rise``
  probes pass, so it comes back without a client paying for the test. Without this a
  backend marked down would stay down until every other backend failed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from .checks import CheckResult, Probe, run_check
from .config import BackendConfig, GreetingSettings, HealthSettings, ServiceConfig
from .health import BackendHealth, HealthState, HealthTable, Source, Transition
from .resolver import Resolver

log = logging.getLogger("tcpfwd")

HealthKey = tuple[str, str]

# Each wait between checks is the interval times a factor drawn from this range, so checks
# of many backends (and of many tcpfwd instances) do not fall into step.
JITTER = (0.9, 1.1)


def probe_for(health: HealthSettings) -> Probe:
    """The configured active check of a backend."""
    return Probe(
        kind=health.check,
        timeout=health.timeout,
        send=(health.send or "").encode("utf-8"),
        expect=health.expect_pattern,
        ehlo=health.ehlo,
    )


def recovery_probe_for(health: HealthSettings, greeting: GreetingSettings | None) -> Probe:
    """The probe of a backend that passive marks took down and no active check watches.

    It asks what a client connection will ask: a plain connect, or, where the service
    waits for a greeting, that greeting (an SMTP preset completes EHLO/QUIT so the mail
    server logs a clean session rather than a lost connection).
    """
    if greeting is None:
        return Probe("tcp", health.timeout)
    if greeting.preset == "smtp":
        return Probe("smtp", health.timeout, ehlo=health.ehlo)
    return Probe("greeting", health.timeout, expect=greeting.pattern)


@dataclass(slots=True)
class _Target:
    service: ServiceConfig
    backend: BackendConfig
    health: BackendHealth
    probe: Probe | None
    recovery: Probe
    task: asyncio.Task[None] | None = None


class HealthMonitor:
    def __init__(
        self,
        table: HealthTable[HealthKey],
        resolver: Resolver,
        clock: Callable[[], float] = time.time,
        on_check: Callable[[HealthKey, float], None] | None = None,
    ) -> None:
        self.table = table
        # Told how long each check took (for the metrics).
        self._on_check = on_check
        self._resolver = resolver
        self._clock = clock
        self._targets: dict[HealthKey, _Target] = {}
        self._running = False
        # False in workers but the first: one process checks, the others adopt its verdict.
        self.active_checks = True

    def register(self, service: ServiceConfig) -> list[BackendHealth | None]:
        """Health entries for a service's backends, in its order; None where not tracked."""
        entries: list[BackendHealth | None] = []
        for backend in service.backends:
            settings = backend.health
            if not settings.tracked:
                entries.append(None)
                continue
            key = (service.name, backend.name)
            health = self.table.ensure(key, rise=settings.rise, fall=settings.fall)
            probe = probe_for(settings) if settings.check != "none" else None
            recovery = recovery_probe_for(settings, service.settings.greeting)
            target = _Target(service, backend, health, probe, recovery)
            # A reload registers a service again: its backend's checker starts over with
            # the new settings, while the health state itself is kept.
            previous = self._targets.get(key)
            if previous is not None and previous.task is not None:
                previous.task.cancel()
            self._targets[key] = target
            if self._running:
                self._ensure_task(target)
            entries.append(health)
        return entries

    def retain(self, keys: set[HealthKey]) -> None:
        """Forget backends no longer configured: stop their checks, drop their state."""
        for key in [k for k in self._targets if k not in keys]:
            task = self._targets.pop(key).task
            if task is not None:
                task.cancel()
        self.table.retain(keys)

    def start(self) -> None:
        """Start the active checks (and probes of backends already down)."""
        self._running = True
        for target in self._targets.values():
            self._ensure_task(target)

    async def stop(self) -> None:
        self._running = False
        tasks = [t.task for t in self._targets.values() if t.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- evidence from sessions ---------------------------------------------------------

    def passive_success(self, service: str, backend: str) -> None:
        target = self._targets.get((service, backend))
        if target is None or not target.backend.health.passive:
            return
        self._report(target, target.health.observe_success(Source.PASSIVE, self._clock()))

    def passive_failure(self, service: str, backend: str, reason: str) -> None:
        target = self._targets.get((service, backend))
        if target is None or not target.backend.health.passive:
            return
        self._report(target, target.health.observe_failure(Source.PASSIVE, reason, self._clock()))

    def adopt(self, key: HealthKey, state: str, reason: str) -> None:
        """Take another process's verdict on an actively checked backend (workers)."""
        target = self._targets.get(key)
        if target is None or target.probe is None or target.health.state.value == state:
            return
        self._report(target, target.health.force(HealthState(state), reason, self._clock()))

    # --- checks ---------------------------------------------------------------------

    def _report(self, target: _Target, transition: Transition | None) -> None:
        if transition is None:
            return
        level = logging.WARNING if transition.current is HealthState.DOWN else logging.INFO
        log.log(
            level,
            "backend %s/%s is %s: %s (%s)",
            target.service.name,
            target.backend.name,
            transition.current.value,
            transition.reason,
            transition.source.value,
        )
        if transition.current is HealthState.DOWN:
            self._ensure_task(target)

    def _ensure_task(self, target: _Target) -> None:
        if not self._running or (target.task is not None and not target.task.done()):
            return
        if target.probe is not None:
            if self.active_checks:
                target.task = asyncio.get_running_loop().create_task(self._check_forever(target))
        elif not target.health.is_up:
            target.task = asyncio.get_running_loop().create_task(self._probe_until_up(target))

    async def _check(self, target: _Target, probe: Probe) -> None:
        settings = target.service.settings
        started = time.monotonic()
        result: CheckResult = await run_check(
            probe,
            target.backend.address.host,
            target.backend.address.port,
            resolver=self._resolver,
            dns_ttl=settings.dns_ttl,
            source_address=settings.source_address,
            send_proxy=target.backend.send_proxy,
        )
        if self._on_check is not None:
            self._on_check((target.service.name, target.backend.name), time.monotonic() - started)
        now = self._clock()
        if result.ok:
            transition = target.health.observe_success(Source.CHECK, now, result.detail)
        else:
            transition = target.health.observe_failure(Source.CHECK, result.detail, now)
        self._report(target, transition)

    def _pause(self, target: _Target) -> float:
        return target.backend.health.interval * random.uniform(*JITTER)

    async def _check_forever(self, target: _Target) -> None:
        assert target.probe is not None
        # The first check comes within one interval, spread so backends are not in step.
        await asyncio.sleep(random.uniform(0, target.backend.health.interval))
        while True:
            await self._check(target, target.probe)
            await asyncio.sleep(self._pause(target))

    async def _probe_until_up(self, target: _Target) -> None:
        health = target.health
        while health.state is HealthState.DOWN:
            await asyncio.sleep(self._pause(target))
            # A real connection may have succeeded meanwhile (fail-open tries down ones).
            if health.state is HealthState.DOWN:
                await self._check(target, target.recovery)
