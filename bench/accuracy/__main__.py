"""``python -m bench.accuracy``: run the jobs of a bench YAML (or re-render saved results); the last stdout line is
one JSON object with the headline figures."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # also run as `python bench/accuracy`

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load, save  # noqa: E402

from bench.accuracy import __doc__ as DOC  # noqa: E402
from bench.accuracy.jobs import (BENCH_DIR, ROOT, check_pairing, job_config, job_key, job_methods, job_seeds, load_bench,  # noqa: E402
                                 own_seed, run_job)
from bench.accuracy.report import TOLERANCE, describe_processes, figures, log_mlflow, write_markdown  # noqa: E402
from bench.accuracy.stats import contrasts, headline, mean_scores, methods_of, paired_across_jobs, pool_seeds  # noqa: E402
from orchestrator.loop import report  # noqa: E402
from orchestrator.state import write_atomic, write_json_atomic  # noqa: E402


def _fingerprint(job: dict[str, Any], overrides: Sequence[str], seed: int | None) -> str:
    """What one run of a job depends on that the command line can change: its YAML entry, the overrides, the seed.
    Not ``bench.seeds``: which other seeds the job pools does not change this seed's run, so a job extended from
    seeds [0, 1] to [0, 1, 2] (or cut back) reuses the seeds it has; nor ``bench.contrasts``, read off the scores."""
    bench = {k: v for k, v in (job.get("bench") or {}).items() if k not in ("seeds", "contrasts")}
    return json.dumps({"job": {**job, "bench": bench}, "overrides": list(overrides), "seed": seed}, sort_keys=True,
                      default=str)


def save_job(res_dir: Path, key: str, fingerprint: str, result: dict[str, Any],
             scores: Mapping[tuple[str, str], np.ndarray], minutes: float) -> None:
    """A finished run of a job, at once (``jobs/<key>.json`` and its per-example scores beside it): a full run that
    is cut short (a lost machine, a session's end) resumes from its finished runs instead of starting over."""
    tensors = {f"{m}|{c}": torch.from_numpy(np.array(v, copy=True)) for (m, c), v in scores.items()}  # lora-fp's
    # one array stands at every target: copies, since safetensors refuses shared memory
    write_atomic(res_dir / "jobs" / f"{key}.safetensors", save(tensors))
    record = {"fingerprint": fingerprint, "minutes": minutes, "result": result}
    write_atomic(res_dir / "jobs" / f"{key}.json", (json.dumps(record, indent=1, default=str) + "\n").encode())


def finished_job(res_dir: Path, key: str, fingerprint: str, log) -> tuple[dict, dict, float] | None:
    """(result, per-example scores, minutes) of run ``key`` when ``res_dir`` holds it for the same fingerprint;
    None otherwise (a saved run with other settings is named and left to be replaced)."""
    path = res_dir / "jobs" / f"{key}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    stored = json.loads(record["fingerprint"])  # recomputed: a record saved before a rule changed still matches
    if _fingerprint(stored["job"], stored["overrides"], stored["seed"]) != fingerprint:
        log(f"[{key}] {path} was run with other settings: running it again")
        return None
    saved = load(path.with_suffix(".safetensors").read_bytes())
    scores = {tuple(k.split("|", 1)): v.numpy() for k, v in saved.items()}
    log(f"[{key}] finished before ({record['minutes']:.1f} min): reusing {path} (--fresh to re-run)")
    return record["result"], scores, float(record["minutes"])


def run_or_reuse(job: dict[str, Any], args: argparse.Namespace, res_dir: Path, work: Path, uri: str, log
                 ) -> tuple[dict[str, Any], dict[tuple[str, str], np.ndarray], float, list[tuple[dict, dict]]]:
    """A job's result and per-example scores (pooled over its seeds when it has several), its minutes and each
    seed's (result, scores), reusing finished runs."""
    runs, minutes = [], 0.0
    for seed in job_seeds(job):
        key, fingerprint = job_key(job, seed), _fingerprint(job, args.override, seed)
        saved = None if args.fresh else finished_job(res_dir, key, fingerprint, log)
        if saved is None and not args.fresh and seed is not None and seed == own_seed(job, args.override):
            # the job run once (no bench.seeds) is this seed's run under another name: same seed, same held-out
            # examples (job_config), so a single run extended to several seeds reuses it as its own seed's
            saved = finished_job(res_dir, job_key(job, None), _fingerprint(job, args.override, None), log)
        if saved is None:
            t0 = time.perf_counter()
            result, scores = run_job(job, args.override, work, uri, log, seed)
            took = (time.perf_counter() - t0) / 60
            save_job(res_dir, key, fingerprint, result, scores, took)
            saved = (result, scores, took)
        runs.append(saved[:2])
        minutes += saved[2]
    scores = mean_scores([s for _, s in runs])
    if len(runs) == 1:
        return runs[0][0], scores, minutes, runs
    return pool_seeds(runs, str(job["name"])), scores, minutes, runs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=DOC.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="conf/bench/quick.yaml: MiniLM + reviews, < 15 min on 2 CPUs")
    ap.add_argument("--config", type=Path, help="bench YAML (default conf/bench/full.yaml, or quick.yaml with --quick)")
    ap.add_argument("--out", type=Path, help="output directory (default docs/, or docs/quick/ with --quick)")
    ap.add_argument("--tracking-uri", help="MLflow URI (default MLFLOW_TRACKING_URI, else sqlite under --out)")
    ap.add_argument("--override", action="append", default=[], metavar="section.key=value",
                    help="applied to every job's run configuration (repeatable)")
    ap.add_argument("--jobs", help="comma-separated job names to run (default: all of the file)")
    ap.add_argument("--fresh", action="store_true",
                    help="re-run every job even where --out holds its finished result for the same job and overrides")
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
        pngs = [figures(r, out / "results") for r in saved["jobs"]]
        write_markdown(saved["jobs"], saved["meta"], out / "results.md", [[str(p.relative_to(out)) for p in ps] for ps in pngs])
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
    by_name = {j["name"]: j for j in bench["jobs"]}
    for job in jobs:  # validate every job (at each of its seeds) and every pairing before any compute
        for seed in job_seeds(job):
            cfg, opts = job_config(job, args.override, work, uri, seed)
            evaluated = job_methods(cfg, opts)
            unknown = {m for pair in opts["contrasts"] or [] for m in pair} - set(evaluated)
            if unknown:
                raise SystemExit(f"job {job['name']}: bench.contrasts names {sorted(unknown)}, which the job does not "
                                 f"evaluate (it evaluates {evaluated})")
            other = job.get("bench", {}).get("paired_with")
            if other is not None:
                if other not in {j["name"] for j in jobs}:
                    raise SystemExit(f"job {job['name']} is paired with job {other}: add it to --jobs (its finished "
                                     "runs under --out are reused, not run again)")
                check_pairing(job, cfg, by_name[other], job_config(by_name[other], args.override, work, uri, seed)[0])

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    results, minutes, scores, seed_runs = [], [], {}, {}
    for job in jobs:
        result, scores[job["name"]], took, seed_runs[job["name"]] = run_or_reuse(job, args, res_dir, work, uri, log)
        results.append(result)
        minutes.append(took)
    done = {j["name"]: r for j, r in zip(jobs, results)}
    for job, result in zip(jobs, results):
        other = job.get("bench", {}).get("paired_with")
        if job.get("bench", {}).get("contrasts"):
            result["contrasts"] = contrasts(job["bench"]["contrasts"], scores[job["name"]], seed_runs[job["name"]],
                                            result["metric"])
        if other is not None:
            result["paired_jobs"] = paired_across_jobs(result, scores[job["name"]], done[other], scores[other],
                                                       zip(seed_runs[job["name"]], seed_runs[other]))
    total = sum(minutes)
    cmd_args = [a for a in (sys.argv[1:] if argv is None else list(argv))]
    meta = {
        "mode": mode, "stamp": stamp, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([".venv/bin/python -m bench.accuracy", *cmd_args]),
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                   f"{describe_processes(results)}, 1 torch thread each, no GPU",
        "total_minutes": total, "tolerance": TOLERANCE, "config_file": str(path),
    }
    pngs = [figures(r, res_dir) for r in results]
    raw = res_dir / "accuracy.json"
    raw.write_text(json.dumps({"meta": meta, "jobs": results}, indent=1, default=str) + "\n")
    md = out / "results.md"
    write_markdown(results, meta, md, [[str(p.relative_to(out)) for p in ps] for ps in pngs])
    parent = log_mlflow(uri, results, meta, [md, raw, *(p for ps in pngs for p in ps)])
    for r in results:
        print()
        print(f"== {r['job']} ({r['metric']}) ==")
        tnames = r["targets"]
        table = []
        for m in methods_of(r["rows"]):
            by = {x["configuration"]: x[r["metric"]] for x in r["rows"] if x["method"] == m}
            row = {"method": m, **{n.split()[1]: by.get(n, float("nan")) for n in tnames}, "mean": r["mean_target"][m],
                   "unseen": r["unseen_mean"].get(m, float("nan")), "HV": r["hypervolume_targets"].get(m, float("nan")),
                   "train_min": r["minutes"][m]}
            table.append(row)
        print(report.text_table(table, ["method", *[n.split()[1] for n in tnames], "mean", "unseen", "HV", "train_min"]))
    print(f"\nwrote {md}, {raw}, {', '.join(str(p) for ps in pngs for p in ps)}; MLflow {uri} parent run {parent}")
    head = headline(results, mode, total)
    head["mlflow_parent_run"] = parent
    print(json.dumps(head, sort_keys=True))
    return head


if __name__ == "__main__":
    main()
