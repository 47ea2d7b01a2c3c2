"""The `gpumarket` command."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("gpumarket")
    except PackageNotFoundError:  # running from a source tree without installing
        return "0+unknown"


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .demo import run_demo

    result = run_demo(Console())
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpumarket",
        description="A decentralized peer-to-peer GPU rental market.",
    )
    parser.add_argument("--version", action="version", version=f"gpumarket {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="run a complete local market: embedded EVM, 3 providers, 1 renter",
        description="Runs a complete market on this machine: an in-process EVM with the escrow "
                    "contract and a test stablecoin, three provider nodes with simulated GPUs and "
                    "one renter node on 127.0.0.1. Exits non-zero if any step does not happen.")
    demo.set_defaults(func=cmd_demo)
    from simulations.cli import register as register_simulate; register_simulate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.debug:
        # py-libp2p leaves sockets to the garbage collector when its hosts are cancelled.
        warnings.filterwarnings("ignore", category=ResourceWarning)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"gpumarket: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
