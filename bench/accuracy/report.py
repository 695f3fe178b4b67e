"""The outputs: results.md (protocol, tables, wall times, discussion), a metric-vs-bits plot and a training-loss plot
per job, and the MLflow parent run with one child per method."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from orchestrator.loop import paired
from orchestrator.loop.finish import ILP_UNSEEN
from orchestrator.loop.report import loss_curves_plot
from orchestrator.tracking.tracker import Tracker

from .baselines import equal_budget_steps
from .stats import CEILING, DRIVER_BASELINES, main_method, methods_of

DISPLAY = {"coa-lora": "CoA-LoRA", "lota": "LoTA", "lora": "LoRA"}
"""How the text names each kind's run method."""

BENCH_EXPERIMENT = "coalora-bench"

TOLERANCE = "0 (identical) on the same machine and torch build; across machines 1/val_examples accuracy, 1e-3 relative perplexity"



def figures(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """The job's plots under ``directory``: its metric vs average bits, and (when the job recorded them) its
    training loss curves."""
    out = [plot(result, directory / f"accuracy-{result['job']}.png")]
    if result.get("curves"):
        out.append(plot_curves(result, directory / f"curves-{result['job']}.png"))
    return out


def plot_curves(result: Mapping[str, Any], path: Path) -> Path:
    """Training loss per step: the run's own methods (CoA-LoRA's is the mean over its K configurations of each
    step, drawn from the training set across the bit axis), and each per-configuration method at the lowest target
    (the hardest) and lora-fp. Curves differ in level by what they train on; the question they answer is whether
    each has flattened by its last step."""
    lowest = result["targets"][0]
    curves = result["curves"]
    chosen = {m: c for m, c in curves.items() if " | " not in m}
    chosen.update({m: c for m, c in curves.items() if m.endswith(f" | {lowest}") or m.startswith(CEILING)})
    return loss_curves_plot(chosen, path, f"{result['job']}: training loss per step")


def plot(result: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, rows = result["metric"], result["rows"]
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=110)
    styles = {"coa-lora": ("C3", "o"), "lota": ("C5", "h"), "lora": ("C7", "d"), "coa-no-theta": ("C6", "X"), "qlora": ("C0", "s"), "qlora-budget": ("C9", "<"),
              "qlora-gptq": ("C4", "P"), "qlora-projq": ("C8", "*"), "lq-lora": ("C2", "^"), "shared-lora": ("C1", "D"),
              "no-adapter": ("0.5", "v")}
    for m, (color, marker) in styles.items():
        t = sorted((r["avg_bits"], r[metric]) for r in rows if r["method"] == m and r["configuration"].startswith("target"))
        u = [(r["avg_bits"], r[metric]) for r in rows if r["method"] == m and
             r["configuration"].startswith(("unseen", ILP_UNSEEN))]
        if t:
            ax.plot(*zip(*t), marker=marker, color=color, lw=1.5, ms=6, label=f"{m} (targets)")
        if u:
            ax.scatter(*zip(*u), marker=marker, facecolors="none", edgecolors=color, s=28, label=f"{m} (unseen)")
    ceiling = [r[metric] for r in rows if r["method"] == CEILING]
    if ceiling:  # one model on the unquantized base: a line, not a point on the bits axis
        ax.axhline(ceiling[0], color="k", ls="--", lw=1, label=f"{CEILING} (unquantized ceiling)")
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



def seeds_tables(r: Mapping[str, Any]) -> list[str]:
    """For a job pooled over training seeds: each seed's mean over the targets per method, and CoA-LoRA − each
    other method per target and pooled row at each seed and across the seeds, so the seeds' spread shows beside the
    pooled figures (each seed's intervals over the examples stay in accuracy.json, ``per_seed``)."""
    per_seed = r.get("per_seed")
    if not per_seed:
        return []
    seeds = [p["seed"] for p in per_seed]
    metric = r["metric"]
    held = r["config"]["data"]["split_seed"]  # None where the first seed is the job's single run: its run.seed
    held = r["config"]["run"]["seed"] if held is None else held
    out = [f"### Training seeds ({len(seeds)}: {', '.join(map(str, seeds))})", "",
           f"Every figure above pools {len(seeds)} runs of the whole job that differ only in run.seed (initialisation, "
           f"data order, configuration draws), on the same held-out examples (data.split_seed = "
           f"{held}): metrics averaged over the seeds ({'arithmetic' if metric == 'accuracy' else 'geometric'} "
           "mean), paired differences on each example's scores averaged over the seeds. Per seed:", "",
           "| method | " + " | ".join(f"seed {x}" for x in seeds) + " | pooled |", "|---|" + "---|" * (len(seeds) + 1)]
    for m in methods_of(r["rows"]):
        out.append(f"| {m} | " + " | ".join(_f(p["mean_target"].get(m, float("nan"))) for p in per_seed)
                   + f" | {_f(r['mean_target'][m])} |")
    return out + ["", *across_seeds_table(r.get("across_seeds") or {}, seeds, metric, DISPLAY[main_method(r)])]


def seeds_favouring(per_seed: Sequence[float], metric: str) -> int:
    """At how many seeds the difference a − b favours a: a higher accuracy, a lower loss."""
    return sum(d > 0 if metric == "accuracy" else d < 0 for d in per_seed)


def across_seeds_table(across: Mapping[str, Mapping[str, Mapping[str, Any]]], seeds: Sequence[int], metric: str,
                       main: str) -> list[str]:
    """``main`` − each other method per configuration at each seed and across the seeds
    (:func:`stats.seed_differences`), with how many seeds favour ``main`` (a higher accuracy, a lower loss)."""
    if not across:
        return []
    out = [f"{main} − other at each seed, and across the seeds: their mean with a Student-t 95% interval over the "
           f"{len(seeds)} seeds' differences (training noise included; the pooled intervals are over the examples), "
           f"and at how many seeds {main} was the better:", "",
           "| other | configuration | " + " | ".join(f"seed {x}" for x in seeds) + " | across seeds | better at |",
           "|---|---|" + "---|" * (len(seeds) + 2)]
    for o in sorted(across):
        for c, a in sorted(across[o].items(), key=lambda kv: (not kv[0].startswith("all"), kv[0])):
            ci = "" if a["ci95"] is None else f" [{a['ci95'][0]:+.4f}, {a['ci95'][1]:+.4f}]"
            better = seeds_favouring(a["per_seed"], metric)
            out.append(f"| {o} | {c} | " + " | ".join(f"{d:+.4f}" for d in a["per_seed"])
                       + f" | {a['difference']:+.4f}{ci} | {better}/{len(seeds)} |")
    return out + [""]


def paired_jobs_section(r: Mapping[str, Any]) -> list[str]:
    """This job's run method against another job's (``bench.paired_with``), on the same examples."""
    pj = r.get("paired_jobs")
    if not pj:
        return []
    same = pj["same_configuration"]
    differ = [c for c, s in same.items() if not s]
    where = ("every configuration is the same encoding in both jobs" if not differ else
             f"{len(same) - len(differ)} of {len(same)} configurations are the same encoding in both jobs; "
             f"{', '.join(differ)} hold another allocation at the same budget in each")
    return [f"### Against job {pj['against']}", "",
            f"Same model, data, held-out examples and seeds; {where}.", "", paired.markdown(pj["rows"]),
            *across_seeds_table(pj.get("across_seeds") or {}, r.get("seeds", []), r["metric"], DISPLAY[main_method(r)])]


def contrasts_section(r: Mapping[str, Any]) -> list[str]:
    """Method a − method b for each pair of ``bench.contrasts`` (:func:`stats.contrasts`): pooled over the seeds
    with the interval over the examples, and across the seeds with the Student-t interval over their differences."""
    if not r.get("contrasts"):
        return []
    accuracy = r["metric"] == "accuracy"
    scale, unit = (100.0, "accuracy points; > 0: a is better") if accuracy else (1.0, "loss per token; < 0: a is better")
    seeds = r.get("seeds") or [r["config"]["run"]["seed"]]
    out = ["### Contrasts between methods", "",
           f"a − b on the same {r['contrasts'][0]['rows'][0]['examples']} examples ({unit}): pooled over the "
           f"{len(seeds)} seed(s) with a 95% interval over the examples, and across the seeds with a Student-t 95% "
           "interval over the seeds' differences (training noise included).", "",
           "| a − b | configuration | pooled | 95% (examples) | across seeds | 95% (seeds) | a better at |",
           "|---|---|---|---|---|---|---|"]
    for c in r["contrasts"]:
        for row in c["rows"]:
            name = row["configuration"]
            if not (name.startswith("target") or name.startswith("all ")):
                continue  # an "unseen i" is another draw at each seed
            a = c["across_seeds"].get(name)
            seeds_ci = "–" if not a or a["ci95"] is None else f"[{scale * a['ci95'][0]:+.2f}, {scale * a['ci95'][1]:+.2f}]"
            better = "–" if not a else f"{seeds_favouring(a['per_seed'], r['metric'])}/{len(a['per_seed'])}"
            lo, hi = (scale * x for x in row["ci95"])
            across = "–" if not a else f"{scale * a['difference']:+.2f}"
            out.append(f"| {c['method']} − {c['other']} | {name} | {scale * row['difference']:+.2f} | [{lo:+.2f}, "
                       f"{hi:+.2f}] | {across} | {seeds_ci} | {better} |")
    return out + [""]


def unseen_section(r: Mapping[str, Any]) -> list[str]:
    """The random-settings unseen configurations: each driven method's mean (and QLoRA's on the ones it was
    retrained on), then each configuration; nothing for a job that evaluated none."""
    if not r["unseen"]:
        return []
    metric, by, main = r["metric"], {(x["method"], x["configuration"]): x for x in r["rows"]}, main_method(r)
    driven = [m for m in (main, *DRIVER_BASELINES) if m in r["unseen_mean"]]
    out = [f"### Unseen configurations ({len(r['unseen'])}, seeded, 2.5–6 bits, never trained on)", ""]
    out += ["| method | mean over all unseen | mean over the " + str(len(r["qlora_unseen"])) + " QLoRA-trained unseen | HV (targets + unseen) |",
            "|---|---|---|---|"]
    for m in (*driven, *(["qlora"] if r["qlora_unseen"] else [])):
        all_u = r["unseen_mean"].get(m, float("nan"))
        out.append(f"| {m} | {_f(all_u) if m != 'qlora' else '– (needs retraining per configuration)'} | "
                   f"{_f(r['unseen_qlora_subset_mean'].get(m, float('nan')))} | {_f(r['hypervolume_all_evaluated'].get(m, float('nan')))} |")
    out += ["", "Per unseen configuration:", ""]
    head = ["configuration", "avg bits", *driven, "qlora (trained on it)"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in r["unseen"]:
        cells = [n, _f(by[(main, n)]["avg_bits"], 3)]
        cells += [_f(by[(m, n)][metric]) if (m, n) in by else "–" for m in (*driven, "qlora")]
        out.append("| " + " | ".join(cells) + " |")
    return out


def ilp_unseen_table(r: Mapping[str, Any]) -> list[str]:
    """The unseen configurations drawn like the pool (ILP at random budgets of the pool's range), apart from the
    random-settings ones: closer to what the training set holds, so the easier kind for CoA-LoRA."""
    names = r.get("ilp_unseen") or []
    if not names:
        return []
    metric, by = r["metric"], {(x["method"], x["configuration"]): x for x in r["rows"]}
    budget = r["config"]["search"]
    main = main_method(r)
    methods = [m for m in (main, *DRIVER_BASELINES) if m in r["ilp_unseen_mean"]]
    out = ["", f"### Unseen configurations drawn like the pool ({len(names)}: the ILP allocation at seeded random "
           f"budgets in [{budget['budget_min']:g}, {budget['budget_max']:g}] bits, never trained on)", "",
           "| method | mean |", "|---|---|"]
    out += [f"| {m} | {_f(r['ilp_unseen_mean'].get(m, float('nan')))} |" for m in methods]
    out += ["", "| configuration | avg bits | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for n in names:
        out.append(f"| {n} | {_f(by[(main, n)]['avg_bits'], 3)} | "
                   + " | ".join(_f(by[(m, n)][metric]) if (m, n) in by else "–" for m in methods) + " |")
    return out


def init_error_table(r: Mapping[str, Any]) -> list[str]:
    """Each per-configuration init's step-0 error-compensation loss at each target (rows that recorded one)."""
    by = {(x["method"], x["configuration"]): x.get("init_error") for x in r["rows"]}
    methods = [m for m in methods_of(r["rows"]) if any(by.get((m, n)) is not None for n in r["targets"])]
    if not methods:
        return []
    head = ["init (method)"] + [f"{n.split()[1]} bits" for n in r["targets"]]
    out = ["### Step-0 error-compensation loss", "",
           "What each init leaves of round-to-nearest's output error before training: per matrix ‖(W − Q − s·B·A)·Y‖² "
           "over ‖(W − Q_rtn)·Y‖² (Y·Yᵀ = Σ of the calibration inputs), averaged over matrices; QLoRA on RTN codes with "
           "B = 0 is 1 by definition. Lower starts closer to the full-precision model on the inputs it will see.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        out.append("| " + " | ".join([m] + [_f(by.get((m, n)) if by.get((m, n)) is not None else float("nan"))
                                             for n in r["targets"]]) + " |")
    return out + [""]


def job_markdown(r: Mapping[str, Any], pngs: Sequence[str]) -> str:
    metric, by = r["metric"], {(x["method"], x["configuration"]): x for x in r["rows"]}
    tnames = r["targets"]
    main = main_method(r)
    name = DISPLAY[main]
    driven = [m for m in (main, *DRIVER_BASELINES) if m in r["unseen_mean"]]
    better = "higher" if r["higher_is_better"] else "lower"
    out = [f"## {r['job']}: {r['model']} + {r['dataset']} ({metric}, {better} is better)", ""]
    head = ["method"] + [f"{n.split()[1]} bits" for n in tnames] + ["mean", "HV (targets)", "train min", "served"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods_of(r["rows"]):
        cells = [m] + [_f(by[(m, n)][metric]) if (m, n) in by else "–" for n in tnames]
        cells += [_f(r["mean_target"][m]), _f(r["hypervolume_targets"].get(m, float("nan"))), _f(r["minutes"][m], 2),
                  str(r["served_configurations"][m])]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Average bits of the target configurations (the ILP allocation at each budget, identical for every "
            "method): " + ", ".join(f"{n.split()[1]} → {by[(main, n)]['avg_bits']:.3f}" for n in tnames) + ".", ""]
    compared = [(m, label) for m, label in (("qlora", "QLoRA"), ("lq-lora", "LQ-LoRA"), ("shared-lora", "Shared-LoRA"))
                if m in r["coa_wins_on_targets"]]
    gaps = ("Gaps, mean over targets: "
            + "; ".join(f"{name} − {label} **{r['gap_coa_minus_' + m.replace('-', '_')]:+.4f}**" for m, label in compared)
            + f". {name} is better on "
            + ", ".join(f"{r['coa_wins_on_targets'][m]}/{len(tnames)} targets vs {label}" for m, label in compared) + ".")
    if not r["higher_is_better"]:
        gaps += (" (Perplexity: means are geometric means, exp of the mean log-perplexity; a negative gap means "
                 f"{name} is better.)")
    out += [gaps, ""]
    if r["higher_is_better"]:
        n_val = r["config"]["data"]["val_examples"]
        p = min(max(r["mean_target"][main], 0.01), 0.99)
        se = math.sqrt(p * (1 - p) / n_val)
        out += [f"Resolution: {n_val} validation examples, so one example = {1 / n_val:.4f} and the binomial standard "
                f"error of one accuracy is ≈ {se:.3f}: a difference between two methods at one configuration below ≈ "
                f"{2 * math.sqrt(2) * se:.3f}, or between two means over the four targets below ≈ "
                f"{math.sqrt(2) * se:.3f} (two standard errors, unpaired), is within noise. The no-adapter model keeps the untrained "
                "classification head, so it predicts one class.", ""]
    flat = [m for m in ("qlora", "lq-lora", "shared-lora", main) if m in r["mean_target"]
            and abs(r["mean_target"][m] - r["mean_target"]["no-adapter"]) < 1e-9 + (1 / r["config"]["data"]["val_examples"]
                                                                               if r["higher_is_better"] else 0)]
    if flat:
        out += [f"**Did not learn:** {', '.join(flat)} ended at the no-adapter level at this learning rate (same lr for "
                "every method by design; see `bench.lq_lora_lr` to give LQ-LoRA's factors their own).", ""]
    out += init_error_table(r)
    out += seeds_tables(r)
    if r.get("paired"):  # saved results from before the paired protocol have none
        out += ["### Paired differences", "", paired.markdown(r["paired"])]
    out += paired_jobs_section(r)
    out += contrasts_section(r)
    out += unseen_section(r)
    out += ilp_unseen_table(r)
    ev = "; ".join(f"{k}: {v:.2f} min" for k, v in r["evaluation_minutes"].items())
    out += ["", "### Wall time (minutes, training only; evaluation excluded)", "",
            "| method | minutes | what it covers |", "|---|---|---|",
            f"| {main} | {r['minutes'][main]:.2f} | model load, Fisher cost table, ILP pool, "
            f"{r['coa_steps']} steps x K = {r['coa_configs_per_step']}, search; serves any configuration |",
            f"| shared-lora | {r['minutes']['shared-lora']:.2f} | {r['coa_steps']} steps, one target drawn per step |",
            *([f"| coa-no-theta | {r['minutes']['coa-no-theta']:.2f} | CoA-LoRA's {r['coa_steps']} steps replayed "
               "with M = I |"] if "coa-no-theta" in r["minutes"] else []),
            *([f"| qlora | {r['minutes']['qlora']:.2f} | {len(tnames)} x {r['baseline_steps_per_configuration']} "
               "steps (targets only) |"] if "qlora" in r["minutes"] else []),
            *([f"| qlora-gptq | {r['minutes']['qlora-gptq']:.2f} | Σ of the calibration inputs + {len(tnames)} x "
               f"(GPTQ codes + {r['baseline_steps_per_configuration']} steps) |"] if "qlora-gptq" in methods_of(r["rows"]) else []),
            *([f"| qlora-projq | {r['minutes']['qlora-projq']:.2f} | {len(tnames)} x (ProjQ codes + whitened-SVD "
               f"init + {r['baseline_steps_per_configuration']} steps) |"] if "qlora-projq" in methods_of(r["rows"]) else []),
            *([f"| lq-lora | {r['minutes']['lq-lora']:.2f} | {len(tnames)} x (LQ init + "
               f"{r['baseline_steps_per_configuration']} steps) |"] if "lq-lora" in r["minutes"] else []),
            *([f"| qlora-budget | {r['minutes']['qlora-budget']:.2f} | {len(tnames)} x "
               f"{equal_budget_steps(r['baseline_steps_per_configuration'], len(tnames))} steps ({name}'s total, shared) |"]
              if "qlora-budget" in r["minutes"] else []),
            *([f"| lora-fp | {r['minutes']['lora-fp']:.2f} | {r['baseline_steps_per_configuration']} steps on the "
               "unquantized base |"] if "lora-fp" in r["minutes"] else []),
            *([f"| qlora (unseen) | {r['minutes']['qlora (unseen)']:.2f} | {len(r['qlora_unseen'])} x "
               f"{r['baseline_steps_per_configuration']} steps |"] if "qlora (unseen)" in r["minutes"] else []),
            "", f"Evaluation time: {ev}.", ""]
    out += [f"![{metric} vs average bits]({pngs[0]})", ""]
    if len(pngs) > 1:
        out += ["Training loss per step (faint: each step; solid: 5-step moving average). "
                f"{name}'s{' and coa-no-theta' + chr(39) + 's' if 'coa-no-theta' in driven else ''} losses average "
                "K configurations drawn from the training set, which spans the bit "
                "axis, so their level is not comparable with a single low-bit target's; what matters is whether "
                "every curve has flattened.", "", f"![training loss per step]({pngs[1]})", ""]
    return "\n".join(out)



def lr_table(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Jobs that differ only in their learning rate (same model and data) side by side: each method's mean over the
    targets at each rate, marked "(prior)" where a classifier did not leave the no-adapter level (the class prior,
    within one validation example): does any method collapse at some rate?"""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["model"], r["dataset"]), []).append(r)
    out: list[str] = []
    for (model, dataset), jobs in groups.items():
        rates = sorted({j["config"]["training"]["lr"] for j in jobs})
        if len(rates) < 2 or len(rates) != len(jobs):
            continue
        jobs = sorted(jobs, key=lambda j: j["config"]["training"]["lr"])
        metric = jobs[0]["metric"]
        out += [f"## Learning rates: {model} + {dataset} (mean {metric} over the targets)", "",
                "| method | " + " | ".join(f"lr {x:g}" for x in rates) + " |", "|---|" + "---|" * len(rates)]
        for m in methods_of([row for j in jobs for row in j["rows"]]):
            cells = []
            for j in jobs:
                v = j["mean_target"].get(m, float("nan"))
                prior = (metric == "accuracy" and m != "no-adapter" and not math.isnan(v)
                         and abs(v - j["mean_target"]["no-adapter"]) <= 1 / j["config"]["data"]["val_examples"])
                cells.append(_f(v) + (" (prior)" if prior else ""))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def write_markdown(results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], path: Path,
                   pngs: Sequence[Sequence[str]]) -> None:
    """results.md: protocol, settings, each job's tables and figures (``pngs``: each job's, relative to the page),
    and the hand-written discussion from ``meta["notes"]``."""
    r0 = results[0]
    c = r0["config"]
    lines = [
        f"# {' / '.join(dict.fromkeys(DISPLAY[main_method(r)] for r in results))} vs per-configuration fine-tuning "
        f"at CPU scale ({meta['mode']} mode)", "",
        f"Produced by `{meta['command']}` on {meta['machine']}, {meta['date']} "
        f"(total {meta['total_minutes']:.1f} min). Generated by `bench/accuracy/`; do not edit by hand.", "",
        "**Protocol.** CoA-LoRA runs once through the product path (`orchestrator.runs.start_run`: Fisher cost table → "
        "ILP initial pool → rounds of training + BoTorch Pareto search); the same run trains Shared-LoRA once and "
        "evaluates the quantized base without adapters (no-adapter) and replays CoA-LoRA's steps with θ off (M = I: "
        "coa-no-theta, the same training sets, K configurations per step, data order, init and steps, so CoA-LoRA − "
        "coa-no-theta is what θ adds). QLoRA and LQ-LoRA (faithful LQ init: T ≤ "
        f"{r0['bench_options']['lq_iterations']}, best iterate, randomized SVD, Fisher weighting "
        f"{'on' if r0['bench_options']['lq_fisher'] else 'off'}) are trained once per target configuration; "
        "qlora-gptq is QLoRA on GPTQ's codes for the same configurations (same scales and bytes, codes chosen "
        "under each matrix's calibration inputs) and qlora-projq is QLoRA with ProjQ's init (codes shaped so that the "
        "error a rank-r adapter cannot reach is small, then B and A from the whitened SVD of the remaining error; "
        "its factors at LQ-LoRA's rate). "
        "References: qlora-budget is QLoRA at equal total budget (the targets share CoA-LoRA's total steps, "
        "warmup shrunk in proportion) and lora-fp is LoRA trained and evaluated on the unquantized base (the "
        "ceiling; one model, shown at every target). "
        "Every method is evaluated on the same configurations: the ILP allocation at each target budget "
        f"({', '.join(n.split()[1] for n in r0['targets'])} bits) and {len(r0['unseen'])} seeded unseen "
        "configurations between 2.5 and 6 bits (CoA-LoRA and Shared-LoRA without retraining; QLoRA retrained on "
        f"{len(r0['qlora_unseen'])} of them to show the gap). A job of another `adapter.kind` (LoTA-QAF, one plain "
        "LoRA) runs through the same path in CoA-LoRA's place, without coa-no-theta (it has no θ).", "",
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
    lines += lr_table(results)
    if meta.get("notes"):
        lines += ["## Discussion", "", meta["notes"].strip(), ""]
    path.write_text("\n".join(lines) + "\n")



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
            gaps = {f"{prefix}{k}": r[k] for k in ("gap_coa_minus_qlora", "gap_coa_minus_lq_lora")}
            if r.get("paired_jobs"):  # the run's method against the paired job's, over all targets
                pooled = [d for d in r["paired_jobs"]["rows"] if d["configuration"] == "all targets"]
                gaps.update({f"{prefix}paired_jobs_difference_all_targets": d["difference"] for d in pooled})
            tracker.log_metrics({k: v for k, v in gaps.items() if not math.isnan(v)}, step=0)
            for m in methods_of(r["rows"]):
                name = m if len(results) == 1 else f"{r['job']}/{m}"
                child = tracker.child(name)
                client.set_tag(child, "bench.job", r["job"])
                client.set_tag(child, "bench.method", m)
                metric = r["metric"]
                vals = {f"{n.replace(' ', '_')}.{metric}": x[metric] for n in r["targets"] + r["unseen"]
                        for x in r["rows"] if x["method"] == m and x["configuration"] == n}
                vals.update({f"mean_target_{metric}": r["mean_target"][m], "train_minutes": r["minutes"][m]})
                if m in r["hypervolume_targets"]:
                    vals["hypervolume_targets"] = r["hypervolume_targets"][m]
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



def describe_processes(results: Sequence[Mapping[str, Any]]) -> str:
    """How the jobs ran, for the report: in-process or on N Ray workers (from their resolved configurations)."""
    def one(cluster: Mapping[str, Any]) -> str:
        return "in one process" if cluster["executor"] == "local" else f"{cluster['workers']} Ray worker process(es)"
    return " / ".join(sorted({one(r["config"]["cluster"]) for r in results}))
