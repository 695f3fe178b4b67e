"""System overhead: the same short MiniLM run in-process vs through Ray actors, and with 1 vs 2 Ray workers.

Three runs of one configuration (packaged MiniLM + review snippets, 2 rounds), differing only in
``cluster.executor`` / ``cluster.workers``:
  * in-process: one replica in the driver process (no Ray)
  * ray-1:      one Ray worker actor (same single gradient shard, so the numbers must be identical)
  * ray-2:      two Ray worker actors (shards averaged; candidate evaluations in parallel)
Reported per run: start-up (workers built and ready) and loop time (everything after), from the run's
timing.json, and the share of the loop spent buffering and sending the per-step MLflow metrics (target <= 2%).
Overhead ratio = ray-1 loop / in-process loop − 1 (target ≤ 5%); speed-up = ray-1 loop / ray-2 loop.
The last line is one JSON object of the figures.

    python bench/system.py [--steps 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the packages, not bench/search.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bench_config(root: Path, name: str, executor: str, workers: int, steps: int, rounds: int) -> dict:
    return {
        "run": {"name": name, "root": str(root), "seed": 0},
        "model": {"name": "minilm", "task": "classification"},
        "data": {"dataset": "reviews", "max_length": 48, "train_examples": 512, "val_examples": 128,
                 "score_examples": 64, "batch_size": 32},
        "adapter": {"rank": 8, "alpha": 16},
        "training": {"steps_per_round": steps, "lr": 0.003},
        "search": {"rounds": rounds, "initial_budgets": 8, "proposals_per_round": 4, "fisher_examples": 16,
                   "cost_sample": 16384},
        "evaluation": {"unseen": 2, "baselines": ["no_adapter"]},
        "cluster": {"executor": executor, "workers": workers, "cpus_per_worker": 1},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "bench-system"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray

    from orchestrator.config import build_config
    from orchestrator.runs import start_run

    root = Path(tempfile.mkdtemp(prefix="coalora-bench-system-"))
    variants = [("in-process", "local", 1), ("ray-1", "ray", 1), ("ray-2", "ray", 2)]
    timings, ledgers = {}, {}
    for name, executor, workers in variants:
        cfg = build_config(bench_config(root, name, executor, workers, args.steps, args.rounds))
        run_dir, _ = start_run(cfg, progress=False)
        ray.shutdown()
        timings[name] = json.loads((run_dir / "timing.json").read_text())
        ledgers[name] = (run_dir / "ledger.jsonl").read_text()
        print(f"{name:<11} start-up {timings[name]['startup_s']:7.1f} s   loop {timings[name]['loop_s']:7.1f} s")
    loop = {k: v["loop_s"] for k, v in timings.items()}
    figures = {
        "bench": "system",
        "loop_s": {k: round(v, 2) for k, v in loop.items()},
        "startup_s": {k: round(v["startup_s"], 2) for k, v in timings.items()},
        "ray_overhead_ratio": round(loop["ray-1"] / loop["in-process"] - 1, 4),
        "ray_overhead_target_met": loop["ray-1"] / loop["in-process"] - 1 <= 0.05,
        "speedup_2_workers": round(loop["ray-1"] / loop["ray-2"], 3),
        # per-step MLflow metrics: time spent buffering and sending them, as a share of the training loop
        "step_logging_share": {k: round(v["step_logging_s"] / v["loop_s"], 5) for k, v in timings.items()},
        # step time with per-step logging on vs off: the loop against the loop without the time spent logging
        "step_logging_ratio": {k: round(v["loop_s"] / (v["loop_s"] - v["step_logging_s"]), 5)
                               for k, v in timings.items()},
        "ray1_ledger_identical_to_in_process": ledgers["ray-1"] == ledgers["in-process"],
        "cpus": os.cpu_count(),
    }
    print(f"Ray overhead (ray-1 vs in-process loop): {100 * figures['ray_overhead_ratio']:+.1f}% "
          f"(target <= +5%: {'met' if figures['ray_overhead_target_met'] else 'MISSED'})")
    worst = max(figures["step_logging_share"].values())
    print(f"per-step MLflow logging: {100 * worst:.3f}% of the loop at most (target <= 2%: "
          f"{'met' if worst <= 0.02 else 'MISSED'})")
    print(f"2 workers vs 1: {figures['speedup_2_workers']}x;  ray-1 ledger identical to in-process: "
          f"{figures['ray1_ledger_identical_to_in_process']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
