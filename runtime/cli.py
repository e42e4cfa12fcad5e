"""The `mu0` command. Each subcommand lives in `runtime/commands/<name>.py` and exposes
`add_parser(subparsers)`; heavy imports happen inside its `run`, so `mu0 --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order `mu0 --help` lists them.
COMMANDS = [
    "runtime.commands.info",
    "runtime.commands.predict",
    "runtime.commands.serve",
    "runtime.commands.collect",
    "runtime.commands.extract",
    "runtime.commands.pretrain",
    "runtime.commands.eval_traces",
    "runtime.commands.train_expert",
    "runtime.commands.eval_policy",
    "runtime.commands.demo",
    "runtime.commands.calibrate",
    "runtime.commands.run_real",
    "runtime.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mu0",
        description="μ0 runtime: a frozen 3D-trace world model and the tools around it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
