"""The protocol: a bench YAML's jobs, each one run through the product path (its ``adapter.kind``: CoA-LoRA by
default, or LoTA-QAF / one plain LoRA; the run also trains Shared-LoRA, replays CoA-LoRA's steps without θ as
coa-no-theta, and evaluates no-adapter) and then the per-configuration trainings on exactly the configurations it
evaluated, plus the references: QLoRA at equal total budget and LoRA on the unquantized base (the ceiling)."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from orchestrator.config import ConfigError, RunConfig, build_config
from orchestrator.loop import paired
from orchestrator.loop.driver import Driver
from orchestrator.loop.finish import CURVES_FILE, EXAMPLES_FILE, RUN_METHOD, Finish
from orchestrator.loop.optim import train_config
from orchestrator.runs import start_run
from orchestrator.loop.schedule import unkey
from orchestrator.state import Ledger
from search.space import parse_code

from .baselines import run_baselines
from .stats import METHODS, summarize

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "conf" / "bench"

PRODUCT_EXPERIMENT = "coalora-bench-product"
UNQUANTIZED = "unquantized"
"""The ceiling's one configuration: LoRA on the fp32 base."""
FULL_PRECISION_BITS = 32.0

BENCH_DEFAULTS = {"qlora_unseen": 4, "lq_iterations": 100, "lq_fisher": True, "lq_lora_lr": None, "hv_reference": None,
                  "qlora_gptq": True, "qlora_projq": True, "projq_iterations": 5, "seeds": None,
                  "per_configuration": True, "paired_with": None, "contrasts": None}
"""Per-job ``bench:`` options; ``per_configuration``: false runs the product path only (the run's method and the
driver's baselines), for a job that varies the run against another job of the file whose per-configuration rows
would be the same trainings; a list of :data:`PER_CONFIGURATION_METHODS` runs only those (``qlora`` also stands for
its ``qlora_unseen`` rows), for a job that adds rows a full job could not afford; ``paired_with``: the name of that job (same model, data and seeds), whose run method
this job's is paired with example by example on the configurations both evaluated (:func:`stats.paired_across_jobs`);
``qlora_gptq`` / ``qlora_projq``: also QLoRA on GPTQ codes / with ProjQ's init
(``projq_iterations`` = its T) at every target (NF/INT spaces with round-to-nearest runs only: a GPTQ run's QLoRA
rows already are GPTQ's, and ggml's types take no GPTQ). ``seeds``: run the whole job once per training seed (run.seed)
on the same held-out examples (data.split_seed = the job's run.seed) and pool them (:func:`stats.pool_seeds`);
None: once, at the job's run.seed. A job that ran once and is given seeds later reuses that run as its run.seed's.
``contrasts``: [a, b] pairs of the job's methods, each reported as a − b (:func:`stats.contrasts`) beside the run
method's own paired table: how two baselines compare (QLoRA on GPTQ codes against RTN's, say), which the run
method's differences cannot give an interval for. Read off the saved scores, so adding one re-runs nothing."""


PER_CONFIGURATION_METHODS = ("qlora", "lq-lora", "qlora-gptq", "qlora-projq", "qlora-budget", "lora-fp")
"""The per-configuration trainings a job can run, in the order they run (``bench.per_configuration``)."""


def job_seeds(job: Mapping[str, Any]) -> list[int | None]:
    """The training seeds a job runs at: its ``bench.seeds``, or [None] (once, as its YAML says)."""
    seeds = job.get("bench", {}).get("seeds")
    return [None] if seeds is None else [int(s) for s in seeds]


def own_seed(job: Mapping[str, Any], overrides: Sequence[str]) -> int:
    """The training seed the job's YAML entry (with the overrides) runs at when it runs once: its run.seed."""
    return build_config(copy.deepcopy(dict(job.get("run", {}))), overrides).run.seed


def job_key(job: Mapping[str, Any], seed: int | None) -> str:
    """The name of one run of a job: its own, or ``<name>-seed<s>`` when it runs at several seeds."""
    return str(job["name"]) if seed is None else f"{job['name']}-seed{seed}"



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
        seeds = j.get("bench", {}).get("seeds")
        if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                                  or not all(isinstance(s, int) and s >= 0 for s in seeds)):
            raise ConfigError(f"{path}: job {j['name']}: bench.seeds must be a non-empty list of distinct integers "
                              f">= 0, got {seeds!r}")
        chosen = j.get("bench", {}).get("per_configuration", True)
        if not isinstance(chosen, bool) and (not isinstance(chosen, list) or not chosen
                                             or not set(chosen) <= set(PER_CONFIGURATION_METHODS)
                                             or len(set(chosen)) != len(chosen)):
            raise ConfigError(f"{path}: job {j['name']}: bench.per_configuration must be true, false or a non-empty "
                              f"list of distinct methods from {list(PER_CONFIGURATION_METHODS)}, got {chosen!r}")
        pairs = j.get("bench", {}).get("contrasts")
        if pairs is not None and (not isinstance(pairs, list) or not pairs or not all(
                isinstance(p, list) and len(p) == 2 and p[0] != p[1] and set(p) <= set(METHODS) for p in pairs)):
            raise ConfigError(f"{path}: job {j['name']}: bench.contrasts must be a non-empty list of [a, b] pairs of "
                              f"two different methods from {list(METHODS)}, got {pairs!r}")
        other = j.get("bench", {}).get("paired_with")
        if other is not None and (other == j["name"] or other not in names):
            raise ConfigError(f"{path}: job {j['name']}: bench.paired_with must name another job of the file "
                              f"({[n for n in names if n != j['name']]}), got {other!r}")
    return data


def check_pairing(job: Mapping[str, Any], cfg: RunConfig, other: Mapping[str, Any], other_cfg: RunConfig) -> None:
    """Refuse (before any compute) a ``paired_with`` whose two jobs are not scored on the same examples: the model,
    the data section and the training seeds must agree; the methods, inits and search may differ."""
    what = [f for f, a, b in (("model", cfg.model, other_cfg.model), ("data", cfg.data, other_cfg.data),
                              ("evaluation.targets", cfg.evaluation.targets, other_cfg.evaluation.targets),
                              ("bench.seeds", job_seeds(job), job_seeds(other))) if a != b]
    if what:
        raise ConfigError(f"job {job['name']}: bench.paired_with {other['name']!r} differs in {', '.join(what)}: "
                          "a paired comparison needs the same model, data, targets and seeds")



def job_config(job: Mapping[str, Any], overrides: Sequence[str], work: Path, uri: str,
               seed: int | None = None) -> tuple[RunConfig, dict[str, Any]]:
    """The product run configuration of one job (validated), with the bench's fixed parts forced; at training seed
    ``seed`` (run.seed) with the job's own examples held out (data.split_seed = its run.seed) when given."""
    run = copy.deepcopy(dict(job.get("run", {})))
    forced: dict[str, dict[str, Any]] = {
        "run": {"name": job_key(job, seed), "root": str(work / "runs")},
        "evaluation": {"baselines": ["no_adapter", "shared_lora"]},
        "tracking": {"uri": uri, "experiment": PRODUCT_EXPERIMENT},
    }
    own = build_config(run, overrides)
    if own.adapter.kind == "coa":  # the ablation that isolates θ: only CoA-LoRA has a θ to remove
        forced["evaluation"]["baselines"].append("no_theta")
    if seed is not None:  # every seed holds out what the job's own seed would
        forced["run"]["seed"] = seed
        forced["data"] = {"split_seed": own.run.seed if own.data.split_seed is None else own.data.split_seed}
    for section, values in forced.items():
        run.setdefault(section, {}).update(values)
    run.setdefault("cluster", {}).setdefault("executor", "local")
    cfg = build_config(run, overrides)
    # overrides may not undo the forced parts
    cfg = build_config(cfg.model_dump(mode="json"), [f"{s}.{k}={json.dumps(v)}" for s, d in forced.items() for k, v in d.items()])
    opts = {**BENCH_DEFAULTS, **job.get("bench", {})}
    if opts["hv_reference"] is None:
        opts["hv_reference"] = 0.5 if cfg.model.task == "classification" else 1000.0
    if cfg.quant.method != "rtn" or parse_code(cfg.load_space().code[0])[0] == "gguf":
        opts["qlora_gptq"] = False  # the QLoRA rows already are GPTQ's, or the space's types take no GPTQ
        opts["qlora_projq"] = False
    return cfg, opts



@contextlib.contextmanager
def timed_driver(times: dict[str, float]) -> Iterator[None]:
    """Measure the driver's Shared-LoRA and coa-no-theta trainings and its final evaluation (the driver does not time
    itself). The wrapped methods are called unchanged; only their durations are recorded."""
    originals = {"_train_shared": (Finish, Finish.train_shared), "_train_no_theta": (Finish, Finish.train_no_theta),
                 "final_evaluation": (Driver, Driver.final_evaluation)}

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



def evaluated_configurations(run_dir: Path, main: str) -> list[tuple[str, np.ndarray]]:
    """(name, encoding) of every configuration the driver evaluated, in its order (from the ledger's rows of the
    run's own method ``main``)."""
    out, seen = [], set()
    for e in Ledger(run_dir / "ledger.jsonl").entries():
        if e["kind"] == "final" and e["method"] == main and e["configuration"] not in seen:
            seen.add(e["configuration"])
            out.append((e["configuration"], unkey(e["config"])))
    return out



def per_configuration_trainings(opts: Mapping[str, Any], targets: Sequence[tuple[str, np.ndarray]],
                                unseen: Sequence[tuple[str, np.ndarray]]) -> list[tuple[str, str, np.ndarray | None]]:
    """(method, configuration name, encoding) of every per-configuration training the job's options ask for, in the
    order they run: the targets' rows, the ceiling once, QLoRA on the first ``qlora_unseen`` unseen ones."""
    chosen = opts["per_configuration"]
    if chosen is False:
        return []
    dropped = {m for m, flag in (("qlora-gptq", "qlora_gptq"), ("qlora-projq", "qlora_projq")) if not opts[flag]}
    methods = [m for m in PER_CONFIGURATION_METHODS if (chosen is True or m in chosen) and m not in dropped]
    out: list[tuple[str, str, np.ndarray | None]] = [(m, n, x) for m in methods if m != "lora-fp" for n, x in targets]
    if "lora-fp" in methods:
        out.append(("lora-fp", UNQUANTIZED, None))
    if "qlora" in methods:
        out += [("qlora", n, x) for n, x in unseen[: int(opts["qlora_unseen"])]]
    return out



def job_methods(cfg: RunConfig, opts: Mapping[str, Any]) -> list[str]:
    """The methods one run of a job evaluates, known before any compute: the run's own, the driver's baselines
    (coa-no-theta for CoA-LoRA) and the per-configuration trainings its options ask for."""
    driver = [RUN_METHOD[cfg.adapter.kind], "no-adapter", "shared-lora", *(["coa-no-theta"] if cfg.adapter.kind == "coa" else [])]
    per_config = dict.fromkeys(m for m, _, _ in per_configuration_trainings(opts, [("target", np.zeros(0))], []))
    return [*driver, *per_config]



def run_job(job: Mapping[str, Any], overrides: Sequence[str], work: Path, uri: str, log, seed: int | None = None
            ) -> tuple[dict[str, Any], dict[tuple[str, str], np.ndarray]]:
    """One run of a job (at training seed ``seed`` when given): its result and every (method, configuration)'s
    per-example validation scores."""
    cfg, opts = job_config(job, overrides, work, uri, seed)
    name, main = cfg.run.name, RUN_METHOD[cfg.adapter.kind]
    torch.set_num_threads(1)
    times: dict[str, float] = {}
    log(f"[{name}] {main} run (product path: start_run, {cfg.search.rounds} rounds x "
        f"{cfg.training.steps_per_round} steps, K = {cfg.training.configs_per_step}) + Shared-LoRA + no-adapter")
    t0 = time.perf_counter()
    with timed_driver(times):
        run_dir, driver_rows = start_run(cfg, progress=False)
    run_s = time.perf_counter() - t0
    final_s, shared_s = times.get("final_evaluation", 0.0), times.get("_train_shared", 0.0)
    no_theta_s = times.get("_train_no_theta", 0.0)
    minutes = {main: (run_s - final_s) / 60, "shared-lora": shared_s / 60, "no-adapter": 0.0}
    if "no_theta" in cfg.evaluation.baselines:
        minutes["coa-no-theta"] = no_theta_s / 60
    eval_minutes = {f"driver ({', '.join(minutes)})": (final_s - shared_s - no_theta_s) / 60}

    configs = evaluated_configurations(run_dir, main)
    targets = [(n, x) for n, x in configs if n.startswith("target")]
    target_names = [n for n, _ in targets]
    unseen = [(n, x) for n, x in configs if n.startswith("unseen")]
    bits_of = {r["configuration"]: r["avg_bits"] for r in driver_rows}
    rows = [dict(r) for r in driver_rows]

    per_config = per_configuration_trainings(opts, targets, unseen)
    steps = train_config(cfg).total_steps
    if per_config:
        methods = sorted({m for m, _, _ in per_config})
        log(f"[{name}] {len(per_config)} per-configuration trainings of {steps} steps each ({' / '.join(methods)} on "
            f"{len(targets)} targets, qlora on {min(len(unseen), int(opts['qlora_unseen']))} unseen)")
    train_s: dict[str, float] = {}
    eval_s = 0.0
    saved = load_file(run_dir / "final" / EXAMPLES_FILE)  # the driver's methods, example by example
    scores = {(r["method"], r["configuration"]): saved[f"{r['method']}|{r['configuration']}"].numpy() for r in rows}
    curves = json.loads((run_dir / "final" / CURVES_FILE).read_text())  # the driver's methods, step by step
    results = run_baselines(cfg, opts, per_config, log) if per_config else []
    for (method, cname, _), out in zip(per_config, results):
        eval_s += out.eval_s
        key = method if not cname.startswith("unseen") else "qlora (unseen)"
        train_s[key] = train_s.get(key, 0.0) + out.train_s
        curves[f"{method} | {cname}"] = out.losses
        # the ceiling is one model: it stands at every target (32-bit weights), so CoA-LoRA pairs with it there
        for name in (target_names if cname == UNQUANTIZED else [cname]):
            bits = FULL_PRECISION_BITS if cname == UNQUANTIZED else bits_of[name]
            rows.append({"method": method, "configuration": name, "avg_bits": bits, **out.metrics,
                         "init_error": out.init_error})
            scores[(method, name)] = out.scores.numpy()
    minutes.update({k: v / 60 for k, v in train_s.items()})
    if per_config:
        eval_minutes["per-configuration baselines"] = eval_s / 60
    differences = paired.paired_table(scores, main, "classification" if cfg.model.task == "classification"
                                      else "causal-lm")
    result = {**summarize(cfg, opts, rows, minutes, eval_minutes, run_dir, steps, configs, differences), "curves": curves}
    return result, scores
