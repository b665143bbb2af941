"""The `dsv4` command line. Each subcommand lives in its own module and is imported lazily,
so `dsv4 plan` never imports torch and `dsv4 --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module that defines `add_arguments(parser)` and `run(args)`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dsv4.model.info", "parameters, formats and memory of a V4 model or preset"),
    "plan": ("dsv4.plan.cli", "capacity and cost model: does it fit, how fast at best, cost"),
    "train": ("dsv4.train.cli", "train a small V4-architecture model (how dsv4-tiny is made)"),
    "eval": ("dsv4.train.evaluate", "accuracy and MTP acceptance of a small V4 model"),
    "bench": ("dsv4.bench.cli", "load-test any OpenAI-compatible endpoint; sweep; compare runs"),
    "serve": ("dsv4.server.cli", "OpenAI/Anthropic-compatible HTTP server (default: dsv4-tiny)"),
    "chat": ("dsv4.server.chat_cli", "talk to a V4 model in the terminal (default: dsv4-tiny)"),
    "generate": ("dsv4.server.generate_cli", "one answer to one prompt, streamed or as JSON"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv)  # prints the usage error for an unknown command
        return 2
    module_name, help_text = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"dsv4 {argv[0]}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except BrokenPipeError:  # `dsv4 plan --json | head`: the reader has gone, nothing failed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:  # user mistakes (bad values, missing or unwritable
        # files): say what and how to fix, no traceback
        print(f"dsv4 {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
