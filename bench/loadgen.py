"""Helper processes of the benchmark, run as ``python bench/loadgen.py ROLE ...``.

They live in their own processes (not in run.py) because the idle scenario holds
thousands of sockets on each side: the proxy's descriptor limit must not be shared with
the ends it serves, and the load must run on the load core, not next to the proxy.

Roles:
  sink HOST PORT            accept connections, echo what arrives, hold them until EOF;
                            prints "listening" once ready.
  hold HOST PORT COUNT      open COUNT connections, exchange one byte on each (so the
                            proxy has dialled the backend end to end), print
                            "ready OPENED", then hold them all until stdin closes.

Both exit by themselves: the sink after --lifetime seconds at most, the holder when its
stdin closes (run.py ends it) or after --lifetime seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys


def _raise_fd_limit() -> None:
    # Thousands of held sockets need the soft descriptor limit raised to the hard one.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def sink(host: str, port: int, lifetime: float) -> None:
    server = await asyncio.start_server(_echo, host, port, backlog=4096)
    print("listening", flush=True)
    async with server:
        await asyncio.sleep(lifetime)


async def _open_one(
    host: str, port: int, held: list[asyncio.StreamWriter], gate: asyncio.Semaphore
) -> None:
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(b"x")
            if await asyncio.wait_for(reader.readexactly(1), 10) == b"x":
                held.append(writer)
            else:
                writer.close()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            # Counted as not opened: run.py divides by the number actually held.
            pass


async def hold(host: str, port: int, count: int, lifetime: float) -> None:
    held: list[asyncio.StreamWriter] = []
    # A bounded number of connects in flight keeps the proxy's accept queue from
    # overflowing, which would turn the measurement into a SYN-retry benchmark.
    gate = asyncio.Semaphore(100)
    await asyncio.gather(*(_open_one(host, port, held, gate) for _ in range(count)))
    print(f"ready {len(held)}", flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stdin_closed, lifetime)
    for writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    # The stdin reader thread may still be blocked when the lifetime ran out; exiting
    # hard keeps asyncio.run's executor shutdown from waiting on it forever.
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("sink", "hold"))
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int, nargs="?", default=0)
    parser.add_argument("--lifetime", type=float, default=600.0, help="seconds, upper bound")
    args = parser.parse_args()
    _raise_fd_limit()
    if args.role == "sink":
        asyncio.run(sink(args.host, args.port, args.lifetime))
    else:
        asyncio.run(hold(args.host, args.port, args.count, args.lifetime))


if __name__ == "__main__":
    main()
