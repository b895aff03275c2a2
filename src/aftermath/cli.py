"""The `aftermath` command. Each subcommand lives in its own module under `aftermath.commands`.

A command module defines `register(subparsers)`, which adds its parser and sets `func` to a function
taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aftermath.errors import EXIT_EXCLUDED, AftermathError, ExcludedError

# Order here is the order of `aftermath --help`.
COMMAND_MODULES = [
    "aftermath.commands.init_model",
    "aftermath.commands.inspect",
    "aftermath.commands.export_tiers",
    "aftermath.commands.prepare_data",
    "aftermath.commands.eval",
    "aftermath.commands.generate",
    "aftermath.commands.data_server",
    "aftermath.commands.coordinator",
    "aftermath.commands.client",
    "aftermath.commands.testnet",
    "aftermath.commands.demo",
    "aftermath.commands.report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aftermath",
        description="Train one MatFormer language model across a network of unequal machines.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ExcludedError as exc:  # its own exit status: a testnet tells an exclusion from a failure
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_EXCLUDED
    except AftermathError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
