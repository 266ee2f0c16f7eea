"""``python -m loops_async.tinker [--shadow] [--local] (-m MODULE | SCRIPT) [ARGS...]``.

Runs a script (or module) written for tinker with ``import tinker`` resolving to
``loops_async.tinker`` (see :func:`loops_async.tinker.install`). Everything after the script
path (or ``-m MODULE``) is the script's own arguments, passed through untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import runpy
import sys

from ._install import TinkerAlreadyInstalledError, install

_PROG = "python -m loops_async.tinker"
_FLAGS = ("--shadow", "--local", "-h", "--help")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        usage=f"{_PROG} [--shadow] [--local] (-m MODULE | SCRIPT) [ARGS...]",
        description=(
            "Run a tinker script against loops_async: `import tinker` (and every tinker.x "
            "submodule) resolves to loops_async.tinker. Arguments after SCRIPT or -m MODULE "
            "are passed to it untouched."
        ),
    )
    parser.add_argument(
        "--shadow",
        action="store_true",
        help="use loops_async.tinker even if a real tinker package is installed",
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help=(
            "start the embedded local server for the run and point TINKER_BASE_URL at it "
            "(unless TINKER_BASE_URL or LOOPS_BASE_URL is already set)"
        ),
    )
    parser.add_argument("-m", dest="module", metavar="MODULE", help="run a module as a script")
    parser.add_argument("script", nargs="?", metavar="SCRIPT", help="the script to run")
    return parser


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, the script's arguments): the launcher's end at SCRIPT or -m X."""
    for i, arg in enumerate(argv):
        if arg in _FLAGS:
            continue
        if arg == "--":  # SCRIPT follows, even one starting with "-"
            return [*argv[:i], *argv[i : i + 2]], argv[i + 2 :]
        if arg == "-m":
            return argv[: i + 2], argv[i + 2 :]
        if arg.startswith("-m"):  # -mMODULE
            return [*argv[:i], "-m", arg[2:]], argv[i + 1 :]
        if arg.startswith("-") and arg != "-":
            return argv[: i + 1], []  # an unknown option: argparse reports it
        return argv[: i + 1], argv[i + 1 :]
    return argv, []


SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shim")
"""Holds a ``tinker`` package that installs the layer when imported (for child processes)."""


def main(argv: list[str] | None = None) -> int:
    """Install the ``tinker`` alias and run SCRIPT (or ``-m MODULE``) with ARGS."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = _split(argv)
    parser = _parser()
    args = parser.parse_args(ours)
    if (args.module is None) == (args.script is None):
        parser.error("give exactly one of SCRIPT or -m MODULE")
    target: str = args.module or args.script
    if args.script is not None and not os.path.exists(args.script):
        print(f"{_PROG}: can't open file {args.script!r}", file=sys.stderr)
        return 2
    try:
        install(shadow=args.shadow)
    except TinkerAlreadyInstalledError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return 2
    if args.module is not None:
        try:
            found = importlib.util.find_spec(args.module)
        except ImportError:
            found = None
        if found is None:
            print(f"{_PROG}: No module named {args.module}", file=sys.stderr)
            return 1

    saved_argv, saved_path = sys.argv[:], sys.path[:]
    saved_url = os.environ.get("TINKER_BASE_URL")
    saved_pythonpath = os.environ.get("PYTHONPATH")
    # Child processes (subprocess, multiprocessing spawn workers) import tinker too: the shim
    # first on their PYTHONPATH installs the layer there.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (SHIM_DIR, saved_pythonpath)))
    try:
        with contextlib.ExitStack() as stack:
            if args.local:
                existing = os.environ.get("TINKER_BASE_URL") or os.environ.get("LOOPS_BASE_URL")
                if existing:
                    print(
                        f"{_PROG}: --local: using the server already set: {existing}",
                        file=sys.stderr,
                    )
                else:
                    try:
                        from loops_async.server import embedded
                    except ImportError as exc:
                        print(
                            f"{_PROG}: --local needs the server extra "
                            f"(pip install 'loops-async[server]'): {exc}",
                            file=sys.stderr,
                        )
                        return 2
                    url = stack.enter_context(embedded(None))
                    os.environ["TINKER_BASE_URL"] = url
                    print(f"{_PROG}: --local: started a local server at {url}", file=sys.stderr)
            sys.argv = [target, *rest]
            if args.module is not None:
                sys.path.insert(1, SHIM_DIR)
                runpy.run_module(args.module, run_name="__main__", alter_sys=True)
            else:
                if os.path.isfile(target):  # run_path puts a directory / zip there itself
                    sys.path.insert(0, os.path.dirname(os.path.realpath(target)))
                # multiprocessing's spawn workers take this process's sys.path, not PYTHONPATH
                sys.path.insert(1, SHIM_DIR)
                runpy.run_path(target, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        for name, value in (("TINKER_BASE_URL", saved_url), ("PYTHONPATH", saved_pythonpath)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return 0


if __name__ == "__main__":
    sys.exit(main())
