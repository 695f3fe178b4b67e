"""What a job's rows say: each method's mean over the targets and the unseen configurations, the run's own method's
gaps and wins (CoA-LoRA's, or LoTA's / LoRA's for a job of that ``adapter.kind``; the ``*_coa_*`` keys name the run's
own method whatever its kind), hypervolumes with a fixed reference, and the one-line headline."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from orchestrator.loop import paired
from orchestrator.config import RunConfig
from orchestrator.loop.finish import ILP_UNSEEN, RUN_METHOD
from search.hypervolume import normalized_hypervolume

METHODS = ("coa-lora", "lota", "lora", "coa-no-theta", "qlora", "qlora-budget", "qlora-gptq", "qlora-projq", "lq-lora", "shared-lora",
           "lora-fp", "no-adapter")
CEILING = "lora-fp"
"""LoRA on the unquantized base: a reference line, not a point on the bits axis (no hypervolume)."""

def methods_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The methods ``rows`` hold, in :data:`METHODS` order (a bench option may leave one out)."""
    present = {r["method"] for r in rows}
    return [m for m in METHODS if m in present]


DRIVER_BASELINES = ("coa-no-theta", "shared-lora", "no-adapter")
"""What the product run evaluates beside its own method on every configuration (coa-no-theta for CoA-LoRA only)."""


def main_method(result: Mapping[str, Any]) -> str:
    """The run's own method of a job's result (results saved before other kinds were benched are CoA-LoRA's)."""
    return str(result.get("main", "coa-lora"))


def driver_methods(main: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The run's own method and the driver's baselines that ``rows`` hold."""
    present = {r["method"] for r in rows}
    return [m for m in (main, *DRIVER_BASELINES) if m in present]



def _hv(points: Sequence[tuple[float, float]], metric: str, ref: float, bits_range: tuple[float, float]) -> float:
    if not points:
        return float("nan")
    bits = np.asarray([p[0] for p in points])
    vals = np.asarray([p[1] for p in points], dtype=np.float64)
    if metric == "accuracy":
        return normalized_hypervolume(bits, 1.0 - vals, bits_range, (0.0, 1.0 - ref))
    return normalized_hypervolume(bits, np.log(np.maximum(vals, 1.0)), bits_range, (0.0, math.log(ref)))



def metric_mean(values: Sequence[float], metric: str) -> float:
    """Arithmetic for accuracy; geometric for perplexity (exp of the mean loss), so one collapsed configuration
    (perplexity 1e9 at 2.5 bits) does not swamp the others. NaN for no values."""
    v = np.asarray(values, dtype=np.float64)
    if not v.size:
        return float("nan")
    return float(v.mean()) if metric == "accuracy" else float(np.exp(np.log(v).mean()))


def summarize(cfg: RunConfig, opts: Mapping[str, Any], rows: list[dict[str, Any]], minutes: dict[str, float],
              eval_minutes: dict[str, float], run_dir: Path, steps: int, configs,
              differences: list[dict[str, Any]], bits_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """One job's result. ``bits_range`` (the hypervolume's bit axis) is read from the run's space unless given:
    saved runs pass the range they recorded, since their space file may have been on another machine."""
    metric = "accuracy" if cfg.model.task == "classification" else "perplexity"
    main = RUN_METHOD[cfg.adapter.kind]
    bits_range = cfg.load_space().bits_range if bits_range is None else bits_range
    target_names = [f"target {t:g}" for t in cfg.evaluation.targets]
    unseen_names = [n for n, _ in configs if n.startswith("unseen")]
    ilp_names = [n for n, _ in configs if n.startswith(ILP_UNSEEN)]
    qlora_unseen = [r["configuration"] for r in rows if r["method"] == "qlora" and r["configuration"].startswith("unseen")]
    by = {(r["method"], r["configuration"]): r for r in rows}

    def mean(method: str, names: Sequence[str]) -> float:
        return metric_mean([by[(method, n)][metric] for n in names if (method, n) in by], metric)

    present = methods_of(rows)
    driven = driver_methods(main, rows)
    mean_target = {m: mean(m, target_names) for m in present}
    unseen_mean = {m: mean(m, unseen_names) for m in driven}
    ilp_unseen_mean = {m: mean(m, ilp_names) for m in driven} if ilp_names else {}
    unseen_q = {m: mean(m, qlora_unseen) for m in [*driven, "qlora"]}
    ref = float(opts["hv_reference"])
    hv_targets = {m: _hv([(by[(m, n)]["avg_bits"], by[(m, n)][metric]) for n in target_names if (m, n) in by],
                         metric, ref, bits_range) for m in present if m != CEILING}
    hv_all = {m: _hv([(r["avg_bits"], r[metric]) for r in rows if r["method"] == m], metric, ref, bits_range)
              for m in driven}
    sign = 1.0 if metric == "accuracy" else -1.0  # gap > 0: the run's method is better
    wins = {b: sum(sign * (by[(main, n)][metric] - by[(b, n)][metric]) > 0 for n in target_names)
            for b in present if b != main and all((b, n) in by for n in target_names)}
    return {
        "job": cfg.run.name, "main": main, "model": cfg.model.name, "task": cfg.model.task, "dataset": cfg.data.dataset,
        "metric": metric, "higher_is_better": metric == "accuracy", "baseline_steps_per_configuration": steps,
        "coa_steps": steps, "coa_configs_per_step": cfg.training.configs_per_step,
        "targets": target_names, "unseen": unseen_names, "qlora_unseen": qlora_unseen,
        "mean_target": mean_target, "unseen_mean": unseen_mean, "unseen_qlora_subset_mean": unseen_q,
        "ilp_unseen": ilp_names, "ilp_unseen_mean": ilp_unseen_mean,
        **{f"gap_coa_minus_{m.replace('-', '_')}": mean_target[main] - mean_target.get(m, math.nan)
           for m in ("qlora", "lq-lora", "shared-lora")},  # NaN for a job without per-configuration rows
        "coa_wins_on_targets": wins,
        "hv_reference": {"bits": list(bits_range), metric: ref}, "hypervolume_targets": hv_targets,
        "hypervolume_all_evaluated": hv_all, "minutes": minutes, "evaluation_minutes": eval_minutes,
        "served_configurations": {main: "any", "coa-no-theta": "any (one adapter)",
                                  "shared-lora": "any (one adapter)", "qlora": len(target_names),
                                  "qlora-budget": len(target_names), "qlora-gptq": len(target_names),
                                  "qlora-projq": len(target_names),
                                  "lq-lora": len(target_names), "lora-fp": "none (unquantized ceiling)",
                                  "no-adapter": "any"},
        "rows": rows, "run_dir": str(run_dir), "config": cfg.model_dump(mode="json"), "bench_options": dict(opts),
        "configurations": {n: x.tolist() for n, x in configs},
        "paired": differences,
    }



def mean_scores(per_seed: Sequence[Mapping[tuple[str, str], np.ndarray]]) -> dict[tuple[str, str], np.ndarray]:
    """Each (method, configuration)'s per-example scores averaged over the seeds that all hold it: one run's
    scores as they are, several seeds' as the pooled run they stand for."""
    kept = [k for k in per_seed[0] if all(k in s for s in per_seed[1:])]
    return {k: np.mean([np.asarray(s[k]) for s in per_seed], axis=0) for k in kept}


def paired_across_jobs(result: Mapping[str, Any], scores: Mapping[tuple[str, str], np.ndarray],
                       other: Mapping[str, Any], other_scores: Mapping[tuple[str, str], np.ndarray],
                       seeds: Iterable[tuple[tuple[Mapping, Mapping], tuple[Mapping, Mapping]]] = ()) -> dict[str, Any]:
    """One job's run method against another job's (``bench.paired_with``: same model, data and seeds, e.g. another
    ``adapter.init``), example by example on every configuration both evaluated under the same name, pooled like
    a job's own paired table. A name may hold another allocation in each job (an ILP on another cost table):
    ``same_configuration`` says, per name, whether the two encodings agree (if not, the row compares two methods
    at one budget, each with its own allocation). ``seeds``: the two jobs' (result, scores) at each shared seed;
    with more than one, the difference across the seeds too (``across_seeds``, :func:`seed_differences`)."""
    labels = (f"{main_method(result)} ({result['job']})", f"{main_method(other)} ({other['job']})")
    rows, names = _job_against_job(result, scores, other, other_scores, labels)
    per_seed = [_job_against_job(r, s, o, os, labels)[0] for (r, s), (o, os) in seeds]  # named as the pooled jobs
    return {"against": str(other["job"]), "rows": rows,
            "same_configuration": {c: result["configurations"].get(c) == other["configurations"].get(c) for c in names},
            **({"across_seeds": seed_differences(per_seed)} if len(per_seed) > 1 else {})}


def _job_against_job(result: Mapping[str, Any], scores: Mapping[tuple[str, str], np.ndarray],
                     other: Mapping[str, Any], other_scores: Mapping[tuple[str, str], np.ndarray],
                     labels: tuple[str, str]) -> tuple[list[dict], list[str]]:
    """The paired table of ``result``'s run method against ``other``'s (named ``labels``), and the configurations
    both evaluated."""
    a, b = main_method(result), main_method(other)
    mine, theirs = labels
    names = [c for m, c in scores if m == a and (b, c) in other_scores]
    table = {**{(mine, c): scores[(a, c)] for c in names}, **{(theirs, c): other_scores[(b, c)] for c in names}}
    kind = "classification" if result["metric"] == "accuracy" else "causal-lm"
    return paired.paired_table(table, mine, kind), names


def pool_seeds(runs: Sequence[tuple[Mapping[str, Any], Mapping[tuple[str, str], np.ndarray]]],
               job: str) -> dict[str, Any]:
    """One job run at several training seeds, on the same held-out examples, as one result: each (method,
    configuration)'s metric pooled over the seeds, the paired differences on each example's scores averaged over
    the seeds (so an interval still treats the examples as the unit, now with the training noise averaged in),
    training minutes per seed, and each seed's own means and pooled paired differences (``per_seed``) so the
    seeds' spread shows beside the pooled figures. An unseen configuration "unseen i" is another draw at each seed:
    only its pooled rows ("all unseen") compare like with like."""
    results = [r for r, _ in runs]
    first, metric = results[0], results[0]["metric"]
    by = [{(x["method"], x["configuration"]): x for x in r["rows"]} for r in results]
    rows = []
    for row in first["rows"]:
        k = (row["method"], row["configuration"])
        if not all(k in b for b in by):
            continue
        same = [b[k] for b in by]
        per_seed = [x[metric] for x in same]
        pooled = {**row, metric: metric_mean(per_seed, metric), "per_seed": per_seed,
                  "avg_bits": float(np.mean([x["avg_bits"] for x in same])),
                  "loss": float(np.mean([x["loss"] for x in same]))}
        if row.get("init_error") is not None:
            pooled["init_error"] = float(np.mean([x["init_error"] for x in same]))
        rows.append(pooled)
    scores = mean_scores([s for _, s in runs])
    kind = "classification" if metric == "accuracy" else "causal-lm"
    differences = paired.paired_table(scores, main_method(first), kind)
    minutes = {m: float(np.mean([r["minutes"][m] for r in results])) for m in first["minutes"]}
    eval_minutes = {m: float(np.mean([r["evaluation_minutes"][m] for r in results])) for m in first["evaluation_minutes"]}
    configs = [(n, np.asarray(x)) for n, x in first["configurations"].items()]
    out = summarize(RunConfig.model_validate(first["config"]), first["bench_options"], rows, minutes, eval_minutes,
                    Path(first["run_dir"]), first["baseline_steps_per_configuration"], configs, differences,
                    bits_range=tuple(first["hv_reference"]["bits"]))  # not the space file: it may be elsewhere
    seeds = [int(r["config"]["run"]["seed"]) for r in results]
    out.update(job=job, seeds=seeds, curves=first.get("curves", {}), per_seed=[
        {"seed": s, "mean_target": r["mean_target"], "unseen_mean": r["unseen_mean"],
         "paired_coa_minus": paired_summary(r.get("paired") or [])} for s, r in zip(seeds, results)],
        across_seeds=seed_differences([r.get("paired") or [] for r in results]))
    return out


def contrasts(pairs: Sequence[Sequence[str]], scores: Mapping[tuple[str, str], np.ndarray],
              runs: Sequence[tuple[Mapping[str, Any], Mapping[tuple[str, str], np.ndarray]]],
              metric: str) -> list[dict[str, Any]]:
    """Method a − method b of one job for each [a, b] of ``bench.contrasts``, example by example like the run
    method's own table: per configuration both evaluated and pooled (``rows``, on ``scores``: the seeds' mean per
    example), and, with several seeds, across the seeds (``across_seeds``, :func:`seed_differences`). A pair naming
    a method the job did not evaluate is refused with what it holds: the runs are saved, so fixing the pair and
    running the command again computes nothing but this."""
    held = sorted({m for m, _ in scores})
    kind = "classification" if metric == "accuracy" else "causal-lm"
    out = []
    for a, b in pairs:
        missing = [m for m in (a, b) if m not in held]
        if missing:
            raise ValueError(f"bench.contrasts [{a}, {b}]: the job evaluated no {', '.join(missing)} "
                             f"(it holds {', '.join(held)})")
        def two(s: Mapping[tuple[str, str], np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
            return {k: v for k, v in s.items() if k[0] in (a, b)}
        per_seed = [paired.paired_table(two(s), a, kind) for _, s in runs] if len(runs) > 1 else []
        out.append({"method": a, "other": b, "rows": paired.paired_table(two(scores), a, kind),
                    "across_seeds": seed_differences(per_seed).get(b, {}) if per_seed else {}})
    return out


def seed_differences(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The run's method − each other method across the seeds (:func:`orchestrator.loop.paired.across_seeds` of each
    seed's paired rows' difference; the other may be another job's run method), for the rows that name the same
    thing at every seed: each target (the ILP allocation at one budget) and the pooled "all ..." rows, not
    "unseen i", which is another draw at each seed. The pooled interval over examples leaves the seeds' spread
    out; this one is made of it."""
    by_seed = [{(d["other"], d["configuration"]): d["difference"] for d in rows} for rows in per_seed]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for other, c in by_seed[0]:
        if (c.startswith("target") or c.startswith("all ")) and all((other, c) in b for b in by_seed):
            out.setdefault(other, {})[c] = paired.across_seeds([b[(other, c)] for b in by_seed])
    return out


def headline(results: Sequence[Mapping[str, Any]], mode: str, total_minutes: float) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "accuracy", "mode": mode, "total_minutes": round(total_minutes, 2)}
    for r in results:
        out[r["job"]] = {
            "metric": r["metric"], "main": main_method(r),
            "mean_target": {m: round(v, 4) for m, v in r["mean_target"].items()},
            "gap_coa_minus_qlora": round(r["gap_coa_minus_qlora"], 4),
            "gap_coa_minus_lq_lora": round(r["gap_coa_minus_lq_lora"], 4),
            "unseen_mean": {m: round(v, 4) for m, v in r["unseen_mean"].items()},
            "ilp_unseen_mean": {m: round(v, 4) for m, v in r.get("ilp_unseen_mean", {}).items()},
            "hv_targets": {m: round(v, 4) for m, v in r["hypervolume_targets"].items()},
            "minutes": {m: round(v, 2) for m, v in r["minutes"].items()},
            "paired_coa_minus": paired_summary(r.get("paired") or []),
            **({"paired_jobs": paired_summary(r["paired_jobs"]["rows"])} if r.get("paired_jobs") else {}),
            **({"contrasts": contrasts_summary(r["contrasts"])} if r.get("contrasts") else {}),
            "seeds": r.get("seeds", [r["config"]["run"]["seed"]]),
            **({"across_seeds": {o: {c: _compact(a) for c, a in rows.items()} for o, rows in r["across_seeds"].items()}}
               if r.get("across_seeds") and len(r["seeds"]) > 1 else {}),
        }
    return out


def contrasts_summary(pairs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each ``bench.contrasts`` pair (:func:`contrasts`) for the headline, keyed "a - b": its pooled rows and, with
    several seeds, its across-seeds ones, as [difference, 95% low, 95% high]."""
    out: dict[str, dict[str, Any]] = {}
    for c in pairs:
        one: dict[str, Any] = {"pooled": paired_summary(c["rows"])[c["other"]]}
        if c["across_seeds"]:
            one["across_seeds"] = {k: _compact(a) for k, a in c["across_seeds"].items()}
        out[f"{c['method']} - {c['other']}"] = one
    return out


def paired_summary(differences: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """CoA-LoRA − each other method per configuration (and pooled), as [difference, 95% low, 95% high]: the
    paired rows of a job (``orchestrator.loop.paired``), compact for the headline."""
    out: dict[str, dict[str, list[float]]] = {}
    for d in differences:
        out.setdefault(d["other"], {})[d["configuration"]] = _compact(d)
    return out


def _compact(d: Mapping[str, Any]) -> list[float]:
    """A difference with its 95% interval, as [difference, low, high] rounded for the headline."""
    return [round(d["difference"], 4), *(round(x, 4) for x in d["ci95"])]
