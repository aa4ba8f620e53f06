"""The status page's last hour: ring buffers of rates and health, bounded, with no clock."""

from __future__ import annotations

import pytest

from tcpfwd.history import (
    MAX_CHANGES,
    POINTS,
    SPAN,
    STEP,
    BackendSample,
    History,
    ServiceSample,
    service_sample,
)
from tcpfwd.metrics import ServiceStats
from tcpfwd.vocabulary import End, Outcome

T0 = 1_000_000.0  # a multiple of STEP: bucket boundaries fall on round numbers


def reading(
    sessions: int = 0,
    failed: int = 0,
    *,
    up: bool = True,
    changed_at: float | None = None,
    reason: str | None = None,
    name: str = "mail",
    backend: str = "a",
) -> list[ServiceSample]:
    return [
        ServiceSample(
            name,
            sessions,
            failed,
            (BackendSample(backend, sessions, failed, up, changed_at, reason),),
        )
    ]


def series(history: History, key: str, backend: str | None = None) -> list[float | None]:
    found = history.backend("mail", backend) if backend else history.service("mail")
    assert found is not None
    values: list[float | None] = found[key]
    return values


def test_sessions_of_a_completed_bucket_become_a_rate_per_second():
    history = History()
    history.record(T0, reading(0))
    history.record(T0 + 5, reading(30))
    history.record(T0 + STEP + 1, reading(30))
    rates = series(history, "sessions_per_s")
    assert rates[0] == 30 / STEP
    assert len(rates) == 2


def test_failed_attempts_become_failovers_per_minute_for_service_and_backend():
    history = History()
    history.record(T0, reading(0, 0))
    history.record(T0 + 3, reading(10, 4))
    history.record(T0 + STEP, reading(10, 4))
    assert series(history, "failovers_per_min")[0] == 4 * 60 / STEP
    assert series(history, "failovers_per_min", "a")[0] == 4 * 60 / STEP


def test_the_bucket_in_progress_moves_as_soon_as_traffic_does():
    history = History()
    history.record(T0, reading(0))
    assert series(history, "sessions_per_s") == [0.0]
    history.record(T0 + 1, reading(5))
    assert series(history, "sessions_per_s") == [5 / STEP]


def test_the_bucket_in_progress_carries_the_previous_one_over_the_trailing_step():
    history = History()
    history.record(T0, reading(0))
    history.record(T0 + 9, reading(20))
    # 2 s into the next bucket: 80% of the previous bucket is still within the last STEP.
    history.record(T0 + STEP + 2, reading(20))
    assert series(history, "sessions_per_s") == [2.0, pytest.approx(0.8 * 20 / STEP)]


def test_the_ring_holds_one_hour_whatever_the_running_time():
    history = History()
    for second in range(0, int(SPAN * 1.5), 5):
        history.record(T0 + second, reading(second))
    rates = series(history, "sessions_per_s")
    assert len(rates) == POINTS
    assert all(rate == pytest.approx(1.0) for rate in rates[:-1])
    header = history.header()
    assert header["step"] == STEP
    # The first bucket shown is an hour before the one in progress.
    assert header["start"] == T0 + (int(SPAN * 1.5) // int(STEP) - POINTS) * STEP


def test_a_stall_leaves_empty_buckets_and_a_long_one_at_most_an_hour():
    history = History()
    history.record(T0, reading(0))
    history.record(T0 + 1, reading(10))
    history.record(T0 + 3 * STEP + 1, reading(10))
    assert series(history, "sessions_per_s")[:3] == [1.0, 0.0, 0.0]
    history.record(T0 + 100 * SPAN, reading(10))
    assert len(series(history, "sessions_per_s")) == POINTS
    assert history.header()["start"] == T0 + 100 * SPAN - (POINTS - 1) * STEP


def test_a_clock_that_goes_back_stays_in_the_current_bucket():
    history = History()
    history.record(T0 + STEP, reading(0))
    history.record(T0, reading(3))
    assert series(history, "sessions_per_s") == [3 / STEP]
    assert history.header()["start"] == T0 + STEP


def test_a_sum_that_dips_and_comes_back_is_not_counted_twice():
    history = History()
    history.record(T0, reading(100))
    history.record(T0 + 1, reading(60))  # one worker's snapshot missing for a moment
    history.record(T0 + 2, reading(100))
    history.record(T0 + 3, reading(101))
    history.record(T0 + STEP, reading(101))
    assert series(history, "sessions_per_s")[0] == 1 / STEP


def test_health_is_the_share_of_readings_up_in_each_bucket():
    history = History()
    for second in range(10):
        history.record(T0 + second, reading(up=second < 5, changed_at=None))
    history.record(T0 + STEP, reading(up=False))
    assert series(history, "up", "a") == [0.5, 0.0]


def test_health_changes_keep_the_daemons_time_and_reason():
    history = History()
    refused = f"{Outcome.REFUSED} (passive)"
    history.record(T0, reading())
    history.record(T0 + 2, reading(up=False, changed_at=T0 + 1.5, reason=refused))
    history.record(T0 + 3, reading(up=False, changed_at=T0 + 1.5, reason=refused))
    history.record(T0 + 4, reading(up=True, changed_at=T0 + 3.5, reason="2 checks passed"))
    found = history.backend("mail", "a")
    assert found is not None
    assert found["changes"] == [
        {"at": T0 + 1.5, "health": "down", "reason": refused},
        {"at": T0 + 3.5, "health": "up", "reason": "2 checks passed"},
    ]


def test_a_flap_between_two_readings_is_still_recorded():
    history = History()
    history.record(T0, reading(up=True, changed_at=T0 - 50))
    history.record(T0 + 1, reading(up=True, changed_at=T0 + 0.7, reason="back"))
    found = history.backend("mail", "a")
    assert found is not None
    assert [c["at"] for c in found["changes"]] == [T0 - 50, T0 + 0.7]


def test_a_change_without_a_time_is_noticed_at_the_reading():
    history = History()
    history.record(T0, reading(up=True))
    history.record(T0 + 4, reading(up=False))
    found = history.backend("mail", "a")
    assert found is not None
    assert found["changes"] == [{"at": T0 + 4, "health": "down", "reason": None}]


def test_changes_are_bounded_and_older_than_an_hour_are_not_shown():
    history = History()
    for i in range(MAX_CHANGES * 3):
        history.record(T0 + i, reading(up=i % 2 == 1, changed_at=T0 + i))
    found = history.backend("mail", "a")
    assert found is not None
    assert len(found["changes"]) == MAX_CHANGES
    history.record(T0 + SPAN + MAX_CHANGES * 3 - 1.5, reading(up=True, changed_at=T0 + 95))
    found = history.backend("mail", "a")
    assert found is not None
    assert [c["at"] for c in found["changes"]] == [T0 + 95]


def test_services_and_backends_no_longer_read_are_forgotten_and_new_ones_padded():
    history = History()
    history.record(T0, reading(name="old"))
    history.record(T0 + STEP, reading(name="mail"))
    assert history.service("old") is None
    assert series(history, "sessions_per_s") == [None, 0.0]
    history.record(T0 + STEP + 1, reading(name="mail", backend="b"))
    assert history.backend("mail", "a") is None
    assert series(history, "up", "b") == [None, 1.0]


def test_annotate_adds_the_series_to_each_service_and_backend_of_a_status_document():
    history = History()
    document = {"services": [{"name": "mail", "backends": [{"name": "a"}, {"name": "x"}]}]}
    assert history.annotate(document) == document  # nothing read yet: nothing added
    history.record(T0, reading(3))
    history.annotate(document)
    assert document["history"] == {"step": STEP, "start": T0, "now": T0, "span": SPAN}
    (service,) = document["services"]
    assert set(service["history"]) == {"sessions_per_s", "failovers_per_min"}
    assert set(service["backends"][0]["history"]) == {
        "sessions_per_s",
        "failovers_per_min",
        "up",
        "changes",
    }
    assert "history" not in service["backends"][1]


def test_a_reading_of_a_service_sums_its_counters():
    stats = ServiceStats()
    stats.ends.update({End.CLIENT_CLOSED: 4, End.NO_BACKEND: 1})
    stats.backend("a").attempts.update({Outcome.REFUSED: 2, Outcome.OK: 1})
    stats.backend("b").attempts.update({Outcome.OK: 3, Outcome.TIMEOUT: 1})
    stats.backend("b").sessions = 3
    sample = service_sample(
        "mail", stats, [("a", False, 12.0, Outcome.REFUSED), ("b", True, None, None)]
    )
    assert (sample.sessions, sample.failed) == (5, 3)
    assert sample.backends == (
        BackendSample("a", 0, 2, False, 12.0, Outcome.REFUSED),
        BackendSample("b", 3, 1, True, None, None),
    )
