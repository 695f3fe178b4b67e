"""Does θ help? CoA-LoRA against its own ablation (coa-no-theta: the same run replayed with M = I) and Shared-LoRA,
under variants of θ's optimisation, over several training seeds (issue 12).

Every run is the product's own (``orchestrator.runs.start_run``) with ``evaluation.baselines = [no_adapter,
shared_lora, no_theta]``, so the four methods are evaluated on the same validation examples and the same target
and unseen configurations, and coa-no-theta sees CoA-LoRA's exact training sets, K configurations per step, data
order, init and steps: the difference CoA-LoRA − coa-no-theta is what θ adds and nothing else.

Variants (``--variants``, each a list of ``section.key=value`` overrides on the base job):
  baseline   coalora before issue 12: θ at training.lr with its raw output, K drawn uniformly, ILP budgets over
             [2.25, 7.25], 40 segments
  theta-lr   baseline with θ at training.lr / 20
  reference  theta-lr, and the space's most precise configuration maps to M = I exactly
  selected   reference, plus one of the K configurations per step from each bit stratum and the initial ILP budgets
             over [2.25, 4.5] bits (where the targets are)
  defaults   the product's current defaults (selected, with 6 segments so that selection selects)
  projq-shared  defaults with adapter.init = projq-shared (B, A from the initial pool's shared whitened-error
             subspace, θ fitted to each configuration's correction by 300 Adam steps; docs/projq.md), so unanchored
             (reference none).
             Its baselines start from the same init; its CoA-LoRA is also compared with the defaults' CoA-LoRA on
             the targets (the same configurations: the ILP solves them from the same seed's cost table)
  projq-shared-no-prefit  projq-shared with θ left at its initial M ≈ I (adapter.prefit_steps = 0): the same B, A
             start, without the fitted per-configuration corrections
Each finished run's rows are written to ``<out>/runs.jsonl`` at once; a rerun skips what is there, so a run cut
short is continued. Reported per variant and configuration kind (targets, unseen): the mean paired difference in
accuracy (percentage points) of CoA-LoRA vs each other method over seeds × configurations, with a 95% interval
across seeds (Student t on the per-seed means; with 3 seeds the interval is wide, and it says so) and, per seed, the
95% interval over its validation examples from the run's paired differences (final/paired.json: what the draw of
examples allows, not training noise). The last line is one JSON object.

    .venv/bin/python bench/theta.py --seeds 0 1 2 --out /tmp/theta
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from orchestrator.loop.paired import across_seeds  # noqa: E402

BASE: dict[str, Any] = {
    "model": {"name": "minilm", "task": "classification"},
    "data": {"dataset": "reviews", "max_length": 48, "train_examples": 2048, "val_examples": 1000,
             "score_examples": 128, "batch_size": 32},
    "adapter": {"rank": 8, "alpha": 16},
    "training": {"steps_per_round": 30, "configs_per_step": 2, "lr": 0.003, "warmup_steps": 5},
    "search": {"rounds": 2, "initial_budgets": 12, "proposals_per_round": 4, "fisher_examples": 16,
               "cost_sample": 16384},
    "evaluation": {"targets": [2.5, 3.0, 3.5, 4.0], "unseen": 8,
                   "baselines": ["no_adapter", "shared_lora", "no_theta"]},
    "cluster": {"executor": "ray", "workers": 2, "cpus_per_worker": 1},
}
BEFORE = ["training.encoder_lr=null", "adapter.reference=none", "training.config_sampling=uniform",
          "search.budget_max=7.25", "search.segments=40"]
"""coalora's defaults before issue 12; each variant states every one of these fields, so it does not drift with
the product's defaults."""
VARIANTS: dict[str, list[str]] = {
    "baseline": BEFORE,
    "theta-lr": [*BEFORE, "training.encoder_lr=0.00015"],
    "reference": [*BEFORE, "training.encoder_lr=0.00015", "adapter.reference=most_precise"],
    "selected": [*BEFORE, "training.encoder_lr=0.00015", "adapter.reference=most_precise",
                 "training.config_sampling=stratified", "search.budget_max=4.5"],
    "defaults": [],  # the product's defaults as they are now
    "projq-shared": ["adapter.init=projq-shared", "adapter.reference=none", "adapter.prefit_steps=300"],
    "projq-shared-no-prefit": ["adapter.init=projq-shared", "adapter.reference=none", "adapter.prefit_steps=0"],
}
OTHERS = ("coa-no-theta", "shared-lora", "no-adapter")
POOLED = {"target": "all targets", "unseen": "all unseen"}
"""The pooled rows' names in a run's final/paired.json, by configuration kind."""


def run_one(variant: str, seed: int, out: Path) -> dict[str, Any]:
    from orchestrator.config import build_config
    from orchestrator.runs import start_run
    from orchestrator.state import Ledger

    name = f"{variant}-seed{seed}"
    config = {**BASE, "run": {"name": name, "root": str(out / "runs"), "seed": seed},
              "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "coalora-bench-theta"}}
    started = time.perf_counter()
    run_dir, rows = start_run(build_config(config, VARIANTS[variant]), progress=False)
    init = [e for e in Ledger(run_dir / "ledger.jsonl").entries() if e["kind"] == "init"]
    return {"variant": variant, "seed": seed, "minutes": (time.perf_counter() - started) / 60, "rows": rows,
            "init": init[0] if init else None,
            "paired": json.loads((run_dir / "final" / "paired.json").read_text())}


def paired(records: list[dict[str, Any]], kind: str, other: str) -> dict[str, Any]:
    """CoA-LoRA − ``other`` in accuracy points on the configurations of ``kind``: mean, per-seed means, 95% CI
    across seeds, and each seed's 95% interval over its validation examples (the run's final/paired.json) where the
    run recorded one."""
    per_seed, per_example = [], []
    for rec in records:
        by = {(r["method"], r["configuration"]): r["accuracy"] for r in rec["rows"]}
        diffs = [100 * (acc - by[(other, c)]) for (m, c), acc in by.items()
                 if m == "coa-lora" and c.startswith(kind) and (other, c) in by]
        per_seed.append(statistics.fmean(diffs))
        pooled = [d for d in rec.get("paired") or [] if d["other"] == other and d["configuration"] == POOLED[kind]]
        if pooled:
            per_example.append([round(100 * x, 2) for x in pooled[0]["ci95"]])
    return {**over_seeds(per_seed), "per_seed_example_ci95": per_example or None}


def over_seeds(per_seed: list[float]) -> dict[str, Any]:
    """Mean of per-seed differences with a Student-t 95% interval across seeds (none from one seed), rounded."""
    a = across_seeds(per_seed)
    return {"mean": round(a["difference"], 2), "ci95": a["ci95"] and [round(x, 2) for x in a["ci95"]],
            "per_seed": [round(x, 2) for x in per_seed]}


def across(records: list[dict[str, Any]], others: list[dict[str, Any]]) -> dict[str, Any] | None:
    """CoA-LoRA of ``records`` − CoA-LoRA of ``others`` (another variant) in accuracy points on the targets, paired
    by seed and target; None without a shared seed."""
    per_seed = []
    for rec in records:
        twin = [o for o in others if o["seed"] == rec["seed"]]
        if not twin:
            continue
        mine, theirs = ({r["configuration"]: r["accuracy"] for r in x["rows"]
                         if r["method"] == "coa-lora" and r["configuration"].startswith("target")}
                        for x in (rec, twin[0]))
        per_seed.append(statistics.fmean(100 * (mine[c] - theirs[c]) for c in mine))
    return over_seeds(per_seed) if per_seed else None


def mean_accuracy(records: list[dict[str, Any]], method: str, kind: str) -> float:
    """Accuracy (percent) of ``method`` averaged over the configurations of ``kind`` and over seeds."""
    return 100 * statistics.fmean(
        statistics.fmean(r["accuracy"] for r in rec["rows"] if r["method"] == method and r["configuration"].startswith(kind))
        for rec in records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("bench-out/theta"))
    ap.add_argument("--report", action="store_true", help="summarise the finished runs in --out; run nothing")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for seed in args.seeds:  # every variant at one seed first: a run cut short still compares them
        for variant in args.variants:
            if args.report or any(d["variant"] == variant and d["seed"] == seed for d in done):
                continue
            record = run_one(variant, seed, args.out)
            with log.open("a") as fh:  # one line per finished run: a rerun continues from here
                fh.write(json.dumps(record) + "\n")
            done.append(record)
            print(f"{variant} seed {seed}: {record['minutes']:.1f} min", flush=True)
    summary: dict[str, Any] = {}
    for variant in args.variants:
        records = [d for d in done if d["variant"] == variant and d["seed"] in args.seeds]
        if not records:
            continue
        summary[variant] = {kind: {other: paired(records, kind, other) for other in OTHERS}
                            for kind in ("target", "unseen")}
        for kind in ("target", "unseen"):
            for other in OTHERS:
                p = summary[variant][kind][other]
                ci = "n/a (one seed)" if p["ci95"] is None else f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
                print(f"{variant:10s} {kind:6s} coa-lora − {other:12s} {p['mean']:+6.2f} points, 95% CI {ci}, "
                      f"per seed {p['per_seed']}, over each seed's examples {p['per_seed_example_ci95']}")
    defaults = [d for d in done if d["variant"] == "defaults" and d["seed"] in args.seeds]
    for variant in summary:
        records = [d for d in done if d["variant"] == variant and d["seed"] in args.seeds]
        if variant != "defaults" and (vs := across(records, defaults)) is not None:
            summary[variant]["coa_vs_defaults_coa"] = vs
            print(f"{variant:10s} target coa-lora − defaults' coa-lora {vs['mean']:+6.2f} points, per seed "
                  f"{vs['per_seed']}")
        inits = [d["init"] for d in records if d.get("init")]
        if inits:
            summary[variant]["init"] = {k: round(statistics.fmean(i[k] for i in inits), 4)
                                        for k in inits[0] if k.startswith("init_error")}
            print(f"{variant:10s} step-0 compensation error (relative to zero-B): {summary[variant]['init']}")
    means = {}
    for variant in summary:
        records = [d for d in done if d["variant"] == variant and d["seed"] in args.seeds]
        means[variant] = {m: round(mean_accuracy(records, m, "target"), 2) for m in ("coa-lora", *OTHERS)}
        print(f"{variant:10s} accuracy over targets and seeds: "
              + ", ".join(f"{m} {a:.2f}" for m, a in means[variant].items()))
    print(json.dumps({"seeds": args.seeds, "paired_accuracy_points": summary, "target_accuracy": means}))


if __name__ == "__main__":
    main()
