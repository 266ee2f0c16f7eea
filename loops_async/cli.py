"""The ``loops-async`` command line.

::

    loops-async serve [--host 127.0.0.1] [--port 8700] [--data-dir DIR] [--backend torch|null]
                      [--api-key KEY] [--allowed-host NAME ...] [--seed N] [--log-level info]
                      [--profile local|hosted] [--cold-start-requests N]
                      [--cold-start-retry-after S] [--storage-port PORT]
                      [--shared-samplers] [--omit-result-paths]
    loops-async demo  [--steps 30] [--seed 0] [--server URL]

Settings not given as flags come from ``LOOPS_ASYNC_*`` environment variables
(``LOOPS_ASYNC_API_KEY``, ``LOOPS_ASYNC_PORT``, ...; see
:class:`~loops_async.server.ServerSettings`), then from the defaults. ``python -m loops_async``
runs the same command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]

_Command = Callable[[argparse.Namespace], int]


def _add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the local reference server",
        description="Run the local Loops server (trainer + control plane) until interrupted. "
        "Flags override LOOPS_ASYNC_* environment variables.",
    )
    p.add_argument(
        "--host",
        help="interface to bind (default 127.0.0.1: local connections only; any other "
        "address needs an API key)",
    )
    p.add_argument("--port", type=int, help="TCP port (default 8700; 0 = any free port)")
    p.add_argument("--data-dir", help="where runs and checkpoints live (default ./.loops-data)")
    p.add_argument(
        "--backend",
        choices=["torch", "null"],
        help="torch trains for real (default); null answers instantly (protocol only)",
    )
    p.add_argument(
        "--api-key",
        help="require 'Authorization: Api-Key <key>' on every request (prefer the "
        "LOOPS_ASYNC_API_KEY environment variable: flags are visible in the process list)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a Host name (or name:port, or '*' for any) requests may be addressed to besides "
        "127.0.0.1, localhost and [::1]; repeatable (env LOOPS_ASYNC_ALLOWED_HOSTS, "
        "comma-separated)",
    )
    p.add_argument("--seed", type=int, help="default seed of new trainers (default 0)")
    p.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="log level (default info)",
    )
    p.add_argument(
        "--profile",
        choices=["local", "hosted"],
        help="local: the reference behaviour (default); hosted: reproduce the hosted service's "
        "rough edges (sampler URLs under /sync, cold starts, presigned storage on another port)",
    )
    p.add_argument(
        "--cold-start-requests",
        type=int,
        metavar="N",
        help="hosted profile: requests a new deployment refuses in each cold-start phase "
        "(default 2; 0 = none)",
    )
    p.add_argument(
        "--cold-start-retry-after",
        type=float,
        metavar="S",
        help="hosted profile: Retry-After seconds of a cold-start 503 (default 1)",
    )
    p.add_argument(
        "--storage-port",
        type=int,
        metavar="PORT",
        help="hosted profile: port of the presigned-storage listener (default 0: any free port)",
    )
    p.add_argument(
        "--shared-samplers",
        action="store_const",
        const=True,
        help="make every sampler shared (serverless: the operation protocol, adapters cached "
        "by name)",
    )
    p.add_argument(
        "--omit-result-paths",
        action="store_const",
        const=True,
        help="answer save_state / save_weights_for_sampler without 'path' (older hosted trainers)",
    )
    p.set_defaults(command=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .server.local import serve
    from .server.settings import ServerSettings

    try:
        settings = ServerSettings.from_env(
            host=args.host,
            port=args.port,
            data_dir=None if args.data_dir is None else Path(args.data_dir).expanduser(),
            backend=args.backend,
            api_key=args.api_key,
            allowed_hosts=None if not args.allowed_host else tuple(args.allowed_host),
            seed=args.seed,
            log_level=args.log_level,
            profile=args.profile,
            cold_start_requests=args.cold_start_requests,
            cold_start_retry_after=args.cold_start_retry_after,
            storage_port=args.storage_port,
            shared_samplers=args.shared_samplers,
            omit_result_paths=args.omit_result_paths,
        )
    except ValueError as exc:
        print(f"loops-async serve: {exc}", file=sys.stderr)
        return 2
    auth = "API key required" if settings.api_key else "no API key"
    print(
        f"loops-async: serving on http://{settings.host}:{settings.port} "
        f"(backend {settings.backend}, profile {settings.profile}, data in "
        f"{settings.data_dir}, {auth})",
        file=sys.stderr,
    )
    serve(settings)
    return 0


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from . import demo

    p = subparsers.add_parser(
        "demo",
        help="train the built-in model on an embedded server and print the loss",
        description=demo.__doc__,
    )
    demo.add_arguments(p)
    p.set_defaults(command=demo.run_from_args)


# Each entry adds one subcommand (its parser sets ``command``).
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_serve,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``loops-async``."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="loops-async", description="Loops training API client and local reference server."
    )
    parser.add_argument("--version", action="version", version=f"loops-async {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: _Command | None = getattr(args, "command", None)
    if command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return command(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
