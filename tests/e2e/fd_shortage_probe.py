"""Run as a child process: starve a Listener of descriptors, report what it did.

Prints one JSON object: CPU seconds burnt while no descriptor was free, and how many
of the queued connections were accepted once descriptors were free again.
"""

import asyncio
import json
import os
import resource
import socket
import time

from tcpfwd.config import Address
from tcpfwd.listener import Listener, open_listening_sockets
from tcpfwd.process import new_event_loop
from tcpfwd.reactor import Reactor

QUEUED = 10


async def main() -> None:
    (sock,) = open_listening_sockets(Address("127.0.0.1", 0), 128)
    accepted: list[socket.socket] = []
    listener = Listener(sock, lambda _listener, conn, _peer: accepted.append(conn))
    reactor = Reactor(asyncio.get_running_loop())
    clients = [socket.create_connection(sock.getsockname()) for _ in range(QUEUED)]
    hog: list[int] = []
    while True:
        try:
            hog.append(os.dup(0))
        except OSError:
            break
    listener.start(reactor)
    started = time.process_time()
    await asyncio.sleep(1.0)
    starved_cpu = time.process_time() - started
    for fd in hog:
        os.close(fd)
    # The listener retries on its own after a pause; give it time to come back.
    await asyncio.sleep(2.0)
    print(json.dumps({"starved_cpu": starved_cpu, "accepted": len(accepted)}))
    for conn in accepted + clients:
        conn.close()


resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
with asyncio.Runner(loop_factory=new_event_loop) as runner:
    runner.run(main())
