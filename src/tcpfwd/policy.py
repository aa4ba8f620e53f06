"""The order in which to try a service's backends for one connection.

Pure: no asyncio, no sockets, no clock. The dialer builds one `Candidate` per configured
backend from config, health and live session counts, asks its service's `Scheduler` for an
order, and tries the backends in that order until one connects.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b
from math import log
from operator import attrgetter

from .vocabulary import Policy

__all__ = ["Candidate", "Scheduler"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One configured backend as the scheduler sees it for one connection.

    `index` must be unique within one `order` call. `name` is the backend's stable identity
    for source-hash: with it, editing the backend list on reload moves only the clients of
    the backends added or removed; without it the index is used, so inserting a backend in
    the middle of the list would reshuffle the clients of every later backend.
    """

    index: int
    tier: int = 0
    weight: int = 1
    up: bool = True
    available: bool = True
    active: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"backend {self.index}: weight must be >= 0, got {self.weight}")


_TIER_INDEX = attrgetter("tier", "index")
# 52 bits of hash give a float in (0, 1) with every value exactly representable, so the
# logarithm below never sees 0 or 1.
_HASH_SHIFT = 64 - 52
_HASH_SCALE = 2.0**-52


class Scheduler:
    """Per-service scheduling state (round-robin position, RNG). One per service, long lived.

    Create a new one when the service's backend list changes on reload: the round-robin
    state is keyed by `Candidate.index`. Not thread-safe (one event loop owns it).
    """

    __slots__ = ("_current", "_policy", "_rng", "_tick")

    def __init__(self, policy: Policy, *, seed: int | None = None) -> None:
        self._policy = Policy(policy)
        self._rng = random.Random(seed)
        # Smooth weighted round-robin "current weight" per backend index (nginx's algorithm).
        self._current: dict[int, int] = {}
        # Call counter: rotates the tie-break of least-connections so equal backends share.
        self._tick = 0

    @property
    def policy(self) -> Policy:
        return self._policy

    def order(self, candidates: Sequence[Candidate], client_key: str = "") -> list[int]:
        """Indices (`Candidate.index`) to try, in order.

        The contract:

        1. Candidates with ``available=False`` are never returned; every other one is
           returned exactly once.
        2. The head of the list is the UP candidates, tier by tier in ascending tier order.
           Within a tier, backends with weight > 0 come first, ordered by the policy; the
           weight-0 backends follow (they are used only when nothing else in the tier is
           usable), ordered by the same policy as if each had weight 1. A tier whose up
           backends all have weight 0 is therefore ordered as if all had weight 1.

           - failover: configured order (index ascending); weights are ignored except
             that weight 0 marks a backup, as for every policy.
           - round-robin: smooth weighted round-robin (nginx's): over any run of calls with
             the same candidates the first choice is spread exactly in proportion to weight
             (weights 5, 1, 1 give A A B A C A A, then repeat); the rest of the tier follows
             in configured order, rotating from the first choice, so a failing first choice
             falls over to the next backend rather than always to the same one.
           - least-connections: ascending ``active / weight``; ties rotate from call to call
             so that equally loaded backends share new connections.
           - random: weighted random permutation (the first choice has probability
             weight / total weight, then sampling without replacement), from the
             scheduler's own ``random.Random(seed)``.
           - source-hash: weighted rendezvous hashing of ``client_key`` (pass the client
             address) with blake2b: the same key and the same candidates always give the
             same order; a backend going down, disabled or removed moves only the clients
             whose first choice it was, and the rest of each order is the failover order for
             that client. An empty key is a key like any other: every such client maps to
             the same backend.
        3. The tail is the DOWN (but available) candidates in configured order (tier
           ascending, then index). This is fail-open: passive health can be wrong, so a down
           backend is a last resort after every up one failed, and when all are down all
           are still tried.

        Rounds of round-robin and least-connections advance once per call, in every tier,
        whether or not the caller ends up using that tier.
        """
        self._tick += 1
        up = [c for c in candidates if c.up and c.available]
        out: list[int] = []
        if up:
            up.sort(key=_TIER_INDEX)
            if self._policy is Policy.FAILOVER and all(c.weight > 0 for c in up):
                # Fast path: the configured order. Weight-0 (backup) backends need the
                # per-tier split below, which orders each group by index for failover.
                out.extend(c.index for c in up)
            elif up[0].tier == up[-1].tier:
                self._order_tier(up, client_key, out)
            else:
                start = 0
                for i in range(1, len(up) + 1):
                    if i == len(up) or up[i].tier != up[start].tier:
                        self._order_tier(up[start:i], client_key, out)
                        start = i
        if len(out) != len(candidates):
            down = [c for c in candidates if c.available and not c.up]
            if down:
                down.sort(key=_TIER_INDEX)
                out.extend(c.index for c in down)
        return out

    def _order_tier(self, tier: list[Candidate], client_key: str, out: list[int]) -> None:
        """Append one tier's up candidates (index-sorted) to `out` in policy order."""
        if len(tier) == 1:
            out.append(tier[0].index)
            return
        weighted = [c for c in tier if c.weight > 0]
        if len(weighted) == len(tier):
            self._order_group(tier, False, client_key, out)
        elif not weighted:
            self._order_group(tier, True, client_key, out)
        else:
            self._order_group(weighted, False, client_key, out)
            self._order_group([c for c in tier if c.weight == 0], True, client_key, out)

    def _order_group(
        self, group: list[Candidate], unit: bool, client_key: str, out: list[int]
    ) -> None:
        """Append `group` (index-sorted) in policy order; `unit` treats every weight as 1."""
        policy = self._policy
        if len(group) == 1:
            out.append(group[0].index)
        elif policy is Policy.ROUND_ROBIN:
            first = self._smooth_wrr(group, unit)
            out.extend(c.index for c in group[first:])
            out.extend(c.index for c in group[:first])
        elif policy is Policy.LEAST_CONNECTIONS:
            n = len(group)
            start = self._tick % n
            ranked = sorted(
                range(n),
                key=lambda i: (
                    group[i].active if unit else group[i].active / group[i].weight,
                    (i - start) % n,
                ),
            )
            out.extend(group[i].index for i in ranked)
        elif policy is Policy.RANDOM:
            if unit:
                indices = [c.index for c in group]
                self._rng.shuffle(indices)
                out.extend(indices)
            else:
                # Efraimidis-Spirakis: sorting by Exp(weight) draws is successive weighted
                # sampling without replacement.
                expo = self._rng.expovariate
                keyed = sorted((expo(c.weight), c.index) for c in group)
                out.extend(index for _, index in keyed)
        elif policy is Policy.SOURCE_HASH:
            out.extend(index for _, index in _rendezvous(group, unit, client_key))
        else:  # FAILOVER never gets here: order() handles it without grouping.
            out.extend(c.index for c in group)

    def _smooth_wrr(self, group: list[Candidate], unit: bool) -> int:
        """One round of nginx's smooth weighted round-robin; the position chosen in group."""
        current = self._current
        total = 0
        best = 0
        best_weight = 0
        for pos, c in enumerate(group):
            weight = 1 if unit else c.weight
            cw = current.get(c.index, 0) + weight
            current[c.index] = cw
            total += weight
            # Strict '>' keeps the lowest index on ties, which makes the sequence predictable.
            if pos == 0 or cw > best_weight:
                best = pos
                best_weight = cw
        current[group[best].index] = best_weight - total
        return best


def _rendezvous(group: list[Candidate], unit: bool, client_key: str) -> list[tuple[float, int]]:
    """(key, index) sorted best first: key = -ln(u) / weight, u = hash(client, backend).

    Ascending -ln(u)/w is the same order as descending -w/ln(u), the usual weighted
    rendezvous score; each backend's score depends only on the client and that backend,
    which is what makes adding or removing one move only its own clients.
    """
    raw = client_key.encode("utf-8", "surrogatepass")
    # The length prefix keeps (client, backend) pairs unambiguous when concatenated.
    base = blake2b(len(raw).to_bytes(4, "big") + raw, digest_size=8)
    keyed: list[tuple[float, int]] = []
    for c in group:
        h = base.copy()
        h.update(b"n" + c.name.encode("utf-8", "surrogatepass") if c.name else b"i%d" % c.index)
        u = ((int.from_bytes(h.digest(), "big") >> _HASH_SHIFT) + 0.5) * _HASH_SCALE
        score = -log(u)
        keyed.append((score if unit else score / c.weight, c.index))
    keyed.sort()
    return keyed
