"""The contract of `Scheduler.order`: which backends, in which order, for one connection."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tcpfwd.policy import Candidate, Scheduler
from tcpfwd.vocabulary import Policy

ALL_POLICIES = list(Policy)
WEIGHTED_POLICIES = [p for p in Policy if p is not Policy.FAILOVER]


def weighted(*weights: int) -> list[Candidate]:
    return [Candidate(i, weight=w) for i, w in enumerate(weights)]


def first_choices(scheduler: Scheduler, candidates: list[Candidate], calls: int) -> Counter[int]:
    return Counter(scheduler.order(candidates)[0] for _ in range(calls))


# --- rules common to every policy -------------------------------------------------------


def test_failover_tries_backends_in_configured_order() -> None:
    scheduler = Scheduler(Policy.FAILOVER)
    assert scheduler.order(weighted(1, 1, 1)) == [0, 1, 2]
    assert scheduler.order(weighted(1, 1, 1)) == [0, 1, 2]


def test_failover_orders_by_index_not_by_position_in_the_input() -> None:
    candidates = [Candidate(2), Candidate(0), Candidate(1)]
    assert Scheduler(Policy.FAILOVER).order(candidates) == [0, 1, 2]


def test_failover_ignores_weights() -> None:
    assert Scheduler(Policy.FAILOVER).order(weighted(1, 9, 0)) == [0, 1, 2]


def test_scheduler_accepts_the_policy_name_as_a_plain_string() -> None:
    assert Scheduler("round-robin").policy is Policy.ROUND_ROBIN  # type: ignore[arg-type]


def test_unknown_policy_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="bogus"):
        Scheduler("bogus")  # type: ignore[arg-type]


def test_negative_weight_is_rejected() -> None:
    with pytest.raises(ValueError, match="weight"):
        Candidate(0, weight=-1)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_no_candidates_gives_an_empty_order(policy: Policy) -> None:
    assert Scheduler(policy, seed=1).order([], "client") == []


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_lower_tier_is_always_tried_before_higher_tier(policy: Policy) -> None:
    candidates = [
        Candidate(0, tier=1, weight=100),
        Candidate(1, tier=0, weight=1),
        Candidate(2, tier=2, weight=100),
        Candidate(3, tier=0, weight=1),
    ]
    scheduler = Scheduler(policy, seed=1)
    for n in range(50):
        result = scheduler.order(candidates, f"client-{n}")
        assert sorted(result[:2]) == [1, 3]
        assert result[2:] == [0, 2]


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_down_backends_come_last_in_configured_order(policy: Policy) -> None:
    candidates = [
        Candidate(0, up=False),
        Candidate(1),
        Candidate(2, up=False, tier=1),
        Candidate(3, up=False),
        Candidate(4, tier=1),
    ]
    result = Scheduler(policy, seed=1).order(candidates, "client")
    assert result == [1, 4, 0, 3, 2]


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_down_backend_of_a_lower_tier_comes_after_up_backends_of_higher_tiers(
    policy: Policy,
) -> None:
    candidates = [Candidate(0, tier=0, up=False), Candidate(1, tier=5)]
    assert Scheduler(policy, seed=1).order(candidates, "client") == [1, 0]


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_unavailable_backends_are_never_returned(policy: Policy) -> None:
    candidates = [
        Candidate(0, available=False),
        Candidate(1),
        Candidate(2, available=False, up=False),
        Candidate(3, up=False),
    ]
    scheduler = Scheduler(policy, seed=1)
    for n in range(20):
        assert scheduler.order(candidates, f"client-{n}") == [1, 3]


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_all_down_still_returns_every_available_backend_in_configured_order(
    policy: Policy,
) -> None:
    candidates = [
        Candidate(2, tier=1, up=False),
        Candidate(0, up=False, weight=3),
        Candidate(1, up=False, available=False),
        Candidate(3, up=False),
    ]
    assert Scheduler(policy, seed=1).order(candidates, "client") == [0, 3, 2]


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_all_unavailable_gives_an_empty_order(policy: Policy) -> None:
    candidates = [Candidate(0, available=False), Candidate(1, available=False, up=False)]
    assert Scheduler(policy, seed=1).order(candidates, "client") == []


@pytest.mark.parametrize("policy", WEIGHTED_POLICIES)
def test_weight_zero_backend_is_used_only_after_the_weighted_ones_of_its_tier(
    policy: Policy,
) -> None:
    candidates = [Candidate(0, weight=0), Candidate(1, weight=1), Candidate(2, weight=1)]
    scheduler = Scheduler(policy, seed=1)
    for n in range(50):
        assert scheduler.order(candidates, f"client-{n}")[2] == 0


@pytest.mark.parametrize("policy", WEIGHTED_POLICIES)
def test_weight_zero_backend_of_a_lower_tier_still_precedes_a_higher_tier(
    policy: Policy,
) -> None:
    candidates = [Candidate(0, weight=0), Candidate(1, tier=1, weight=5)]
    assert Scheduler(policy, seed=1).order(candidates, "client") == [0, 1]


@pytest.mark.parametrize("policy", WEIGHTED_POLICIES)
def test_tier_of_only_weight_zero_backends_shares_load_as_if_weights_were_equal(
    policy: Policy,
) -> None:
    scheduler = Scheduler(policy, seed=1)
    candidates = weighted(0, 0, 0)
    counts = Counter(scheduler.order(candidates, f"client-{n}")[0] for n in range(3000))
    assert set(counts) == {0, 1, 2}
    assert all(800 <= count <= 1200 for count in counts.values())


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_order_does_not_modify_the_candidates(policy: Policy) -> None:
    candidates = (Candidate(1, up=False), Candidate(0, weight=2), Candidate(2, tier=1))
    before = list(candidates)
    Scheduler(policy, seed=1).order(candidates, "client")
    assert list(candidates) == before


# --- round-robin ------------------------------------------------------------------------


def test_round_robin_rotates_first_choice_through_equal_backends() -> None:
    scheduler = Scheduler(Policy.ROUND_ROBIN)
    candidates = weighted(1, 1, 1)
    assert [scheduler.order(candidates)[0] for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_round_robin_first_choice_matches_weights_exactly() -> None:
    counts = first_choices(Scheduler(Policy.ROUND_ROBIN), weighted(5, 1, 1), 700)
    assert counts == {0: 500, 1: 100, 2: 100}


def test_round_robin_is_smooth_not_bursty() -> None:
    scheduler = Scheduler(Policy.ROUND_ROBIN)
    firsts = [scheduler.order(weighted(5, 1, 1))[0] for _ in range(7)]
    assert firsts == [0, 0, 1, 0, 2, 0, 0]


def test_round_robin_rest_of_tier_follows_in_rotation_order() -> None:
    scheduler = Scheduler(Policy.ROUND_ROBIN)
    candidates = weighted(1, 1, 1)
    assert scheduler.order(candidates) == [0, 1, 2]
    assert scheduler.order(candidates) == [1, 2, 0]
    assert scheduler.order(candidates) == [2, 0, 1]


def test_round_robin_keeps_rotating_among_the_rest_when_one_goes_down() -> None:
    scheduler = Scheduler(Policy.ROUND_ROBIN)
    candidates = [Candidate(0), Candidate(1, up=False), Candidate(2)]
    firsts = [scheduler.order(candidates)[0] for _ in range(4)]
    assert firsts == [0, 2, 0, 2]
    assert scheduler.order(candidates)[-1] == 1


def test_round_robin_rotates_a_backup_tier_when_the_primary_tier_is_down() -> None:
    scheduler = Scheduler(Policy.ROUND_ROBIN)
    candidates = [Candidate(0, up=False), Candidate(1, tier=1), Candidate(2, tier=1)]
    assert [scheduler.order(candidates)[:2] for _ in range(3)] == [[1, 2], [2, 1], [1, 2]]


@pytest.mark.parametrize("weights", [(5, 1, 1), (1, 2, 3, 4), (7,), (3, 3), (1, 100)])
def test_round_robin_results_are_permutations_and_distribution_is_exact_per_cycle(
    weights: tuple[int, ...],
) -> None:
    scheduler = Scheduler(Policy.ROUND_ROBIN)
    candidates = weighted(*weights)
    cycles = 3
    counts: Counter[int] = Counter()
    for _ in range(sum(weights) * cycles):
        result = scheduler.order(candidates)
        assert sorted(result) == list(range(len(weights)))
        counts[result[0]] += 1
    assert counts == {i: w * cycles for i, w in enumerate(weights)}


# --- least-connections ------------------------------------------------------------------


def test_least_connections_picks_the_least_loaded_backend() -> None:
    candidates = [Candidate(0, active=5), Candidate(1, active=2), Candidate(2, active=9)]
    assert Scheduler(Policy.LEAST_CONNECTIONS).order(candidates) == [1, 0, 2]


def test_least_connections_compares_load_relative_to_weight() -> None:
    candidates = [
        Candidate(0, weight=1, active=3),  # 3.0
        Candidate(1, weight=4, active=8),  # 2.0
        Candidate(2, weight=2, active=5),  # 2.5
    ]
    assert Scheduler(Policy.LEAST_CONNECTIONS).order(candidates) == [1, 2, 0]


def test_least_connections_equal_backends_share_new_connections() -> None:
    counts = first_choices(Scheduler(Policy.LEAST_CONNECTIONS), weighted(1, 1, 1), 300)
    assert counts == {0: 100, 1: 100, 2: 100}


def test_least_connections_puts_weight_zero_last_even_when_idle() -> None:
    candidates = [Candidate(0, weight=0, active=0), Candidate(1, weight=1, active=50)]
    assert Scheduler(Policy.LEAST_CONNECTIONS).order(candidates) == [1, 0]


def test_least_connections_orders_weight_zero_backends_by_their_load() -> None:
    candidates = [Candidate(0, weight=0, active=4), Candidate(1, weight=0, active=1)]
    assert Scheduler(Policy.LEAST_CONNECTIONS).order(candidates) == [1, 0]


# --- random -----------------------------------------------------------------------------


def test_random_with_the_same_seed_gives_the_same_sequence() -> None:
    a = Scheduler(Policy.RANDOM, seed=42)
    b = Scheduler(Policy.RANDOM, seed=42)
    candidates = weighted(3, 1, 2, 1)
    assert [a.order(candidates) for _ in range(100)] == [b.order(candidates) for _ in range(100)]


def test_random_orders_vary_between_calls() -> None:
    scheduler = Scheduler(Policy.RANDOM, seed=7)
    orders = {tuple(scheduler.order(weighted(1, 1, 1))) for _ in range(200)}
    assert len(orders) == 6


def test_random_first_choice_follows_weights_within_tolerance() -> None:
    counts = first_choices(Scheduler(Policy.RANDOM, seed=3), weighted(6, 3, 1), 10_000)
    assert 5700 <= counts[0] <= 6300
    assert 2700 <= counts[1] <= 3300
    assert 800 <= counts[2] <= 1200


def test_random_second_choice_is_weighted_among_the_rest() -> None:
    # With the first choice fixed at backend 0, the second is 1 or 2 in ratio 3:1.
    scheduler = Scheduler(Policy.RANDOM, seed=5)
    seconds = Counter(
        result[1]
        for result in (scheduler.order(weighted(50, 3, 1)) for _ in range(20_000))
        if result[0] == 0
    )
    share = seconds[1] / (seconds[1] + seconds[2])
    assert 0.70 <= share <= 0.80


# --- source-hash ------------------------------------------------------------------------


def test_source_hash_gives_the_same_order_for_the_same_client() -> None:
    candidates = weighted(1, 1, 1, 1, 1)
    first = Scheduler(Policy.SOURCE_HASH).order(candidates, "192.0.2.7")
    other_instance = Scheduler(Policy.SOURCE_HASH, seed=99)
    for _ in range(10):
        assert other_instance.order(candidates, "192.0.2.7") == first


def test_source_hash_is_stable_across_releases() -> None:
    # A change here would move every client to a new backend on upgrade: it must be on
    # purpose, not a side effect of refactoring the hash.
    candidates = [Candidate(i, name=name) for i, name in enumerate("abcd")]
    scheduler = Scheduler(Policy.SOURCE_HASH)
    assert scheduler.order(candidates, "192.0.2.1") == [0, 2, 3, 1]
    assert scheduler.order(candidates, "2001:db8::1") == [3, 1, 0, 2]
    assert scheduler.order(weighted(1, 1, 1), "client") == [2, 0, 1]


def test_source_hash_spreads_different_clients_evenly() -> None:
    scheduler = Scheduler(Policy.SOURCE_HASH)
    candidates = weighted(1, 1, 1, 1)
    counts = Counter(
        scheduler.order(candidates, f"10.0.{n // 256}.{n % 256}")[0] for n in range(8000)
    )
    assert all(1700 <= counts[i] <= 2300 for i in range(4))


def test_source_hash_honours_weights_roughly() -> None:
    scheduler = Scheduler(Policy.SOURCE_HASH)
    candidates = weighted(3, 1)
    counts = Counter(scheduler.order(candidates, f"client-{n}")[0] for n in range(8000))
    assert 5700 <= counts[0] <= 6300


def test_source_hash_rest_of_the_order_differs_between_clients() -> None:
    scheduler = Scheduler(Policy.SOURCE_HASH)
    orders = {tuple(scheduler.order(weighted(1, 1, 1), f"client-{n}")) for n in range(300)}
    assert len(orders) == 6


def test_source_hash_uses_the_backend_name_so_reordering_the_list_keeps_clients() -> None:
    names = ["alpha", "beta", "gamma", "delta"]
    before = [Candidate(i, name=name) for i, name in enumerate(names)]
    # "beta" removed from the configuration: every later backend changes index.
    after = [Candidate(i, name=name) for i, name in enumerate(n for n in names if n != "beta")]
    scheduler = Scheduler(Policy.SOURCE_HASH)
    for n in range(500):
        key = f"client-{n}"
        old = names[scheduler.order(before, key)[0]]
        new = [c.name for c in after][scheduler.order(after, key)[0]]
        if old != "beta":
            assert new == old


unique_names = st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=8, unique=True)


@given(
    names=unique_names,
    weights=st.lists(st.integers(1, 5), min_size=8, max_size=8),
    removed=st.integers(0, 7),
    clients=st.lists(st.text(max_size=20), min_size=1, max_size=30),
)
def test_source_hash_removing_a_backend_moves_only_its_own_clients(
    names: list[str], weights: list[int], removed: int, clients: list[str]
) -> None:
    removed %= len(names)
    before = [Candidate(i, weight=weights[i], name=name) for i, name in enumerate(names)]
    after = [c for c in before if c.index != removed]
    scheduler = Scheduler(Policy.SOURCE_HASH)
    for client in clients:
        old = scheduler.order(before, client)
        new = scheduler.order(after, client)
        if old[0] != removed:
            assert new[0] == old[0]
        # Rendezvous: the rest keeps its relative order, so failover paths are stable too.
        assert new == [i for i in old if i != removed]


@given(
    names=unique_names,
    marked=st.integers(0, 7),
    clients=st.lists(st.text(max_size=20), min_size=1, max_size=30),
)
def test_source_hash_marking_a_backend_down_moves_only_its_own_clients(
    names: list[str], marked: int, clients: list[str]
) -> None:
    marked %= len(names)
    before = [Candidate(i, name=name) for i, name in enumerate(names)]
    after = [Candidate(i, name=name, up=i != marked) for i, name in enumerate(names)]
    scheduler = Scheduler(Policy.SOURCE_HASH)
    for client in clients:
        old = scheduler.order(before, client)
        assert scheduler.order(after, client) == [i for i in old if i != marked] + [marked]


@given(
    names=unique_names,
    new_name=st.text(min_size=1, max_size=8),
    clients=st.lists(st.text(max_size=20), min_size=1, max_size=30),
)
def test_source_hash_adding_a_backend_moves_clients_only_to_it(
    names: list[str], new_name: str, clients: list[str]
) -> None:
    assume(new_name not in names)
    before = [Candidate(i, name=name) for i, name in enumerate(names)]
    added = len(names)
    after = [*before, Candidate(added, name=new_name)]
    scheduler = Scheduler(Policy.SOURCE_HASH)
    for client in clients:
        old_first = scheduler.order(before, client)[0]
        assert scheduler.order(after, client)[0] in (old_first, added)


# --- properties of every policy ---------------------------------------------------------


candidate_lists = st.lists(
    st.builds(
        Candidate,
        index=st.integers(0, 40),
        tier=st.integers(-1, 3),
        weight=st.integers(0, 6),
        up=st.booleans(),
        available=st.booleans(),
        active=st.integers(0, 20),
        name=st.sampled_from(["", "a", "b", "c"]),
    ),
    max_size=12,
    unique_by=lambda c: c.index,
)


@settings(max_examples=300)
@given(
    policy=st.sampled_from(ALL_POLICIES),
    candidates=candidate_lists,
    client_keys=st.lists(st.text(max_size=10), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
)
def test_every_policy_returns_each_available_backend_once_up_before_down_tiers_ascending(
    policy: Policy, candidates: list[Candidate], client_keys: list[str], seed: int
) -> None:
    by_index = {c.index: c for c in candidates}
    available = {c.index for c in candidates if c.available}
    expected_down = [
        c.index
        for c in sorted(candidates, key=lambda c: (c.tier, c.index))
        if c.available and not c.up
    ]
    scheduler = Scheduler(policy, seed=seed)
    # Several calls on one scheduler: its state (rotation, RNG) must never break the rules.
    for key in client_keys:
        result = scheduler.order(tuple(candidates), key)
        assert len(result) == len(set(result))
        assert set(result) == available
        n_up = len(result) - len(expected_down)
        head, tail = result[:n_up], result[n_up:]
        assert all(by_index[i].up for i in head)
        assert tail == expected_down
        tiers = [by_index[i].tier for i in head]
        assert tiers == sorted(tiers)
        # Failover keeps configured order and ignores weights by contract.
        for tier in set(tiers) if policy is not Policy.FAILOVER else ():
            weights = [by_index[i].weight for i in head if by_index[i].tier == tier]
            zeros = [w == 0 for w in weights]
            assert zeros == sorted(zeros), "weight-0 backends must end their tier"


@given(candidates=candidate_lists, client_key=st.text(max_size=10))
def test_failover_and_source_hash_are_deterministic(
    candidates: list[Candidate], client_key: str
) -> None:
    for policy in (Policy.FAILOVER, Policy.SOURCE_HASH):
        a = Scheduler(policy, seed=1).order(candidates, client_key)
        b = Scheduler(policy, seed=2)
        b.order(candidates, "warm-up")
        assert b.order(candidates, client_key) == a
