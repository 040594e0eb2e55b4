"""The `snugtune` command: the wizard with no arguments, headless subcommands otherwise.

Each group of subcommands lives in its own module with a `register(subparsers)` function.
This module and the ones it imports at start never import torch: the heavy engine is
imported inside the command that needs it, so `snugtune --help` and the wizard start fast.
"""
from __future__ import annotations

import argparse
import os
import sys

from core.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from tui import cmd_data, cmd_know, cmd_runs

    parser = argparse.ArgumentParser(
        prog="snugtune",
        description="Fine-tune small language models with QLoRA on small GPUs. "
        "With no command, opens the wizard.",
    )
    parser.add_argument("--preset", metavar="NAME", help="open the wizard with this preset loaded (name or TOML path)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cmd_runs.register(sub)
    cmd_know.register(sub)
    cmd_data.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.version:
            from importlib.metadata import version

            print(f"snugtune {version('snugtune')}")
            return 0
        if args.command is None:
            from tui.app import run_wizard

            return run_wizard(preset=args.preset) or 0
        return args.func(args) or 0
    except UserError as exc:
        print(f"snugtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("snugtune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """The reader of our output went away (`snugtune runs | head -1`): stop quietly.

    Python would print a BrokenPipeError traceback, and again when it flushes stdout at exit;
    pointing stdout at /dev/null makes that last flush harmless. The exit status is what a
    program killed by SIGPIPE has, 128 + 13, as `set -o pipefail` scripts expect."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":  # python -m tui.cli
    sys.exit(main())
