"""Operators' regular expressions (greeting and health-check ``expect``), in linear time.

Python's ``re`` backtracks: a pattern such as ``^(a+)+$`` takes seconds on a 29-byte
line, and a pattern runs on the event loop that serves every session. RE2 (Google's
engine, ``google-re2``) matches in time linear in the input whatever the pattern, at
the price of no backreferences and no look-around; a pattern it cannot compile is a
configuration error, reported with its key.

Patterns match bytes as the backend sent them: each byte is one character (Latin-1),
as with a ``bytes`` pattern in ``re``, and the pattern's own text is UTF-8.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import re2

# RE2's default budget for one compiled program; a pattern needing more is refused at
# compile time rather than growing without bound.
MAX_PROGRAM_MEMORY = 8 << 20


class Pattern(Protocol):
    """What callers use of a compiled pattern."""

    def search(self, text: bytes | bytearray) -> object | None:
        """A match object (true) if the pattern matches anywhere in ``text``, else None."""


class PatternError(ValueError):
    """The pattern cannot be compiled; the message says why, for the operator."""


def _options() -> re2.Options:
    import re2  # noqa: PLC0415 - only a configuration with a pattern needs the engine

    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1
    options.max_mem = MAX_PROGRAM_MEMORY
    # RE2 would also print every compile error to stderr; the caller reports it.
    options.log_errors = False
    return options


@functools.lru_cache(maxsize=256)
def compile_pattern(text: str) -> Pattern:
    """Compile ``text`` for matching bytes; raises PatternError when RE2 cannot."""
    import re2  # noqa: PLC0415 - only a configuration with a pattern needs the engine

    try:
        compiled: Pattern = re2.compile(text.encode("utf-8"), _options())
    except re2.error as error:
        reason = error.args[0] if error.args else error
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(str(reason)) from None
    return compiled
