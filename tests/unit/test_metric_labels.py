"""Attempt outcomes map to a fixed set of metric label values, whatever the text; what
a running tcpfwd exports is tested in tests/e2e/test_metric_labels.py."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tcpfwd.metrics import outcome_label, outcome_labels


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
