"""The ``coalora`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def _offline_defaults() -> None:
    """The default job never touches a model hub; a user who wants one unsets these."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coalora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="apply configurations spanning 2-8.6 bits to a model and measure them")
    demo.add_argument("--model", default="minilm", help="packaged name (minilm), local path or hub id of an encoder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _offline_defaults()
    try:
        if args.command == "demo":
            from .demo import main as demo_main

            demo_main(args.model)
    except ValueError as err:
        print(f"coalora {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


if __name__ == "__main__":
    run()
