"""Command line: quick mode, ``run``, ``check``; exit codes.

Exit codes: 0 success, 1 the daemon could not start (e.g. a port in use),
2 bad usage or an invalid configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from . import __version__
from .accesslog import configure_logging
from .config import RELAY_MODES, Config, ConfigError, load_config, quick_config
from .listener import ListenError
from .server import run

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
EXIT_USAGE = 2

SUBCOMMANDS = ("run", "check")

_DESCRIPTION = """\
A TCP bouncer: listens on TCP ports and joins every client to the first destination
that connects, trying them in order.

  tcpfwd LISTEN BACKEND [BACKEND ...] [options]   quick mode, one service
  tcpfwd run --config FILE                        services from a TOML file
  tcpfwd check --config FILE                      validate a TOML file and exit

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
    parser.add_argument("--no-keepalive", action="store_true", help="no TCP keepalive")
    parser.add_argument("--no-nodelay", action="store_true", help="leave Nagle's algorithm on")
    parser.add_argument(
        "--relay",
        choices=RELAY_MODES,
        help="splice (Linux, zero-copy), copy, or auto: splice where available (default)",
    )
    parser.add_argument(
        "--grace-period", metavar="DURATION", help="drain time on stop (default 30s)"
    )
    _add_logging_options(parser)
    return parser


def _file_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"tcpfwd {command}",
        description="Validate a configuration file and exit."
        if command == "check"
        else "Run the services of a configuration file.",
    )
    parser.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML file")
    if command == "run":
        _add_logging_options(parser)
    return parser


def _quick_config(args: argparse.Namespace) -> Config:
    settings: dict[str, object] = {}
    if args.relay is not None:
        settings["relay"] = args.relay
    for option in ("connect_timeout", "failover_timeout", "idle_timeout", "source_address"):
        value = getattr(args, option)
        if value is not None:
            settings[option] = value
    if args.no_keepalive:
        settings["keepalive"] = False
    if args.no_nodelay:
        settings["nodelay"] = False
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


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = args_list[0] if args_list and args_list[0] in SUBCOMMANDS else None
    try:
        if command is None:
            args = _quick_parser().parse_args(args_list)
            config = _quick_config(args)
        else:
            args = _file_parser(command).parse_args(args_list[1:])
            config = load_config(args.config)
            if command == "check":
                print(f"{config.source}: OK ({_describe(config)})")
                return EXIT_OK
            config = _with_logging_overrides(config, args)
    except ConfigError as error:
        count = len(error.issues)
        print(
            f"tcpfwd: invalid configuration ({count} error{'s' * (count != 1)}):", file=sys.stderr
        )
        print(error.report(), file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log_format, config.log_level)
    try:
        run(config)
    except ListenError as error:
        print(f"tcpfwd: {error}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    except KeyboardInterrupt:
        pass
    return EXIT_OK
