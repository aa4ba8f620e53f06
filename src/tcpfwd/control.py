"""The channel between a supervisor and one of its workers, and a worker's orders.

A worker is started with its orders (`WorkerSpec`) as JSON in ``$TCPFWD_WORKER``, and one
end of a SOCK_SEQPACKET socket pair: each datagram is one JSON message, with descriptors
alongside (SCM_RIGHTS) where it passes sockets.

| from | message | meaning |
| --- | --- | --- |
| worker | ``{"op": "ready"}`` | it accepts on every socket it was given |
| worker | ``{"op": "pong"}`` | the answer to a ping: its event loop turns |
| supervisor | ``{"op": "ping"}`` | are you alive? |
| supervisor | ``{"op": "stop", "urgent": bool}`` | drain and exit (urgent: end sessions now) |
| supervisor | ``{"op": "reload", "listen": [[key, host, port, count], ...]}`` | reload |
| supervisor | ``{"op": "admin", "service", "backend", "state"}`` | an operator's backend state |

A reload message carries the sockets of the new listen addresses, ``count`` per address
in the order of ``listen``.

An empty read means the other end is gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("tcpfwd")

WORKER_ENV = "TCPFWD_WORKER"
MAX_MESSAGE = 1 << 16
MAX_DESCRIPTORS = 256

Message = dict[str, Any]


@dataclass
class WorkerSpec:
    """What the supervisor tells a worker it starts."""

    index: int
    control: int
    runtime: str
    # (service key, host, port, descriptors) of each listening address.
    listen: list[tuple[str, str, int, list[int]]] = field(default_factory=list)
    # (service, backend, state) of each backend the operator changed.
    admin: list[tuple[str, str, str]] = field(default_factory=list)

    def encode(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "control": self.control,
                "runtime": self.runtime,
                "listen": self.listen,
                "admin": self.admin,
            }
        )

    @classmethod
    def decode(cls, raw: str) -> WorkerSpec:
        data = json.loads(raw)
        return cls(
            index=data["index"],
            control=data["control"],
            runtime=data["runtime"],
            listen=[(s, h, p, list(f)) for s, h, p, f in data["listen"]],
            admin=[(s, b, st) for s, b, st in data["admin"]],
        )


def worker_spec() -> WorkerSpec | None:
    """This process's orders when a supervisor started it, else None.

    Taken out of the environment, so that nothing this worker starts believes it too.
    """
    raw = os.environ.pop(WORKER_ENV, None)
    return WorkerSpec.decode(raw) if raw is not None else None


def send(channel: socket.socket, message: Message, descriptors: Sequence[int] = ()) -> None:
    """One message, with ``descriptors`` passed along; OSError if it cannot go."""
    socket.send_fds(channel, [json.dumps(message).encode()], list(descriptors))


def receive(channel: socket.socket) -> tuple[Message | None, list[int]]:
    """The next message and the descriptors that came with it; None when the other end
    is gone. BlockingIOError when nothing waits."""
    try:
        data, descriptors, _flags, _address = socket.recv_fds(channel, MAX_MESSAGE, MAX_DESCRIPTORS)
    except (BlockingIOError, InterruptedError):
        raise
    except OSError as error:
        log.error("control channel failed: %s", error)
        return None, []
    if not data:
        return None, descriptors
    message: Message = json.loads(data)
    return message, descriptors
