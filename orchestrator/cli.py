"""The ``coalora`` command line."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence


def _offline_defaults() -> None:
    """The default job never touches a model hub; a user who wants one unsets these."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # schema-migration chatter on a new SQLite store
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coalora", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="apply configurations spanning 2-8.6 bits to a model and measure them")
    demo.add_argument("--model", default="minilm", help="packaged name (minilm), local path or hub id of an encoder")

    run = sub.add_parser("run", help="start a CoA-LoRA run (default: conf/default.yaml)")
    run.add_argument("config", nargs="?", help="YAML run configuration (default conf/default.yaml)")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. adapter.rank=16")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    resume = sub.add_parser("resume", help="continue a run from its last valid checkpoint")
    resume.add_argument("run_dir")
    resume.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    resume.add_argument("--no-progress", action="store_true")
    resume.add_argument("--repair-ledger", action="store_true",
                        help="restore a ledger that lost or changed entries from the newest checkpoint's copy")

    status = sub.add_parser("status", help="round, pool, training set, hypervolume, best loss per segment")
    status.add_argument("run_dir")

    export = sub.add_parser("export", help="the best configuration for a device budget, as a PEFT adapter or as "
                                           "a GGUF model + LoRA for llama.cpp")
    export.add_argument("run_dir")
    export.add_argument("--format", choices=("peft", "gguf", "merged"), default=None,
                        help="peft (the default): PEFT adapter + configuration JSON; gguf: model.gguf + adapter.gguf "
                             "for llama.cpp (runs over llama.cpp types, e.g. conf/gguf.yaml); merged (the default and "
                             "only format of an adapter.kind: lota run): the ternary adapter merged into the codes")
    export.add_argument("--merge", action="store_true",
                        help="gguf only: one model.gguf with the adapter merged before quantization (no adapter "
                             "matmul at run time; the adapter is quantized too, see docs/deploy.md)")
    budget = export.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bits", type=float, help="average bits per weight of the target matrices")
    budget.add_argument("--memory-mb", type=float, help="packed target matrices + the rest of the model in 16 bits")
    export.add_argument("--out", help="output directory (default RUN_DIR/exports/<budget>)")

    from .sweep import add_sweep_parser

    add_sweep_parser(sub)
    return parser


def _split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`coalora run key=value` (no config file) is allowed: a first positional with '=' is an override."""
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so the MLflow run is ended KILLED and locks and workers are released."""
    raise SystemExit(128 + signum)


def _one_line(err: BaseException) -> str:
    text = (str(err).strip() or type(err).__name__)[:1000]
    return text if isinstance(err, (ValueError, RuntimeError, OSError)) else f"{type(err).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _offline_defaults()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print(f"coalora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every error becomes a clear message
        if args.debug:
            traceback.print_exc()
        print(f"coalora {args.command}: error: {_one_line(err)}", file=sys.stderr)
        if not args.debug and not isinstance(err, ValueError):
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(args.model)
    elif args.command == "run":
        from .config import load_config
        from .runs import start_run

        path, overrides = _split_config_arg(args)
        run_dir, rows = start_run(load_config(path, overrides), address=args.address, progress=not args.no_progress)
        _print_final(run_dir, rows)
    elif args.command == "resume":
        from .runs import resume_run

        rows = resume_run(Path(args.run_dir), address=args.address, progress=not args.no_progress,
                          repair_ledger=args.repair_ledger)
        _print_final(Path(args.run_dir), rows)
    elif args.command == "status":
        from .runs import format_status, run_status

        print(format_status(run_status(Path(args.run_dir))))
    elif args.command == "export":
        from .export import export_run

        out = export_run(Path(args.run_dir), bits=args.bits, memory_mb=args.memory_mb, out=args.out,
                         fmt=args.format, merge=args.merge)
        print(f"exported to {out}")
    elif args.command == "sweep":
        from .sweep import run_sweep_command

        return run_sweep_command(args)
    return 0


def _print_final(run_dir: Path, rows: list[dict]) -> None:
    from .loop.report import text_table

    metric = "accuracy" if rows and "accuracy" in rows[0] else "perplexity"
    print(text_table(rows, ["method", "configuration", "avg_bits", metric, "loss"]))
    print(f"\nrun directory: {run_dir}")
    bits = math.ceil(rows[0]["avg_bits"] * 100) / 100 if rows else 3
    fmt = " --format gguf" if _is_gguf_run(run_dir) else ""
    print(f"status: coalora status {run_dir}   resume: coalora resume {run_dir}   "
          f"export: coalora export {run_dir}{fmt} --bits {bits:g}")


def _is_gguf_run(run_dir: Path) -> bool:
    from .runs import load_run_config

    try:
        return load_run_config(run_dir).load_space().is_gguf
    except Exception:  # noqa: BLE001 - only a hint depends on it
        return False


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


if __name__ == "__main__":
    run()
