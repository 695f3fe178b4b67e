"""The paper's claims, measured at CPU scale: one CoA-LoRA run vs per-configuration fine-tuning (issue #7).

One invocation runs, for every job of a YAML file in ``conf/bench/`` (``--quick``: ``conf/bench/quick.yaml``,
MiniLM + review snippets; default: ``conf/bench/full.yaml``, that job at a larger scale plus SmolLM2-135M +
Shakespeare):

- **CoA-LoRA once**, through the real product path (``orchestrator.runs.start_run``: Fisher cost table → ILP
  initial pool → rounds of training + BoTorch search → final evaluation), with ``evaluation.baselines =
  [no_adapter, shared_lora]`` so the driver also trains **Shared-LoRA** once (one plain LoRA, one target
  configuration drawn per step) and reports the quantized base without adapters as a reference;
- **QLoRA** (plain LoRA, B = 0) and **LQ-LoRA** (faithful LQ init: T <= 100, best iterate, randomized SVD,
  Fisher-weighted by default; ``bench.lq_lora_lr`` gives its SVD-initialised LoRA factors their own learning rate,
  as LQ-LoRA's recipe does, while its task head keeps the shared one)
  **once per target configuration**, on exactly the ILP configurations the driver
  evaluated (read back from the run's ledger), plus QLoRA on the first ``bench.qlora_unseen`` unseen
  configurations to show what per-configuration training buys there.

Fairness: every baseline configuration is trained for as many optimizer steps as CoA-LoRA's whole run
(``search.rounds x training.steps_per_round``), with the same learning rate, schedule, weight decay, clipping,
batch size, rank, data order (the driver's seeded epoch permutations) and the same worker code computing the
gradients; it is evaluated on the same validation batches. That is the strongest fair per-configuration baseline:
each baseline adapter sees as many batches as the single CoA-LoRA model does in total (CoA-LoRA's K configurations
per step share one batch).

Targets: ``evaluation.targets`` (2.5 / 3.0 / 3.5 / 4.0 bits): the ILP configuration at each budget, identical for
every method. Unseen: ``evaluation.unseen`` (20) seeded random configurations between 2.5 and 6 bits, never in
CoA-LoRA's pool; CoA-LoRA and Shared-LoRA are evaluated on them without retraining.

Wall time per method is the time to produce its adapter(s) for everything it serves (evaluation excluded):
CoA-LoRA = model load + cost table + ILP + rounds of training and search; Shared-LoRA = its training; QLoRA /
LQ-LoRA = the sum over the four targets of (LQ init +) training. The cost table that yields the ILP configurations
is charged to CoA-LoRA only (the baselines reuse it for free), which favours the baselines.

Hypervolume: of each method's (average bits, metric) points, both normalised with a fixed reference that does not
depend on the data: bits over the space's range [2.0322, 8.625]; accuracy over [hv_reference (0.5 = chance), 1]
(as the error 1 − accuracy); perplexity as log(ppl) over [0, log(hv_reference)]. 1 is the best possible value.

Reproducibility: every random choice is seeded (run.seed) and torch runs one thread per process, so two runs of
``--quick`` on the same machine and torch build give identical metrics (tolerance 0; checked by
tests/bench/test_accuracy.py on a tiny model). Across machines / BLAS builds allow one validation example of
accuracy (1 / val_examples) or 1e-3 relative perplexity. Wall times are not reproducible (shared machine).

Outputs (``--out``, default ``docs/`` for the full mode and ``docs/quick/`` for ``--quick``): ``results.md``; ``results/accuracy-<job>.png`` (metric vs average bits per
method); ``results/accuracy.json`` (every row, timings, hypervolumes, the resolved configurations);
``results/work/`` (the product run directories and, unless a tracking URI is given, the MLflow SQLite store).
MLflow: one parent run (experiment ``coalora-bench``) with one nested run per method (per job and method when the
file has several jobs); the product runs themselves go to experiment ``coalora-bench-product``. The last stdout
line is one JSON object with the headline figures.

    .venv/bin/python bench/accuracy.py --quick                    # job (a), < 15 min on 2 CPU cores
    .venv/bin/python bench/accuracy.py                            # full: (a) larger, and (b) SmolLM2 + Shakespeare
    .venv/bin/python bench/accuracy.py --quick --override data.train_examples=256 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from orchestrator import report  # noqa: E402
from orchestrator.config import ConfigError, RunConfig, build_config  # noqa: E402
from orchestrator.driver import Driver  # noqa: E402
from orchestrator.finish import Finish  # noqa: E402
from orchestrator.schedule import batch_ids, unkey  # noqa: E402
from orchestrator.executor import init_ray  # noqa: E402
from orchestrator.optim import MasterState, train_config, weighted_mean  # noqa: E402
from orchestrator.runs import start_run, worker_spec  # noqa: E402
from orchestrator.state import Ledger, write_json_atomic  # noqa: E402
from orchestrator.tracking import Tracker  # noqa: E402
from search.hypervolume import normalized_hypervolume  # noqa: E402
from workers.baselines import lq_lora  # noqa: E402
from workers.fisher import layer_fisher  # noqa: E402
from workers.training import TrainConfig  # noqa: E402
from workers.worker import Worker, build_task  # noqa: E402

BENCH_DIR = ROOT / "conf" / "bench"
METHODS = ("coa-lora", "qlora", "lq-lora", "shared-lora", "no-adapter")
DRIVER_METHODS = ("coa-lora", "shared-lora", "no-adapter")
BENCH_EXPERIMENT = "coalora-bench"
PRODUCT_EXPERIMENT = "coalora-bench-product"
TOLERANCE = "0 (identical) on the same machine and torch build; across machines 1/val_examples accuracy, 1e-3 relative perplexity"
BENCH_DEFAULTS = {"qlora_unseen": 4, "lq_iterations": 100, "lq_fisher": True, "lq_lora_lr": None, "hv_reference": None}


# ---- configuration --------------------------------------------------------------------------------------------------
def load_bench(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise ConfigError(f"{path}: needs a non-empty 'jobs' list")
    names = [j.get("name") for j in jobs]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"{path}: every job needs a unique 'name', got {names}")
    for j in jobs:
        unknown = set(j.get("bench", {})) - set(BENCH_DEFAULTS)
        if unknown:
            raise ConfigError(f"{path}: job {j['name']}: unknown bench option(s) {sorted(unknown)}; allowed {list(BENCH_DEFAULTS)}")
    return data


def job_config(job: Mapping[str, Any], overrides: Sequence[str], work: Path, uri: str) -> tuple[RunConfig, dict[str, Any]]:
    """The product run configuration of one job (validated), with the bench's fixed parts forced."""
    run = copy.deepcopy(dict(job.get("run", {})))
    forced = {
        "run": {"name": str(job["name"]), "root": str(work / "runs")},
        "evaluation": {"baselines": ["no_adapter", "shared_lora"]},
        "tracking": {"uri": uri, "experiment": PRODUCT_EXPERIMENT},
    }
    for section, values in forced.items():
        run.setdefault(section, {}).update(values)
    run.setdefault("cluster", {}).setdefault("executor", "local")
    cfg = build_config(run, overrides)
    # overrides may not undo the forced parts
    cfg = build_config(cfg.model_dump(mode="json"), [f"{s}.{k}={json.dumps(v)}" for s, d in forced.items() for k, v in d.items()])
    opts = {**BENCH_DEFAULTS, **job.get("bench", {})}
    if opts["hv_reference"] is None:
        opts["hv_reference"] = 0.5 if cfg.model.task == "classification" else 1000.0
    return cfg, opts


# ---- timing of the product run's phases -----------------------------------------------------------------------------
@contextlib.contextmanager
def timed_driver(times: dict[str, float]) -> Iterator[None]:
    """Measure the driver's Shared-LoRA training and final evaluation (the driver does not time itself). The wrapped
    methods are called unchanged; only their durations are recorded."""
    originals = {"_train_shared": (Finish, Finish.train_shared), "final_evaluation": (Driver, Driver.final_evaluation)}

    def wrap(name: str):
        fn = originals[name][1]

        def inner(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0

        return inner

    for name, (owner, fn) in originals.items():
        setattr(owner, fn.__name__, wrap(name))
    try:
        yield
    finally:
        for owner, fn in originals.values():
            setattr(owner, fn.__name__, fn)


def evaluated_configurations(run_dir: Path) -> list[tuple[str, np.ndarray]]:
    """(name, encoding) of every configuration the driver evaluated, in its order (from the ledger)."""
    out, seen = [], set()
    for e in Ledger(run_dir / "ledger.jsonl").entries():
        if e["kind"] == "final" and e["method"] == "coa-lora" and e["configuration"] not in seen:
            seen.add(e["configuration"])
            out.append((e["configuration"], unkey(e["config"])))
    return out


# ---- per-configuration baselines -------------------------------------------------------------------------------------
class Baselines:
    """QLoRA and LQ-LoRA on one worker built from the run's own spec: same data, same validation batches, same
    gradient code, same optimizer and data order as the driver's Shared-LoRA loop."""

    def __init__(self, cfg: RunConfig, opts: Mapping[str, Any]):
        self.cfg, self.opts = cfg, opts
        self.spec = worker_spec(cfg)
        self.worker = Worker(self.spec)  # holds "main" and "shared" (plain LoRA, B = 0: the QLoRA starting point)
        self.train_config = train_config(cfg, configs_per_step=1)
        self.total_steps = self.train_config.total_steps
        self._base = None
        self._fisher = None
        self._qlora_init = self.worker.initial_state("shared")  # before any evaluate() loads a trained state
        self._fisher_weights()  # likewise: the Fisher of the untrained model, as the worker's cost table uses

    def _train(self, method: str, init: Mapping[str, torch.Tensor], x: np.ndarray,
               config: TrainConfig | None = None) -> dict[str, torch.Tensor]:
        """``total_steps`` AdamW steps on configuration ``x`` alone from ``init``; the driver's batch order."""
        w, cfg = self.worker, self.cfg
        master = MasterState(init, w.models[method].no_decay_names(), config or self.train_config)
        for step in range(self.total_steps):
            ids = batch_ids(cfg.run.seed, w.n_train(), cfg.data.batch_size, step)
            _, grads, _ = weighted_mean([w.gradients(method, master.state(), ids, [x])])
            master.step(grads)
        return master.state()

    def qlora(self, x: np.ndarray) -> tuple[dict[str, float], float]:
        t0 = time.perf_counter()
        state = self._train("shared", self._qlora_init, x)
        seconds = time.perf_counter() - t0
        return self.worker.evaluate("shared", state, x), seconds

    def _fisher_weights(self) -> dict[str, torch.Tensor] | None:
        if not self.opts["lq_fisher"]:
            return None
        if self._fisher is None:  # the same estimate the worker's cost table uses (quantization-free model)
            w = self.worker
            single = [w.collate([item]) for item in w.train_items[: self.spec.fisher_examples]]
            model = w.models["shared"]
            with model.adapters_disabled():
                model.set_configuration(None)
                self._fisher = layer_fisher(model, single, self.spec.fisher_examples)
        return self._fisher

    def lq_lora(self, x: np.ndarray) -> tuple[dict[str, float], float]:
        fisher = self._fisher_weights()
        t0 = time.perf_counter()
        if self._base is None:  # a fresh, unwrapped copy of the base, built exactly as the worker built its own
            torch.manual_seed(self.spec.seed)
            self._base = build_task(self.spec).model
        model = lq_lora(copy.deepcopy(self._base), self.worker.space, self.worker.space.decode(x),
                        rank=self.spec.rank, alpha=self.spec.alpha, iterations=int(self.opts["lq_iterations"]),
                        fisher=fisher, seed=self.spec.seed)
        model.eval()
        self.worker.models["lq"] = model
        try:
            lr = self.opts.get("lq_lora_lr")
            config = None if lr is None else replace(self.train_config, lora_lr=float(lr))
            state = self._train("lq", model.trainable_state(), x, config)
            seconds = time.perf_counter() - t0
            return self.worker.evaluate("lq", state, x), seconds
        finally:
            del self.worker.models["lq"]


class BaselineReplica:
    """One process's :class:`Baselines`; ``run`` trains and evaluates one (method, configuration) pair and returns
    (metrics, training seconds, evaluation seconds)."""

    def __init__(self, cfg_json: Mapping[str, Any], opts: Mapping[str, Any]):
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        self.baselines = Baselines(RunConfig.model_validate(cfg_json), opts)

    def run(self, method: str, x: np.ndarray) -> tuple[dict[str, float], float, float]:
        t0 = time.perf_counter()
        metrics, seconds = self.baselines.qlora(x) if method == "qlora" else self.baselines.lq_lora(x)
        return metrics, seconds, time.perf_counter() - t0 - seconds


def run_baselines(cfg: RunConfig, opts: Mapping[str, Any], calls: Sequence[tuple[str, str, np.ndarray]],
                  log) -> list[tuple[dict[str, float], float, float]]:
    """Every per-configuration training, in ``calls`` order. With ``cluster.executor = ray`` they spread over
    ``cluster.workers`` Ray actors (``cpus_per_worker`` CPUs each, the same processes budget as the CoA-LoRA run);
    else they run here one after another. Each training is a pure function of (method, configuration): seeded data
    order and initialisation, fixed base; so the numbers do not depend on where or with how many replicas it ran."""
    if cfg.cluster.executor == "local" or cfg.cluster.workers == 1:
        replica = BaselineReplica(cfg.model_dump(mode="json"), opts)
        out = []
        for method, cname, x in calls:
            log(f"[{cfg.run.name}] {method} on {cname}")
            out.append(replica.run(method, x))
        return out
    import ray

    if __name__ != "__main__":  # imported (not run as a script): ship this module's classes by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    init_ray(cfg.cluster.address, None)  # started by the CoA-LoRA run already unless it ran in-process
    actor = ray.remote(num_cpus=cfg.cluster.cpus_per_worker, num_gpus=cfg.cluster.gpus_per_worker)(BaselineReplica)
    replicas = [actor.remote(cfg.model_dump(mode="json"), dict(opts)) for _ in range(cfg.cluster.workers)]
    try:
        refs = [replicas[i % len(replicas)].run.remote(method, x) for i, (method, _, x) in enumerate(calls)]
        out = []
        for (method, cname, _), ref in zip(calls, refs):
            out.append(ray.get(ref))
            log(f"[{cfg.run.name}] {method} on {cname}: done")
        return out
    finally:
        for r in replicas:
            ray.kill(r)


# ---- one job -----------------------------------------------------------------------------------------------------------
def run_job(job: Mapping[str, Any], overrides: Sequence[str], work: Path, uri: str, log) -> dict[str, Any]:
    cfg, opts = job_config(job, overrides, work, uri)
    name = cfg.run.name
    torch.set_num_threads(1)
    times: dict[str, float] = {}
    log(f"[{name}] CoA-LoRA run (product path: start_run, {cfg.search.rounds} rounds x "
        f"{cfg.training.steps_per_round} steps, K = {cfg.training.configs_per_step}) + Shared-LoRA + no-adapter")
    t0 = time.perf_counter()
    with timed_driver(times):
        run_dir, driver_rows = start_run(cfg, progress=False)
    run_s = time.perf_counter() - t0
    final_s, shared_s = times.get("final_evaluation", 0.0), times.get("_train_shared", 0.0)
    minutes = {"coa-lora": (run_s - final_s) / 60, "shared-lora": shared_s / 60, "no-adapter": 0.0}
    eval_minutes = {"driver (coa-lora, shared-lora, no-adapter)": (final_s - shared_s) / 60}

    configs = evaluated_configurations(run_dir)
    targets = [(n, x) for n, x in configs if n.startswith("target")]
    unseen = [(n, x) for n, x in configs if n.startswith("unseen")]
    bits_of = {r["configuration"]: r["avg_bits"] for r in driver_rows}
    rows = [dict(r) for r in driver_rows]

    per_config = [("qlora", n, x) for n, x in targets] + [("lq-lora", n, x) for n, x in targets]
    per_config += [("qlora", n, x) for n, x in unseen[: int(opts["qlora_unseen"])]]
    steps = train_config(cfg).total_steps
    log(f"[{name}] {len(per_config)} per-configuration trainings of {steps} steps each "
        f"(qlora / lq-lora on {len(targets)} targets, qlora on {len(per_config) - 2 * len(targets)} unseen)")
    train_s = {"qlora": 0.0, "lq-lora": 0.0, "qlora (unseen)": 0.0}
    eval_s = 0.0
    for (method, cname, _), (metrics, seconds, evaluation) in zip(per_config, run_baselines(cfg, opts, per_config, log)):
        eval_s += evaluation
        train_s[method if cname.startswith("target") else "qlora (unseen)"] += seconds
        rows.append({"method": method, "configuration": cname, "avg_bits": bits_of[cname], **metrics})
    minutes.update({k: v / 60 for k, v in train_s.items()})
    eval_minutes["baselines (qlora, lq-lora)"] = eval_s / 60
    return summarize(cfg, opts, rows, minutes, eval_minutes, run_dir, steps, configs)


def _hv(points: Sequence[tuple[float, float]], metric: str, ref: float, bits_range: tuple[float, float]) -> float:
    if not points:
        return float("nan")
    bits = np.asarray([p[0] for p in points])
    vals = np.asarray([p[1] for p in points], dtype=np.float64)
    if metric == "accuracy":
        return normalized_hypervolume(bits, 1.0 - vals, bits_range, (0.0, 1.0 - ref))
    return normalized_hypervolume(bits, np.log(np.maximum(vals, 1.0)), bits_range, (0.0, math.log(ref)))


def summarize(cfg: RunConfig, opts: Mapping[str, Any], rows: list[dict[str, Any]], minutes: dict[str, float],
              eval_minutes: dict[str, float], run_dir: Path, steps: int, configs) -> dict[str, Any]:
    metric = "accuracy" if cfg.model.task == "classification" else "perplexity"
    bits_range = cfg.load_space().bits_range
    target_names = [f"target {t:g}" for t in cfg.evaluation.targets]
    unseen_names = [n for n, _ in configs if n.startswith("unseen")]
    qlora_unseen = [r["configuration"] for r in rows if r["method"] == "qlora" and r["configuration"].startswith("unseen")]
    by = {(r["method"], r["configuration"]): r for r in rows}

    def mean(method: str, names: Sequence[str]) -> float:
        """Arithmetic for accuracy; geometric for perplexity (exp of the mean loss), so one collapsed
        configuration (perplexity 1e9 at 2.5 bits) does not swamp the others."""
        vals = np.asarray([by[(method, n)][metric] for n in names if (method, n) in by], dtype=np.float64)
        if not vals.size:
            return float("nan")
        return float(np.mean(vals)) if metric == "accuracy" else float(np.exp(np.mean(np.log(vals))))

    mean_target = {m: mean(m, target_names) for m in METHODS}
    unseen_mean = {m: mean(m, unseen_names) for m in DRIVER_METHODS}
    unseen_q = {m: mean(m, qlora_unseen) for m in ("coa-lora", "shared-lora", "qlora", "no-adapter")}
    ref = float(opts["hv_reference"])
    hv_targets = {m: _hv([(by[(m, n)]["avg_bits"], by[(m, n)][metric]) for n in target_names if (m, n) in by],
                         metric, ref, bits_range) for m in METHODS}
    hv_all = {m: _hv([(r["avg_bits"], r[metric]) for r in rows if r["method"] == m], metric, ref, bits_range)
              for m in DRIVER_METHODS}
    sign = 1.0 if metric == "accuracy" else -1.0  # gap > 0: CoA-LoRA is better
    wins = {b: sum(sign * (by[("coa-lora", n)][metric] - by[(b, n)][metric]) > 0 for n in target_names)
            for b in ("qlora", "lq-lora", "shared-lora")}
    return {
        "job": cfg.run.name, "model": cfg.model.name, "task": cfg.model.task, "dataset": cfg.data.dataset,
        "metric": metric, "higher_is_better": metric == "accuracy", "baseline_steps_per_configuration": steps,
        "coa_steps": steps, "coa_configs_per_step": cfg.training.configs_per_step,
        "targets": target_names, "unseen": unseen_names, "qlora_unseen": qlora_unseen,
        "mean_target": mean_target, "unseen_mean": unseen_mean, "unseen_qlora_subset_mean": unseen_q,
        "gap_coa_minus_qlora": mean_target["coa-lora"] - mean_target["qlora"],
        "gap_coa_minus_lq_lora": mean_target["coa-lora"] - mean_target["lq-lora"],
        "gap_coa_minus_shared_lora": mean_target["coa-lora"] - mean_target["shared-lora"],
        "coa_wins_on_targets": wins,
        "hv_reference": {"bits": list(bits_range), metric: ref}, "hypervolume_targets": hv_targets,
        "hypervolume_all_evaluated": hv_all, "minutes": minutes, "evaluation_minutes": eval_minutes,
        "served_configurations": {"coa-lora": "any", "shared-lora": "any (one adapter)", "qlora": len(target_names),
                                  "lq-lora": len(target_names), "no-adapter": "any"},
        "rows": rows, "run_dir": str(run_dir), "config": cfg.model_dump(mode="json"), "bench_options": dict(opts),
        "configurations": {n: x.tolist() for n, x in configs},
    }


# ---- outputs -----------------------------------------------------------------------------------------------------------
def plot(result: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, rows = result["metric"], result["rows"]
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=110)
    styles = {"coa-lora": ("C3", "o"), "qlora": ("C0", "s"), "lq-lora": ("C2", "^"), "shared-lora": ("C1", "D"),
              "no-adapter": ("0.5", "v")}
    for m, (color, marker) in styles.items():
        t = sorted((r["avg_bits"], r[metric]) for r in rows if r["method"] == m and r["configuration"].startswith("target"))
        u = [(r["avg_bits"], r[metric]) for r in rows if r["method"] == m and r["configuration"].startswith("unseen")]
        if t:
            ax.plot(*zip(*t), marker=marker, color=color, lw=1.5, ms=6, label=f"{m} (targets)")
        if u:
            ax.scatter(*zip(*u), marker=marker, facecolors="none", edgecolors=color, s=28, label=f"{m} (unseen)")
    ax.set_xlabel("average bits per weight (target matrices)")
    ax.set_ylabel(metric + (" (higher is better)" if metric == "accuracy" else " (lower is better)"))
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(f"{result['job']}: {metric} vs average bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _f(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def job_markdown(r: Mapping[str, Any], png_rel: str) -> str:
    metric, by = r["metric"], {(x["method"], x["configuration"]): x for x in r["rows"]}
    tnames = r["targets"]
    better = "higher" if r["higher_is_better"] else "lower"
    out = [f"## {r['job']}: {r['model']} + {r['dataset']} ({metric}, {better} is better)", ""]
    head = ["method"] + [f"{n.split()[1]} bits" for n in tnames] + ["mean", "HV (targets)", "train min", "served"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        cells = [m] + [_f(by[(m, n)][metric]) if (m, n) in by else "–" for n in tnames]
        cells += [_f(r["mean_target"][m]), _f(r["hypervolume_targets"][m]), _f(r["minutes"][m], 2),
                  str(r["served_configurations"][m])]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Average bits of the target configurations (the ILP allocation at each budget, identical for every "
            "method): " + ", ".join(f"{n.split()[1]} → {by[('coa-lora', n)]['avg_bits']:.3f}" for n in tnames) + ".", ""]
    gaps = (f"Gap CoA-LoRA − QLoRA (mean over targets): **{r['gap_coa_minus_qlora']:+.4f}**; − LQ-LoRA: "
            f"{r['gap_coa_minus_lq_lora']:+.4f}; − Shared-LoRA: {r['gap_coa_minus_shared_lora']:+.4f}. "
            f"CoA-LoRA is better on {r['coa_wins_on_targets']['qlora']}/{len(tnames)} targets vs QLoRA, "
            f"{r['coa_wins_on_targets']['lq-lora']}/{len(tnames)} vs LQ-LoRA, "
            f"{r['coa_wins_on_targets']['shared-lora']}/{len(tnames)} vs Shared-LoRA.")
    if not r["higher_is_better"]:
        gaps += (" (Perplexity: means are geometric means, exp of the mean log-perplexity; a negative gap means "
                 "CoA-LoRA is better.)")
    out += [gaps, ""]
    if r["higher_is_better"]:
        n_val = r["config"]["data"]["val_examples"]
        p = min(max(r["mean_target"]["coa-lora"], 0.01), 0.99)
        se = math.sqrt(p * (1 - p) / n_val)
        out += [f"Resolution: {n_val} validation examples, so one example = {1 / n_val:.4f} and the binomial standard "
                f"error of one accuracy is ≈ {se:.3f}: a difference between two methods at one configuration below ≈ "
                f"{2 * math.sqrt(2) * se:.3f}, or between two means over the four targets below ≈ "
                f"{math.sqrt(2) * se:.3f} (two standard errors, unpaired), is within noise. The no-adapter model keeps the untrained "
                "classification head, so it predicts one class.", ""]
    flat = [m for m in ("qlora", "lq-lora", "shared-lora", "coa-lora")
            if abs(r["mean_target"][m] - r["mean_target"]["no-adapter"]) < 1e-9 + (1 / r["config"]["data"]["val_examples"]
                                                                               if r["higher_is_better"] else 0)]
    if flat:
        out += [f"**Did not learn:** {', '.join(flat)} ended at the no-adapter level at this learning rate (same lr for "
                "every method by design; see `bench.lq_lora_lr` to give LQ-LoRA's factors their own).", ""]
    out += [f"### Unseen configurations ({len(r['unseen'])}, seeded, 2.5–6 bits, never trained on)", ""]
    out += ["| method | mean over all unseen | mean over the " + str(len(r["qlora_unseen"])) + " QLoRA-trained unseen | HV (targets + unseen) |",
            "|---|---|---|---|"]
    for m in ("coa-lora", "shared-lora", "no-adapter", "qlora"):
        all_u = r["unseen_mean"].get(m, float("nan"))
        out.append(f"| {m} | {_f(all_u) if m != 'qlora' else '– (needs retraining per configuration)'} | "
                   f"{_f(r['unseen_qlora_subset_mean'][m])} | {_f(r['hypervolume_all_evaluated'].get(m, float('nan')))} |")
    out += ["", "Per unseen configuration:", ""]
    head = ["configuration", "avg bits", "coa-lora", "shared-lora", "no-adapter", "qlora (trained on it)"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in r["unseen"]:
        cells = [n, _f(by[("coa-lora", n)]["avg_bits"], 3)]
        cells += [_f(by[(m, n)][metric]) if (m, n) in by else "–" for m in ("coa-lora", "shared-lora", "no-adapter", "qlora")]
        out.append("| " + " | ".join(cells) + " |")
    ev = "; ".join(f"{k}: {v:.2f} min" for k, v in r["evaluation_minutes"].items())
    out += ["", "### Wall time (minutes, training only; evaluation excluded)", "",
            "| method | minutes | what it covers |", "|---|---|---|",
            f"| coa-lora | {r['minutes']['coa-lora']:.2f} | model load, Fisher cost table, ILP pool, "
            f"{r['coa_steps']} steps x K = {r['coa_configs_per_step']}, search; serves any configuration |",
            f"| shared-lora | {r['minutes']['shared-lora']:.2f} | {r['coa_steps']} steps, one target drawn per step |",
            f"| qlora | {r['minutes']['qlora']:.2f} | {len(tnames)} x {r['baseline_steps_per_configuration']} steps "
            f"(targets only) |",
            f"| lq-lora | {r['minutes']['lq-lora']:.2f} | {len(tnames)} x (LQ init + "
            f"{r['baseline_steps_per_configuration']} steps) |",
            f"| qlora (unseen) | {r['minutes']['qlora (unseen)']:.2f} | {len(r['qlora_unseen'])} x "
            f"{r['baseline_steps_per_configuration']} steps |",
            "", f"Evaluation time: {ev}.", "", f"![{metric} vs average bits]({png_rel})", ""]
    return "\n".join(out)


def write_markdown(results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], path: Path, pngs: Sequence[str]) -> None:
    r0 = results[0]
    c = r0["config"]
    lines = [
        f"# CoA-LoRA vs per-configuration fine-tuning at CPU scale ({meta['mode']} mode)", "",
        f"Produced by `{meta['command']}` on {meta['machine']}, {meta['date']} "
        f"(total {meta['total_minutes']:.1f} min). Generated by `bench/accuracy.py`; do not edit by hand.", "",
        "**Protocol.** CoA-LoRA runs once through the product path (`orchestrator.runs.start_run`: Fisher cost table → "
        "ILP initial pool → rounds of training + BoTorch Pareto search); the same run trains Shared-LoRA once and "
        "evaluates the quantized base without adapters (no-adapter). QLoRA and LQ-LoRA (faithful LQ init: T ≤ "
        f"{r0['bench_options']['lq_iterations']}, best iterate, randomized SVD, Fisher weighting "
        f"{'on' if r0['bench_options']['lq_fisher'] else 'off'}) are trained once per target configuration. "
        "Every method is evaluated on the same configurations: the ILP allocation at each target budget "
        f"({', '.join(n.split()[1] for n in r0['targets'])} bits) and {len(r0['unseen'])} seeded unseen "
        "configurations between 2.5 and 6 bits (CoA-LoRA and Shared-LoRA without retraining; QLoRA retrained on "
        f"{len(r0['qlora_unseen'])} of them to show the gap).", "",
        "**Fairness: the strongest fair baseline.** Each QLoRA / LQ-LoRA configuration is trained for as many optimizer "
        "steps as CoA-LoRA's whole run (search.rounds × training.steps_per_round = "
        f"{r0['baseline_steps_per_configuration']} here), with the same learning rate, warmup + cosine schedule, weight "
        "decay, clipping, batch size, rank, data order and gradient code, and evaluated on the same validation "
        "batches. Per-configuration baselines therefore cost (number of targets) × CoA-LoRA's steps. The Fisher cost "
        "table that yields the ILP configurations is charged to CoA-LoRA only. One exception, in LQ-LoRA's favour: "
        "its SVD-initialised LoRA factors train at their own rate (`bench.lq_lora_lr`: "
        + ", ".join(f"{r['job']} {r['bench_options'].get('lq_lora_lr') or r['config']['training']['lr']:g}" for r in results)
        + "; its head at the shared rate), as its recipe does: at the shared rate it fell to the no-adapter level on "
        "MiniLM (measured, see conf/bench/quick.yaml).", "",
        "**Hypervolume.** Of each method's (average bits, metric) points with a fixed reference independent of the "
        f"data: bits normalised over the space's range [{r0['hv_reference']['bits'][0]:.4f}, "
        f"{r0['hv_reference']['bits'][1]:.4f}]; accuracy as the error 1 − acc over [0, 1 − acc_ref] with acc_ref = 0.5 "
        "(chance on the two-class task); perplexity as log(ppl) over [0, log(ppl_ref)] (ppl_ref in the job's "
        "`bench.hv_reference`). Both minimised, reference point (1, 1), best possible value 1. \"HV (targets)\" uses the "
        "four target points of every method, so it compares methods on identical configurations.", "",
        f"**Reproducibility.** Seeds fixed (run.seed = {c['run']['seed']}), one torch thread per process. The per-configuration baselines do not depend on the number of worker processes; the CoA-LoRA run does, through the float summation order of its gradient shards, so repeats must keep cluster.workers. Tolerance "
        f"between two runs of the same command: {TOLERANCE}. Wall times vary with the machine's other load."
        + (f" Checked: {meta['reproduced']}." if meta.get("reproduced") else ""), "",
        "**Settings.** " + ", ".join(f"{k} = {v}" for k, v in [
            ("train examples", c["data"]["train_examples"]), ("validation examples", c["data"]["val_examples"]),
            ("scoring examples", c["data"]["score_examples"]), ("batch", c["data"]["batch_size"]),
            ("max length", c["data"]["max_length"]), ("rank", c["adapter"]["rank"]), ("alpha", c["adapter"]["alpha"]),
            ("lr", c["training"]["lr"]), ("rounds", c["search"]["rounds"]),
            ("steps per round", c["training"]["steps_per_round"]), ("K", c["training"]["configs_per_step"]),
            ("initial budgets", c["search"]["initial_budgets"]), ("proposals per round", c["search"]["proposals_per_round"]),
        ]) + " (first job; every job's resolved configuration is in `results/accuracy.json`).", "",
    ]
    for r, png in zip(results, pngs):
        lines.append(job_markdown(r, png))
    if meta.get("notes"):
        lines += ["## Discussion", "", meta["notes"].strip(), ""]
    path.write_text("\n".join(lines) + "\n")


def headline(results: Sequence[Mapping[str, Any]], mode: str, total_minutes: float) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "accuracy", "mode": mode, "total_minutes": round(total_minutes, 2)}
    for r in results:
        out[r["job"]] = {
            "metric": r["metric"],
            "mean_target": {m: round(v, 4) for m, v in r["mean_target"].items()},
            "gap_coa_minus_qlora": round(r["gap_coa_minus_qlora"], 4),
            "gap_coa_minus_lq_lora": round(r["gap_coa_minus_lq_lora"], 4),
            "unseen_mean": {m: round(v, 4) for m, v in r["unseen_mean"].items()},
            "hv_targets": {m: round(v, 4) for m, v in r["hypervolume_targets"].items()},
            "minutes": {m: round(v, 2) for m, v in r["minutes"].items()},
        }
    return out


def log_mlflow(uri: str, results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], files: Sequence[Path]) -> str:
    stamp = meta["stamp"]
    tracker = Tracker(uri, BENCH_EXPERIMENT, run_key=f"bench-accuracy-{meta['mode']}-{stamp}",
                      run_name=f"bench accuracy ({meta['mode']})")
    client = tracker.client
    try:
        tracker.log_params_once({"mode": meta["mode"], "command": meta["command"], "machine": meta["machine"],
                                 "jobs": ",".join(r["job"] for r in results)})
        for r in results:
            prefix = "" if len(results) == 1 else f"{r['job']}."
            tracker.log_metrics({f"{prefix}gap_coa_minus_qlora": r["gap_coa_minus_qlora"],
                                 f"{prefix}gap_coa_minus_lq_lora": r["gap_coa_minus_lq_lora"]}, step=0)
            for m in METHODS:
                name = m if len(results) == 1 else f"{r['job']}/{m}"
                child = tracker.child(name)
                client.set_tag(child, "bench.job", r["job"])
                client.set_tag(child, "bench.method", m)
                metric = r["metric"]
                vals = {f"{n.replace(' ', '_')}.{metric}": x[metric] for n in r["targets"] + r["unseen"]
                        for x in r["rows"] if x["method"] == m and x["configuration"] == n}
                vals.update({f"mean_target_{metric}": r["mean_target"][m], "hypervolume_targets": r["hypervolume_targets"][m],
                             "train_minutes": r["minutes"][m]})
                if m in r["unseen_mean"]:
                    vals[f"mean_unseen_{metric}"] = r["unseen_mean"][m]
                    vals["hypervolume_all"] = r["hypervolume_all_evaluated"][m]
                tracker.log_metrics(vals, step=0, child=name)
                client.set_terminated(child)
        for f in files:
            tracker.log_artifact(f)
        tracker.finish()
    except BaseException:
        tracker.finish("FAILED")
        raise
    return tracker.parent_id


def _processes(results: Sequence[Mapping[str, Any]]) -> str:
    """How the jobs ran, for the report: in-process or on N Ray workers (from their resolved configurations)."""
    def one(cluster: Mapping[str, Any]) -> str:
        return "in one process" if cluster["executor"] == "local" else f"{cluster['workers']} Ray worker process(es)"
    return " / ".join(sorted({one(r["config"]["cluster"]) for r in results}))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="conf/bench/quick.yaml: MiniLM + reviews, < 15 min on 2 CPUs")
    ap.add_argument("--config", type=Path, help="bench YAML (default conf/bench/full.yaml, or quick.yaml with --quick)")
    ap.add_argument("--out", type=Path, help="output directory (default docs/, or docs/quick/ with --quick)")
    ap.add_argument("--tracking-uri", help="MLflow URI (default MLFLOW_TRACKING_URI, else sqlite under --out)")
    ap.add_argument("--override", action="append", default=[], metavar="section.key=value",
                    help="applied to every job's run configuration (repeatable)")
    ap.add_argument("--jobs", help="comma-separated job names to run (default: all of the file)")
    ap.add_argument("--render-only", type=Path, metavar="ACCURACY_JSON",
                    help="re-write results.md and the plots from a saved accuracy.json (no compute, no MLflow)")
    ap.add_argument("--notes", type=Path, metavar="MARKDOWN",
                    help="with --render-only: a hand-written discussion, kept in accuracy.json and rendered last")
    ap.add_argument("--reproduced", metavar="TEXT",
                    help="with --render-only: how a repeat run compared, kept in accuracy.json and rendered")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.out is None:
        args.out = ROOT / "docs" / ("quick" if args.quick else "")
    if (args.notes or args.reproduced) and not args.render_only:
        ap.error("--notes and --reproduced go with --render-only")
    if args.render_only:
        saved = json.loads(args.render_only.read_text())
        if args.notes:
            saved["meta"]["notes"] = args.notes.read_text()
        if args.reproduced:
            saved["meta"]["reproduced"] = args.reproduced
        if args.notes or args.reproduced:
            write_json_atomic(args.render_only, saved)
        out = args.out.resolve()
        pngs = [plot(r, out / "results" / f"accuracy-{r['job']}.png") for r in saved["jobs"]]
        write_markdown(saved["jobs"], saved["meta"], out / "results.md", [str(p.relative_to(out)) for p in pngs])
        head = headline(saved["jobs"], saved["meta"]["mode"], saved["meta"]["total_minutes"])
        print(json.dumps(head, sort_keys=True))
        return head

    mode = "quick" if args.quick else "full"
    path = args.config or BENCH_DIR / f"{mode}.yaml"
    bench = load_bench(path)
    jobs = bench["jobs"]
    if args.jobs:
        wanted = args.jobs.split(",")
        jobs = [j for j in jobs if j["name"] in wanted]
        if not jobs:
            raise SystemExit(f"--jobs {args.jobs}: none of {[j['name'] for j in bench['jobs']]}")
    out = args.out.resolve()
    res_dir = out / "results"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = res_dir / "work" / f"{mode}-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{res_dir / 'work' / 'mlflow.db'}"
    for job in jobs:  # validate every job before any compute
        job_config(job, args.override, work, uri)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    t0 = time.perf_counter()
    results = [run_job(job, args.override, work, uri, log) for job in jobs]
    total = (time.perf_counter() - t0) / 60
    cmd_args = [a for a in (sys.argv[1:] if argv is None else list(argv))]
    meta = {
        "mode": mode, "stamp": stamp, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([".venv/bin/python bench/accuracy.py", *cmd_args]),
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                   f"{_processes(results)}, 1 torch thread each, no GPU",
        "total_minutes": total, "tolerance": TOLERANCE, "config_file": str(path),
    }
    pngs = [plot(r, res_dir / f"accuracy-{r['job']}.png") for r in results]
    raw = res_dir / "accuracy.json"
    raw.write_text(json.dumps({"meta": meta, "jobs": results}, indent=1, default=str) + "\n")
    md = out / "results.md"
    write_markdown(results, meta, md, [str(p.relative_to(out)) for p in pngs])
    parent = log_mlflow(uri, results, meta, [md, raw, *pngs])
    for r in results:
        print()
        print(f"== {r['job']} ({r['metric']}) ==")
        tnames = r["targets"]
        table = []
        for m in METHODS:
            by = {x["configuration"]: x[r["metric"]] for x in r["rows"] if x["method"] == m}
            row = {"method": m, **{n.split()[1]: by.get(n, float("nan")) for n in tnames}, "mean": r["mean_target"][m],
                   "unseen": r["unseen_mean"].get(m, float("nan")), "HV": r["hypervolume_targets"][m],
                   "train_min": r["minutes"][m]}
            table.append(row)
        print(report.text_table(table, ["method", *[n.split()[1] for n in tnames], "mean", "unseen", "HV", "train_min"]))
    print(f"\nwrote {md}, {raw}, {', '.join(str(p) for p in pngs)}; MLflow {uri} parent run {parent}")
    head = headline(results, mode, total)
    head["mlflow_parent_run"] = parent
    print(json.dumps(head, sort_keys=True))
    return head


if __name__ == "__main__":
    main()
