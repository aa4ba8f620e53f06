"""Attempt outcomes map to a fixed set of metric label values, whatever the text; what
a running tcpfwd exports is tested in tests/e2e/test_metric_labels.py."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tcpfwd.metrics import outcome_label, outcome_labels
from tcpfwd.vocabulary import Outcome

MISMATCH = Outcome.GREETING_MISMATCH


def test_outcomes_map_to_fixed_words():
    assert outcome_label(Outcome.OK) == Outcome.OK
    assert outcome_label(Outcome.REFUSED) == Outcome.REFUSED
    assert outcome_label("econnaborted") == "econnaborted"
    assert outcome_label(f"{MISMATCH}:421") == f"{MISMATCH}_4xx"
    assert outcome_label(f"{MISMATCH}:554") == f"{MISMATCH}_5xx"
    assert outcome_label(f"{MISMATCH}:+OK") == f"{MISMATCH}_other"
    assert outcome_label(f"{MISMATCH}:?") == f"{MISMATCH}_other"
    assert outcome_label(f"{MISMATCH}:٤٢١") == f"{MISMATCH}_other"
    assert outcome_label("RuntimeError") == "other"


@given(st.text(max_size=40))
def test_any_outcome_maps_into_the_fixed_set(text):
    fixed = outcome_labels()
    assert outcome_label(text) in fixed
    assert outcome_label(f"{MISMATCH}:{text}") in fixed
