"""The health state machine of one backend, and the table that keeps it across reloads."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpfwd.health import (
    UNKNOWN,
    BackendHealth,
    HealthState,
    HealthTable,
    Source,
    Transition,
    shown_state,
)
from tcpfwd.vocabulary import Outcome

UP = HealthState.UP
DOWN = HealthState.DOWN


def down_backend(*, rise: int = 2, fall: int = 1) -> BackendHealth:
    return BackendHealth(rise=rise, fall=fall, initial=DOWN)


# --- going down -------------------------------------------------------------------------


def test_backend_starts_up_by_default() -> None:
    health = BackendHealth()
    assert health.state is UP
    assert health.is_up
    assert health.last_change is None


def test_backend_can_start_down() -> None:
    assert BackendHealth(initial=DOWN).state is DOWN


def test_one_failure_marks_down_with_the_default_fall_of_one() -> None:
    health = BackendHealth()
    transition = health.observe_failure("passive", "connection refused", 10.0)
    assert transition == Transition(UP, DOWN, "connection refused", Source.PASSIVE, 10.0)
    assert health.state is DOWN


def test_goes_down_only_after_fall_consecutive_failures() -> None:
    health = BackendHealth(fall=3)
    assert health.observe_failure("passive", Outcome.REFUSED, 1.0) is None
    assert health.observe_failure("passive", Outcome.REFUSED, 2.0) is None
    assert health.state is UP
    transition = health.observe_failure("passive", "timed out", 3.0)
    assert transition is not None
    assert transition.reason == "timed out"
    assert health.state is DOWN


def test_passive_and_check_failures_both_count_towards_fall() -> None:
    health = BackendHealth(fall=2)
    assert health.observe_failure("check", Outcome.REFUSED, 1.0) is None
    transition = health.observe_failure("passive", Outcome.REFUSED, 2.0)
    assert transition is not None
    assert transition.source is Source.PASSIVE


def test_success_resets_the_failure_count() -> None:
    health = BackendHealth(fall=3)
    health.observe_failure("passive", Outcome.REFUSED, 1.0)
    health.observe_failure("passive", Outcome.REFUSED, 2.0)
    health.observe_success("passive", 3.0)
    assert health.consecutive_failures == 0
    assert health.observe_failure("passive", Outcome.REFUSED, 4.0) is None
    assert health.observe_failure("passive", Outcome.REFUSED, 5.0) is None
    assert health.state is UP


def test_going_down_is_reported_exactly_once() -> None:
    health = BackendHealth(fall=2)
    results = [health.observe_failure("check", Outcome.REFUSED, float(t)) for t in range(6)]
    assert [r is not None for r in results] == [False, True, False, False, False, False]
    assert health.consecutive_failures == 6


# --- coming back up ---------------------------------------------------------------------


def test_down_backend_needs_rise_consecutive_successful_checks() -> None:
    health = down_backend(rise=3)
    assert health.observe_success("check", 1.0) is None
    assert health.observe_success("check", 2.0) is None
    assert health.state is DOWN
    transition = health.observe_success("check", 3.0, "connected in 2 ms")
    assert transition == Transition(
        DOWN, UP, "3 consecutive checks passed (connected in 2 ms)", Source.CHECK, 3.0
    )
    assert health.state is UP


def test_failure_resets_the_success_count_while_down() -> None:
    health = down_backend(rise=2)
    health.observe_success("check", 1.0)
    health.observe_failure("check", Outcome.REFUSED, 2.0)
    assert health.consecutive_successes == 0
    assert health.observe_success("check", 3.0) is None
    assert health.state is DOWN
    assert health.observe_success("check", 4.0) is not None


def test_passive_failure_of_a_last_resort_attempt_also_resets_the_success_count() -> None:
    health = down_backend(rise=2)
    health.observe_success("check", 1.0)
    health.observe_failure("passive", Outcome.REFUSED, 2.0)
    assert health.observe_success("check", 3.0) is None
    assert health.state is DOWN


def test_passive_success_brings_a_down_backend_up_immediately() -> None:
    health = down_backend(rise=5)
    transition = health.observe_success("passive", 7.5)
    assert transition == Transition(DOWN, UP, "connection succeeded", Source.PASSIVE, 7.5)
    assert health.state is UP


def test_coming_up_is_reported_exactly_once() -> None:
    health = down_backend(rise=1)
    assert health.observe_success("check", 1.0) is not None
    assert health.observe_success("check", 2.0) is None
    assert health.observe_success("passive", 3.0) is None


def test_successes_while_up_change_nothing_but_the_counts() -> None:
    health = BackendHealth()
    assert health.observe_success("passive", 1.0) is None
    assert health.observe_success("check", 2.0) is None
    assert health.consecutive_successes == 2
    assert health.last_change is None


# --- bookkeeping ------------------------------------------------------------------------


def test_last_change_and_reason_record_the_latest_transition() -> None:
    health = BackendHealth()
    health.observe_failure("passive", Outcome.REFUSED, 5.0)
    health.observe_failure("passive", "reset", 6.0)
    assert (health.last_change, health.last_reason) == (5.0, Outcome.REFUSED)
    health.observe_success("passive", 9.0)
    assert (health.last_change, health.last_reason) == (9.0, "connection succeeded")


def test_checks_update_the_last_check_fields() -> None:
    health = BackendHealth()
    health.observe_success("check", 1.0, "banner ok")
    assert (health.last_check_ok, health.last_check_at, health.last_check_detail) == (
        True,
        1.0,
        "banner ok",
    )
    health.observe_failure("check", "timed out", 2.0)
    assert (health.last_check_ok, health.last_check_at, health.last_check_detail) == (
        False,
        2.0,
        "timed out",
    )


def test_passive_observations_leave_the_last_check_fields_alone() -> None:
    health = BackendHealth()
    health.observe_success("passive", 1.0, "detail")
    health.observe_failure("passive", Outcome.REFUSED, 2.0)
    assert (health.last_check_ok, health.last_check_at, health.last_check_detail) == (
        None,
        None,
        None,
    )


def test_snapshot_is_json_serialisable_and_complete() -> None:
    health = BackendHealth(rise=3, fall=2)
    health.observe_failure("check", Outcome.REFUSED, 1.5)
    snap = json.loads(json.dumps(health.snapshot()))
    assert snap == {
        "state": "up",
        "rise": 3,
        "fall": 2,
        "consecutive_failures": 1,
        "consecutive_successes": 0,
        "last_change": None,
        "last_reason": None,
        "last_check_ok": False,
        "last_check_at": 1.5,
        "last_check_detail": Outcome.REFUSED,
    }


# --- admin and configuration ------------------------------------------------------------


def test_force_changes_state_and_reports_admin_as_source() -> None:
    health = BackendHealth()
    transition = health.force(DOWN, "maintenance", 3.0)
    assert transition == Transition(UP, DOWN, "maintenance", Source.ADMIN, 3.0)
    assert health.state is DOWN


def test_force_to_the_current_state_reports_nothing() -> None:
    assert BackendHealth().force(UP, "no-op", 1.0) is None


def test_force_resets_both_counts() -> None:
    health = BackendHealth(fall=3)
    health.observe_failure("passive", Outcome.REFUSED, 1.0)
    health.force(UP, "operator says so", 2.0)
    assert (health.consecutive_failures, health.consecutive_successes) == (0, 0)


def test_forced_down_backend_comes_back_after_rise_good_checks() -> None:
    health = BackendHealth(rise=2)
    health.force(DOWN, "maintenance", 1.0)
    health.observe_success("check", 2.0)
    assert health.observe_success("check", 3.0) is not None
    assert health.state is UP


def test_source_may_be_given_as_the_enum() -> None:
    transition = BackendHealth().observe_failure(Source.CHECK, Outcome.REFUSED, 1.0)
    assert transition is not None
    assert transition.source == "check"


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown health source"):
        BackendHealth().observe_failure("pasive", Outcome.REFUSED, 1.0)


def test_admin_source_is_rejected_by_observations() -> None:
    with pytest.raises(ValueError, match="force"):
        BackendHealth().observe_success("admin", 1.0)


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 3)])
def test_thresholds_below_one_are_rejected(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        BackendHealth(rise=rise, fall=fall)


def test_configure_changes_thresholds_and_keeps_state_and_counts() -> None:
    health = BackendHealth(fall=5)
    health.observe_failure("passive", Outcome.REFUSED, 1.0)
    health.observe_failure("passive", Outcome.REFUSED, 2.0)
    health.configure(rise=4, fall=2)
    assert (health.state, health.consecutive_failures) == (UP, 2)
    assert health.observe_failure("passive", Outcome.REFUSED, 3.0) is not None
    assert health.rise == 4


# --- the table --------------------------------------------------------------------------


def test_table_ensure_creates_once_and_then_returns_the_same_state() -> None:
    table: HealthTable[tuple[str, str]] = HealthTable()
    health = table.ensure(("web", "a"), rise=3, fall=2)
    assert (health.rise, health.fall) == (3, 2)
    assert table.ensure(("web", "a"), rise=3, fall=2) is health
    assert table.get(("web", "a")) is health
    assert len(table) == 1


def test_table_get_of_an_unknown_key_is_none() -> None:
    table: HealthTable[str] = HealthTable()
    assert table.get("nope") is None
    assert "nope" not in table


def test_table_ensure_can_create_a_backend_down() -> None:
    table: HealthTable[str] = HealthTable()
    assert table.ensure("a", initial=DOWN).state is DOWN


def test_table_ensure_updates_thresholds_but_keeps_state() -> None:
    table: HealthTable[str] = HealthTable()
    health = table.ensure("a", rise=2, fall=1)
    health.observe_failure("passive", Outcome.REFUSED, 1.0)
    again = table.ensure("a", rise=5, fall=3)
    assert again is health
    assert (again.state, again.rise, again.fall) == (DOWN, 5, 3)


def test_table_retain_keeps_state_of_surviving_keys_and_drops_the_rest() -> None:
    table: HealthTable[tuple[str, str]] = HealthTable()
    kept = table.ensure(("web", "a"))
    kept.observe_failure("check", Outcome.REFUSED, 1.0)
    table.ensure(("web", "b"))
    table.ensure(("db", "a"))
    dropped = table.retain([("web", "a"), ("web", "c")])
    assert dropped == [("web", "b"), ("db", "a")]
    assert table.get(("web", "a")) is kept
    assert kept.state is DOWN
    assert ("web", "b") not in table
    assert ("web", "c") not in table, "retain only drops; ensure adds"


def test_table_items_lists_every_entry_in_insertion_order() -> None:
    table: HealthTable[str] = HealthTable()
    a = table.ensure("a")
    b = table.ensure("b")
    assert table.items() == [("a", a), ("b", b)]


def test_table_items_may_be_iterated_while_the_table_changes() -> None:
    table: HealthTable[str] = HealthTable()
    table.ensure("a")
    table.ensure("b")
    seen = []
    for key, _ in table.items():
        seen.append(key)
        table.retain([])
        table.ensure("c")
    assert seen == ["a", "b"]
    assert [key for key, _ in table.items()] == ["c"]


def test_table_snapshot_is_json_serialisable_with_tuple_keys() -> None:
    table: HealthTable[tuple[str, str]] = HealthTable()
    table.ensure(("web", "a")).observe_failure("passive", Outcome.REFUSED, 2.0)
    table.ensure(("web", "b"))
    snap = json.loads(json.dumps(table.snapshot()))
    assert [(entry["key"], entry["state"]) for entry in snap] == [
        (["web", "a"], "down"),
        (["web", "b"], "up"),
    ]
    assert snap[0]["last_reason"] == Outcome.REFUSED


# --- against a reference model ----------------------------------------------------------


@dataclass
class Model:
    """The rules of the brief, written as plainly as possible."""

    rise: int
    fall: int
    up: bool
    failures: int = 0
    successes: int = 0

    def apply(self, op: tuple[str, str, bool]) -> None:
        kind, source, forced_up = op
        if kind == "success":
            self.failures = 0
            self.successes += 1
            if not self.up and (source == "passive" or self.successes >= self.rise):
                self.up = True
        elif kind == "failure":
            self.successes = 0
            self.failures += 1
            if self.up and self.failures >= self.fall:
                self.up = False
        else:
            self.failures = self.successes = 0
            self.up = forced_up


operations = st.tuples(
    st.sampled_from(["success", "failure", "force"]),
    st.sampled_from(["passive", "check"]),
    st.booleans(),
)


@settings(max_examples=500)
@given(
    rise=st.integers(1, 4),
    fall=st.integers(1, 4),
    initially_up=st.booleans(),
    ops=st.lists(operations, max_size=40),
)
def test_any_sequence_of_observations_matches_the_reference_model(
    rise: int, fall: int, initially_up: bool, ops: list[tuple[str, str, bool]]
) -> None:
    health = BackendHealth(rise=rise, fall=fall, initial=UP if initially_up else DOWN)
    model = Model(rise, fall, initially_up)
    last_transition: Transition | None = None
    for step, op in enumerate(ops):
        now = float(step)
        before = health.state
        kind, source, forced_up = op
        if kind == "success":
            transition = health.observe_success(source, now)
        elif kind == "failure":
            transition = health.observe_failure(source, f"failure {step}", now)
        else:
            transition = health.force(UP if forced_up else DOWN, f"forced {step}", now)
        model.apply(op)

        assert health.state is (UP if model.up else DOWN)
        assert (health.consecutive_failures, health.consecutive_successes) == (
            model.failures,
            model.successes,
        )
        assert (transition is not None) == (health.state is not before)
        if transition is not None:
            assert (transition.previous, transition.current, transition.at) == (
                before,
                health.state,
                now,
            )
            expected_source = "admin" if kind == "force" else source
            assert transition.source == expected_source
            last_transition = transition
        if last_transition is None:
            assert health.last_change is None
        else:
            assert (health.last_change, health.last_reason) == (
                last_transition.at,
                last_transition.reason,
            )


# --- what is shown: unknown until something was learnt ----------------------------------


def test_a_backend_nothing_was_learnt_about_is_shown_unknown_yet_taken_as_up() -> None:
    health = BackendHealth()
    assert shown_state(health, tried=False) == UNKNOWN
    # Fail-open: the data plane tries it before any backend marked down.
    assert health.up and health.is_up
    assert shown_state(health, tried=True) == "up"


@pytest.mark.parametrize(
    ("learn", "shown"),
    [
        (lambda h: h.observe_success("check", 1.0), "up"),
        (lambda h: h.observe_failure("check", Outcome.REFUSED, 1.0), "up"),
        (lambda h: h.observe_failure("passive", Outcome.REFUSED, 1.0), "down"),
        (lambda h: h.observe_success("passive", 1.0), "up"),
        (lambda h: h.force(UP, "operator", 1.0), "up"),
    ],
)
def test_any_evidence_makes_health_known(learn, shown) -> None:
    health = BackendHealth(fall=1 if shown == "down" else 2)
    learn(health)
    assert shown_state(health, tried=False) == shown


def test_untracked_health_is_known_only_by_trying() -> None:
    assert shown_state(None, tried=False) == UNKNOWN
    assert shown_state(None, tried=True) == "up"
