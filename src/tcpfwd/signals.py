"""The signals a daemon answers, handled from its event loop for as long as it serves.

| signal | what is asked |
| --- | --- |
| SIGTERM, SIGINT | stop: drain, then exit; again: end live sessions at once |
| SIGHUP | reload the configuration file |
| SIGUSR1 | reopen the log files |

Handlers only pass on what was asked; the work is done by the loop's own callbacks, never
inside a signal handler's frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1)


@contextlib.contextmanager
def handled_signals(
    loop: asyncio.AbstractEventLoop,
    *,
    stop: Callable[[str], None],
    reload: Callable[[], object],
    reopen_logs: Callable[[], None],
) -> Iterator[None]:
    """Route the daemon's signals to ``stop(signal name)``, ``reload()`` and
    ``reopen_logs()`` inside the block; the default handling is back after it."""
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signal.Signals(signum).name)
    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGUSR1, reopen_logs)
    try:
        yield
    finally:
        for signum in HANDLED_SIGNALS:
            loop.remove_signal_handler(signum)
