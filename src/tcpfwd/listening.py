"""The listening sockets of a process that serves sessions, by the address they serve.

One configured address may need several sockets (every interface, or every address of a
name); each becomes a `Listener` wired to the service that has the address. A reload
keeps the listeners of addresses still configured (nothing queued on them is lost),
wires them to the new service runtimes, adds the new ones and closes the others.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from .binding import Inherited, ListenKey, bind_new, close_sockets, listen_addresses
from .config import Address, Config
from .dialer import apply_options
from .listener import Listener, open_listening_sockets
from .reactor import RawSocket, Reactor
from .service import ServiceRuntime
from .vocabulary import HostPort

log = logging.getLogger("tcpfwd")

Accepted = Callable[[Listener, RawSocket, HostPort], None]


class Listeners:
    """Every listener of the process, by the configured address it serves."""

    def __init__(self, on_connection: Accepted) -> None:
        self._on_connection = on_connection
        self._groups: dict[ListenKey, list[Listener]] = {}
        # A worker's sockets, bound by its supervisor, by address.
        self._given: dict[ListenKey, list[socket.socket]] = {}
        # Workers bind what they were not given (an address added to the file meanwhile)
        # in their supervisor's SO_REUSEPORT group.
        self.reuse_port = False

    def __bool__(self) -> bool:
        return bool(self._groups)

    def __len__(self) -> int:
        return sum(len(group) for group in self._groups.values())

    def all(self) -> list[Listener]:
        return [each for group in self._groups.values() for each in group]

    def names(self, service: ServiceRuntime) -> list[str]:
        """The addresses ``service`` is served on, as bound."""
        return [listener.name for listener in self.all() if listener.service is service]

    # --- opening ---------------------------------------------------------------------

    def give(self, key: ListenKey, sockets: list[socket.socket]) -> None:
        """Sockets a supervisor bound for ``key``: used instead of binding them here."""
        self._given[key] = sockets

    def close_given(self) -> None:
        """Close the given sockets no configured address took."""
        for group in self._given.values():
            close_sockets(group)
        self._given.clear()

    def bind_new(
        self, config: Config, inherited: Inherited
    ) -> dict[ListenKey, list[socket.socket]]:
        """Sockets for ``config``'s addresses without listeners, or none (ListenError)."""

        def open_address(key: ListenKey, address: Address, backlog: int) -> list[socket.socket]:
            given = self._given.pop(key, None)
            if given is not None:
                return given
            sock = inherited.take(address)
            if sock is not None:
                return [sock]
            return open_listening_sockets(address, backlog, reuse_port=self.reuse_port)

        return bind_new(config, self._groups, open_address, close_sockets)

    # --- wiring ----------------------------------------------------------------------

    def install(
        self,
        config: Config,
        opened: dict[ListenKey, list[socket.socket]],
        services: dict[str, ServiceRuntime],
    ) -> None:
        """Listen on ``config``'s addresses for ``services``: close the listeners of
        addresses it no longer has, make listeners of ``opened``, wire every one."""
        wanted = listen_addresses(config)
        for key in list(self._groups):
            if key not in wanted:
                for listener in self._groups.pop(key):
                    listener.close()
                    log.info("no longer listening on %s", listener.name)
        for key, sockets in opened.items():
            self._groups[key] = [Listener(sock, self._on_connection) for sock in sockets]
        for key, (service_config, _address) in wanted.items():
            runtime = services[service_config.name]
            for listener in self._groups[key]:
                if listener.service is None or listener.service.listen_options != (
                    runtime.listen_options
                ):
                    # Accepted sockets inherit these: none of them needs its own calls.
                    apply_options(listener.sock, runtime.listen_options)
                listener.service = runtime
                listener.set_rate(service_config.settings.accept_rate)

    def relisten(self, config: Config) -> None:
        """Apply each address's backlog (a reload may change it)."""
        wanted = listen_addresses(config)
        for key, group in self._groups.items():
            backlog = wanted[key][0].settings.backlog
            for listener in group:
                listener.sock.listen(backlog)

    # --- accepting -------------------------------------------------------------------

    def start(self, reactor: Reactor, is_held: Callable[[ServiceRuntime], bool]) -> None:
        """Start accepting on the listeners not started yet (held ones stay held)."""
        for listener in self.all():
            if not listener.started:
                if is_held(listener.service):
                    listener.hold()
                listener.start(reactor)
                log.info("listening on %s for service %s", listener.name, listener.service.name)

    def hold(
        self,
        service: ServiceRuntime | None,
        hold: bool,
        is_held: Callable[[ServiceRuntime], bool],
    ) -> None:
        """Stop (or resume) accepting: every listener, or ``service``'s alone."""
        for listener in self.all():
            if service is not None and listener.service is not service:
                continue
            if hold:
                listener.hold()
            elif not is_held(listener.service):
                listener.release()

    def close(self) -> None:
        """Stop accepting for good; the sockets are closed."""
        for listener in self.all():
            listener.close()
