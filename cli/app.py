"""``craft``: the one command users meet. Argparse and printing only; the libraries do the work.

Each subcommand lives in a module of this package with a ``register(subparsers)`` function, and
:data:`COMMANDS` lists them: a new command group (``craft toyworld ...``) is one module plus one
entry there. Command modules import their heavy libraries inside the command, so ``craft --help``
stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from . import assets, export, generate, remote, serve, sync, toyworld, train
from .common import CliError, HelpFormatter

__all__ = ["main", "build_parser", "CliError", "COMMANDS"]

log = logging.getLogger("craft")

# The subcommand modules, in the order ``craft --help`` lists them.
COMMANDS = (assets, generate, export, serve, sync, remote, train, toyworld)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("craft-lora-serve")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``, reading the installed version only when asked (importlib.metadata costs every
    other command a tenth of a second)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {_version()}")  # stdout, as argparse's own version action
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="craft", formatter_class=HelpFormatter,
                                     description="CRAFT-LoRA content/style personalisation: export, serve, generate")
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="show the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (libraries included)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, printed without a traceback."""
    return (CliError, ValueError, FileNotFoundError, PermissionError, KeyError)


def _quiet_libraries(verbose: bool) -> None:
    """Keep diffusers / transformers progress bars and advice out of the CLI output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "info" if verbose else "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"craft: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("craft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
