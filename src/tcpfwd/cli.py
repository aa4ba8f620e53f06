"""Command line: quick mode, ``run``, ``check``; exit codes.

Exit codes: 0 success, 1 the daemon could not start (e.g. a port in use),
2 bad usage or an invalid configuration.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

from . import __version__
from .config import (
    GREETING_PRESETS,
    Config,
    ConfigError,
    as_command_line_error,
    load_config,
    quick_config,
)
from .lifecycle import run
from .listener import ListenError
from .localcheck import check_local
from .process import configure_logging_for
from .server import Server
from .transparent import has_transparent_capability, transparent_services
from .vocabulary import ADMIN_ACTIONS, CheckKind, Policy, RelayMode

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
EXIT_USAGE = 2

SUBCOMMANDS = ("run", "check", "reload", "status", "backend")

_DESCRIPTION = """\
A TCP bouncer: listens on TCP ports and joins every client to the first destination
that connects, trying them in order.

  tcpfwd LISTEN BACKEND [BACKEND ...] [options]   quick mode, one service
  tcpfwd run --config FILE                        services from a TOML file
  tcpfwd check --config FILE                      validate a TOML file and exit
  tcpfwd reload --config FILE                     validate, then make the daemon reload it
  tcpfwd status --config FILE                     the running daemon's services and backends
  tcpfwd backend drain|disable|enable SERVICE/BACKEND --config FILE

Example: tcpfwd 127.0.0.1:10025 mail1.internal:25 mail2.internal:25
"""


def _add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="access and event log format"
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="daemon event log level"
    )


def _quick_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcpfwd",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tcpfwd {__version__}")
    parser.add_argument(
        "listen", metavar="LISTEN", help="address to listen on, e.g. 127.0.0.1:10025"
    )
    parser.add_argument(
        "backends", metavar="BACKEND", nargs="+", help="destinations in the order to try them"
    )
    parser.add_argument("--connect-timeout", metavar="DURATION", help="per attempt (default 2s)")
    parser.add_argument(
        "--failover-timeout", metavar="DURATION", help="bound on all attempts (default 30s)"
    )
    parser.add_argument(
        "--idle-timeout", metavar="DURATION", help="close idle sessions (default off)"
    )
    parser.add_argument("--source-address", metavar="IP", help="local address towards backends")
    parser.add_argument(
        "--transparent",
        action="store_true",
        help="connect to backends from the client's own address (needs CAP_NET_ADMIN and "
        "routing for the replies: see docs/transparent.md)",
    )
    parser.add_argument(
        "--policy", choices=list(Policy), help="order of attempts (default failover)"
    )
    parser.add_argument(
        "--greeting",
        metavar="PRESET|REGEX",
        help=f"require the backend's first line to match ({', '.join(GREETING_PRESETS)}, "
        "or a regex) before relaying; otherwise try the next backend",
    )
    parser.add_argument(
        "--greeting-timeout", metavar="DURATION", help="wait for the greeting (default 5s)"
    )
    parser.add_argument(
        "--hold-timeout",
        metavar="DURATION",
        help="keep a client waiting this long while no backend can be reached (default off)",
    )
    parser.add_argument(
        "--hedge-delay",
        metavar="DURATION",
        help="try the next backend beside an attempt with no answer after this long "
        "(default auto: from the backend's own answer times)",
    )
    parser.add_argument(
        "--no-hedge", action="store_true", help="strictly one attempt at a time, in order"
    )
    parser.add_argument(
        "--check",
        choices=[kind for kind in CheckKind if kind != CheckKind.SEND],
        help="active health check of every backend (default none)",
    )
    parser.add_argument("--check-interval", metavar="DURATION", help="default 2s")
    parser.add_argument(
        "--no-passive-health",
        action="store_true",
        help="do not mark backends down when client connections to them fail",
    )
    parser.add_argument("--dns-ttl", metavar="DURATION", help="reuse resolved names (default 30s)")
    parser.add_argument("--no-keepalive", action="store_true", help="no TCP keepalive")
    parser.add_argument("--no-nodelay", action="store_true", help="leave Nagle's algorithm on")
    parser.add_argument(
        "--relay",
        choices=list(RelayMode),
        help="splice (Linux, zero-copy), copy, or auto: splice where available (default)",
    )
    parser.add_argument(
        "--grace-period", metavar="DURATION", help="drain time on stop (default 30s)"
    )
    _add_proxy_options(parser)
    _add_logging_options(parser)
    return parser


def _add_proxy_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("PROXY protocol")
    group.add_argument(
        "--send-proxy", choices=("v1", "v2"), help="send backends a PROXY header first"
    )
    group.add_argument(
        "--proxy-unique-id", action="store_true", help="v2: the session id as UNIQUE_ID TLV"
    )
    group.add_argument("--proxy-crc32c", action="store_true", help="v2: add a CRC32C TLV")
    accept = group.add_mutually_exclusive_group()
    accept.add_argument(
        "--accept-proxy",
        action="store_const",
        const=True,
        help="clients (trusted sources only) start with a PROXY header",
    )
    accept.add_argument(
        "--accept-proxy-optional",
        dest="accept_proxy",
        action="store_const",
        const="optional",
        help="like --accept-proxy, but trusted sources may also send no header",
    )
    group.add_argument(
        "--trusted-source",
        action="append",
        metavar="CIDR",
        help="who may send a PROXY header (repeat; required with --accept-proxy)",
    )
    group.add_argument(
        "--proxy-header-timeout", metavar="DURATION", help="to receive a header (default 3s)"
    )


def _file_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"tcpfwd {command}",
        description={
            "check": "Validate a configuration file and exit.",
            "run": "Run the services of a configuration file. SIGHUP reloads it.",
            "reload": "Validate a configuration file, then send SIGHUP to the daemon whose "
            "pid is in the file's global.pid_file.",
        }[command],
    )
    parser.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML file")
    if command == "run":
        _add_logging_options(parser)
    return parser


def _control_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"tcpfwd {command}",
        description={
            "status": "Show the running daemon's services, backends and sessions.",
            "backend": "Drain (no new sessions, live ones finish), disable (no new sessions, "
            "live ones closed) or enable a backend of the running daemon.",
        }[command],
    )
    if command == "backend":
        parser.add_argument("action", choices=tuple(ADMIN_ACTIONS))
        parser.add_argument("target", metavar="SERVICE/BACKEND")
    parser.add_argument("-c", "--config", metavar="FILE", help="find the admin endpoint here")
    parser.add_argument("--admin", metavar="URL", help="admin endpoint, e.g. http://127.0.0.1:8404")
    parser.add_argument("--token", help="admin bearer token (default: the file's)")
    if command == "status":
        parser.add_argument("--json", action="store_true", help="print the JSON status")
    return parser


def _control(command: str, args_list: list[str]) -> int:
    # Only the control commands speak HTTP to a daemon: the daemon does not load urllib.
    from .ctl import ControlError, backend_action, resolve_endpoint, show_status  # noqa: PLC0415

    args = _control_parser(command).parse_args(args_list)
    try:
        config = load_config(args.config) if args.config and not args.admin else None
        base, token = resolve_endpoint(args, config)
        if command == "status":
            print(show_status(base, token, args.json))
        else:
            print(backend_action(base, token, args.action, args.target))
    except ConfigError as error:
        print(error.report(), file=sys.stderr)
        return EXIT_USAGE
    except ControlError as error:
        print(f"tcpfwd: {error}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    return EXIT_OK


def _quick_config(args: argparse.Namespace) -> Config:
    settings: dict[str, object] = {}
    if args.relay is not None:
        settings["relay"] = args.relay
    for option in (
        "connect_timeout",
        "failover_timeout",
        "idle_timeout",
        "source_address",
        "policy",
        "hold_timeout",
        "hedge_delay",
        "dns_ttl",
    ):
        value = getattr(args, option)
        if value is not None:
            settings[option] = value
    if args.greeting is not None:
        kind = "preset" if args.greeting in GREETING_PRESETS else "expect"
        greeting: dict[str, object] = {kind: args.greeting}
        if args.greeting_timeout is not None:
            greeting["timeout"] = args.greeting_timeout
        settings["greeting"] = greeting
    health: dict[str, object] = {}
    if args.check is not None:
        health["check"] = args.check
    if args.check_interval is not None:
        health["interval"] = args.check_interval
    if args.no_passive_health:
        health["passive"] = False
    if health:
        settings["health"] = health
    if args.transparent:
        settings["transparent"] = True
    if args.no_hedge:
        settings["hedge"] = False
    if args.no_keepalive:
        settings["keepalive"] = False
    if args.no_nodelay:
        settings["nodelay"] = False
    if args.send_proxy is not None:
        if args.proxy_unique_id or args.proxy_crc32c:
            settings["send_proxy"] = {
                "version": args.send_proxy,
                "unique_id": args.proxy_unique_id,
                "crc32c": args.proxy_crc32c,
            }
        else:
            settings["send_proxy"] = args.send_proxy
    if args.accept_proxy is not None:
        settings["accept_proxy"] = args.accept_proxy
    if args.trusted_source is not None:
        settings["trusted_sources"] = args.trusted_source
    if args.proxy_header_timeout is not None:
        settings["proxy_header_timeout"] = args.proxy_header_timeout
    global_settings: dict[str, object] = {}
    for option in ("grace_period", "log_format", "log_level"):
        value = getattr(args, option)
        if value is not None:
            global_settings[option] = value
    return quick_config(
        args.listen, args.backends, settings=settings, global_settings=global_settings
    )


def _with_logging_overrides(config: Config, args: argparse.Namespace) -> Config:
    changes = {k: getattr(args, k) for k in ("log_format", "log_level") if getattr(args, k)}
    return replace(config, **changes) if changes else config


def _describe(config: Config) -> str:
    listeners = sum(len(s.listen) for s in config.services)
    backends = sum(len(s.backends) for s in config.services)
    return f"{len(config.services)} services, {listeners} listen addresses, {backends} backends"


def _note_capabilities(config: Config) -> None:
    """What running ``config`` needs beyond binding its ports, said where it is checked."""
    services = transparent_services(config)
    if services:
        have = "has it" if has_transparent_capability() else "does not have it"
        if config.user is not None and os.geteuid() == 0:
            have += ", but switching to global.user drops it"
        print(
            f"{config.source}: transparent mode (service{'s' * (len(services) > 1)} "
            f"{', '.join(services)}) needs CAP_NET_ADMIN when it runs (this process {have}); "
            "replies need routing back through this host: see docs/transparent.md"
        )


def _signal_reload(config: Config) -> int:
    if not config.pid_file:
        print(
            f"tcpfwd: {config.source} sets no global.pid_file to find the daemon by",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        with open(config.pid_file) as stream:
            pid = int(stream.read().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as error:
        print(f"tcpfwd: cannot signal the daemon of {config.pid_file}: {error}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    print(f"{config.source}: OK ({_describe(config)}); reload sent to pid {pid}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = args_list[0] if args_list and args_list[0] in SUBCOMMANDS else None
    if command in ("status", "backend"):
        return _control(command, args_list[1:])
    try:
        if command is None:
            args = _quick_parser().parse_args(args_list)
            if (args.proxy_unique_id or args.proxy_crc32c) and args.send_proxy != "v2":
                _quick_parser().error("--proxy-unique-id and --proxy-crc32c need --send-proxy v2")
            config = _quick_config(args)
            try:
                check_local(config)
            except ConfigError as error:
                raise as_command_line_error(error) from None
        else:
            args = _file_parser(command).parse_args(args_list[1:])
            config = check_local(load_config(args.config))
            if command == "check":
                print(f"{config.source}: OK ({_describe(config)})")
                _note_capabilities(config)
                return EXIT_OK
            if command == "reload":
                return _signal_reload(config)
            config = _with_logging_overrides(config, args)
    except ConfigError as error:
        count = len(error.issues)
        print(
            f"tcpfwd: invalid configuration ({count} error{'s' * (count != 1)}):", file=sys.stderr
        )
        print(error.report(), file=sys.stderr)
        return EXIT_USAGE
    try:
        configure_logging_for(config)
    except OSError as error:
        print(f"tcpfwd: cannot open log: {error}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    reload_config = None
    if command == "run":
        path, overrides = args.config, args

        def reload_config() -> Config:
            return check_local(_with_logging_overrides(load_config(path), overrides))

    try:
        if command == "run":
            # Imported here: a single process does without them.
            from .control import worker_spec  # noqa: PLC0415
            from .supervisor import supervise  # noqa: PLC0415
            from .worker import run_worker  # noqa: PLC0415

            spec = worker_spec()
            if spec is not None:
                run_worker(config, spec, reload_config=reload_config)
            elif config.workers > 1:
                supervise(config, args_list, reload_config=reload_config)
            else:
                run(Server(config, reload_config=reload_config))
        else:
            run(Server(config, reload_config=reload_config))
    except ListenError as error:
        print(f"tcpfwd: {error}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    except KeyboardInterrupt:
        pass
    return EXIT_OK
