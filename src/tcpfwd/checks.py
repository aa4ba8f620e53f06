"""One active health check of one backend: connect, maybe talk, say whether it passed.

Kinds:

- ``tcp``: the connect succeeds.
- ``send``: optionally send bytes, then read until a regex matches what came back.
- ``smtp``: expect a 2xx greeting, send ``EHLO``, expect 250, send ``QUIT`` and wait for
  the answer, so the mail server logs an ordinary, complete session and no error.
- ``greeting``: read the first line and match it, as client connections do when the
  service has a ``greeting``; used as the recovery probe of such services.

A check never raises: every outcome is a `CheckResult` whose ``detail`` is the short
reason that appears in the health log line. The whole check, every address of a name
included, is bounded by one timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from .attempt import describe_failure
from .config import SendProxySettings
from .patterns import Pattern
from .proxy_send import proxy_header_for_check
from .resolver import Resolver
from .vocabulary import Outcome

# Upper bounds on what a check reads, so a misbehaving backend cannot make it buffer more.
MAX_LINE = 4096
MAX_REPLY_LINES = 64
MAX_EXPECT_BYTES = 16384


@dataclass(frozen=True, slots=True)
class Probe:
    """What to check, resolved from the backend's health settings and the service."""

    kind: str
    timeout: float
    send: bytes = b""
    expect: Pattern | None = None
    ehlo: str = "localhost"


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str


class _CheckFailed(Exception):
    """A protocol-level failure; its message is the detail."""


async def run_check(
    probe: Probe,
    host: str,
    port: int,
    *,
    resolver: Resolver,
    dns_ttl: float,
    source_address: str | None = None,
    send_proxy: SendProxySettings | None = None,
) -> CheckResult:
    try:
        async with asyncio.timeout(probe.timeout):
            addresses = await resolver.resolve(host, port, dns_ttl)
            result = CheckResult(False, "no address")
            for ip, ip_port in addresses:
                result = await _check_address(probe, ip, ip_port, source_address, send_proxy)
                if result.ok:
                    break
            return result
    except TimeoutError:
        return CheckResult(False, Outcome.TIMEOUT)
    except OSError as error:
        return CheckResult(False, describe_failure(error))


async def _check_address(
    probe: Probe,
    ip: str,
    port: int,
    source_address: str | None,
    send_proxy: SendProxySettings | None,
) -> CheckResult:
    local_addr = (source_address, 0) if source_address else None
    try:
        reader, writer = await asyncio.open_connection(
            ip, port, local_addr=local_addr, limit=MAX_LINE
        )
    except OSError as error:
        return CheckResult(False, describe_failure(error))
    try:
        # A backend that expects a PROXY header gets one from its checks too, or it
        # would count every check as a broken client.
        header = proxy_header_for_check(send_proxy, writer.get_extra_info("socket"))
        if header:
            writer.write(header)
        if probe.kind == "smtp":
            await _smtp(reader, writer, probe.ehlo)
        elif probe.kind == "send":
            await _send_expect(reader, writer, probe.send, probe.expect)
        elif probe.kind == "greeting":
            await _greeting(reader, probe.expect)
        return CheckResult(True, probe.kind)
    except _CheckFailed as failure:
        return CheckResult(False, str(failure))
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return CheckResult(False, f"{probe.kind}: bad or truncated reply")
    except ConnectionResetError:
        return CheckResult(False, f"{probe.kind}: reset")
    except OSError as error:
        return CheckResult(False, f"{probe.kind}: {describe_failure(error)}")
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            # Bounded by the caller's timeout; a close that cannot finish is not a failure.
            await writer.wait_closed()


async def _reply(reader: asyncio.StreamReader, stage: str) -> bytes:
    """One (possibly multi-line) SMTP reply; its three-digit code."""
    for _ in range(MAX_REPLY_LINES):
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise _CheckFailed(f"smtp {stage}: closed")
        code = line[:3]
        if len(line) < 4 or not code.isdigit():
            raise _CheckFailed(f"smtp {stage}: not smtp")
        if line[3:4] != b"-":
            return code
    raise _CheckFailed(f"smtp {stage}: reply too long")


async def _smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ehlo: str) -> None:
    code = await _reply(reader, "greeting")
    if not code.startswith(b"2"):
        raise _CheckFailed(f"smtp greeting {code.decode()}")
    writer.write(b"EHLO " + ehlo.encode("ascii") + b"\r\n")
    code = await _reply(reader, "ehlo")
    if code != b"250":
        raise _CheckFailed(f"smtp ehlo {code.decode()}")
    # QUIT and wait for its answer, so the server logs a normal end rather than a lost
    # connection; the check has passed already, whatever the answer.
    writer.write(b"QUIT\r\n")
    with contextlib.suppress(_CheckFailed, OSError):
        await _reply(reader, "quit")


async def _send_expect(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    send: bytes,
    expect: Pattern | None,
) -> None:
    if send:
        writer.write(send)
    if expect is None:
        return
    seen = bytearray()
    while len(seen) < MAX_EXPECT_BYTES:
        if expect.search(seen):
            return
        data = await reader.read(MAX_EXPECT_BYTES - len(seen))
        if not data:
            break
        seen += data
    if expect.search(seen):
        return
    raise _CheckFailed(f"expect: no match in {_first_line(seen)!r}")


async def _greeting(reader: asyncio.StreamReader, expect: Pattern | None) -> None:
    line = await reader.readline()
    if not line.endswith(b"\n"):
        raise _CheckFailed("greeting: closed")
    if expect is not None and not expect.search(line):
        raise _CheckFailed(f"greeting: {_first_line(line)!r}")


def _first_line(data: bytes | bytearray) -> str:
    line = bytes(data).split(b"\n", 1)[0].rstrip(b"\r")
    return line[:60].decode("utf-8", "replace")
