"""The configuration parsers on odd input: whatever the text, a value in range or an
error on one line with its key path; never an exception of another kind. Hostile files
against the real command are in tests/e2e/test_config_hardening.py."""

from __future__ import annotations

import json
import math
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpfwd.config import (
    MAX_DURATION,
    ConfigError,
    _Invalid,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)

# --- properties of the parsers ------------------------------------------------------


# Text near an address: other scripts' digits, newlines, quotes in zones.
ADDRESS_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("0123456789²٢٣.:[]%*abc \n\t"), max_size=20),
    st.from_regex(r"\A(\[::1(%[a-z'\" ]{0,3})?\]|[a-z0-9.\n*]{0,6}):[0-9²٢٣\n]{1,6}\Z"),
)


@given(ADDRESS_TEXT)
def test_accepted_addresses_are_plain_ascii(text):
    try:
        address = parse_address(text, allow_any_host=True, allow_port_zero=True)
    except _Invalid:
        return
    assert 0 <= address.port <= 65535
    assert address.host.isascii()
    assert address.host.isprintable()
    assert not any(c.isspace() for c in address.host)
    port_text = text.strip().rsplit(":", 1)[1]
    assert port_text.isascii() and port_text.isdigit()


@given(ADDRESS_TEXT)
def test_addresses_of_digits_and_separators_only_ever_parse_or_report(text):
    try:
        parse_address(text, allow_any_host=True, allow_port_zero=True)
    except _Invalid as error:
        assert str(error)  # noqa: PT017 -- any input, so no single expected error


@given(
    st.one_of(
        st.text(max_size=30),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.from_regex(r"\A[0-9]{1,30}(\.[0-9]{1,5})?(ms|s|m|h)?\Z"),
    )
)
def test_durations_are_in_range_or_reported(value):
    try:
        seconds = parse_duration(value)
    except _Invalid:
        return
    assert math.isfinite(seconds)
    assert 0 <= seconds <= MAX_DURATION


def test_durations_up_to_the_maximum_parse():
    assert parse_duration("720h") == MAX_DURATION
    assert parse_duration(int(MAX_DURATION)) == MAX_DURATION
    for too_long in ("721h", "999999999h", MAX_DURATION + 1, 10**400):
        with pytest.raises(_Invalid, match="longer than 720h"):
            parse_duration(too_long)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda key, value: f"[services.s]\n{key} = {value}\n".encode(),
            st.sampled_from(["listen", "backends", "keepalive_idle", "greeting", "health"]),
            st.one_of(
                st.from_regex(r'\A"[^"\\\n]{0,20}"\Z'),
                st.integers().map(str),
                st.just("[" * 600 + "]" * 600),
            ),
        ),
    )
)
def test_any_file_loads_or_is_reported(content):
    with tempfile.NamedTemporaryFile(suffix=".toml") as stream:
        stream.write(content)
        stream.flush()
        try:
            load_config(stream.name)
        except ConfigError as error:
            issues = error.issues
        else:
            return
    assert issues
    for issue in issues:
        assert "\n" not in str(issue)


@given(st.dictionaries(st.text(max_size=8), st.just({}), max_size=4))
def test_every_error_is_one_line_whatever_the_keys(services):
    try:
        parse_config(
            {"services": services, **{k: 1 for k in services if k != "services"}}, "t.toml"
        )
    except ConfigError as error:
        report, count = error.report(), len(error.issues)
    else:
        return
    assert len(report.splitlines()) == count


def test_config_paths_quote_odd_keys():
    with pytest.raises(ConfigError) as caught:
        parse_config({"services": {'a"\n': {}}}, "t.toml")
    paths = {issue.path for issue in caught.value.issues}
    assert json.dumps('a"\n').join(["services.", ""]) in paths
