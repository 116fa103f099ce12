"""The ``rmtl`` command. Each subcommand lives in its own module under rmtl/commands/
and exposes ``register(subparsers)``, which adds its parser and sets ``func``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from rmtl import __version__
from rmtl.errors import RmtlError

import rmtl.commands as _commands


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ('rmtl prepare: error: argument --source: invalid choice ...'),
    exit status 2, not the usage block; --help still prints the full usage.
    Subcommand parsers are of this class too (argparse copies the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rmtl",
        description="Multi-task recommendation with reinforcement-learned loss weights.",
    )
    parser.add_argument("--version", action="version", version=f"rmtl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"rmtl.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may sit on both sides of options (argparse takes one positional run only)
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from rmtl import distributed

    try:
        return int(args.func(args) or 0)
    except RmtlError as err:
        if not distributed.quiet_here(err):  # under torchrun, a failure every rank agreed on: rank 0 says it
            print(f"rmtl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # permissions, disk full, read-only output: the path and the reason, no traceback
        print(f"rmtl {args.command}: error: {os_error_line(err)}", file=sys.stderr)
        return 2


def os_error_line(err: OSError) -> str:
    """'PATH: reason' of an OSError (both paths of a rename), falling back to its text."""
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    reason = err.strerror or str(err) or type(err).__name__
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
