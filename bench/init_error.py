"""How much quantization error each adapter init removes before any training (issue 17: "the error-compensation
loss at step 0 for each init"; projq.md §4's shared-B caveat, measured to choose β).

A packaged model's target matrices, real calibration inputs (Σ = XᵀX/N of each matrix's inputs on ``--calibration``
training examples of its corpus, gathered as a run gathers them), and a set of uniform configurations (every matrix
at one NF code and first-level block, 8-bit scales). For each init and configuration k the whitened error left at
step 0, ‖(W − Q_k − ΔW_k)·Y‖² with Y·Yᵀ = Σ (the layer's output error on those inputs), is divided by a
zero-initialised adapter's on round-to-nearest codes, ‖(W − Q_k^RTN)·Y‖², and averaged over matrices. 1.0 removes
nothing; lower is better.

Table 1, every target matrix, round-to-nearest codes:
  svd_of_W            B·A = rank-r SVD of W, base quant(W − B·A) (LQ-LoRA/LoftQ's one-step form; coalora's svd_of_W)
  lq-shared           B·A = one L for the space's code widths by LQ-LoRA's alternation, weighted by the Fisher of
                      ``--fisher`` training examples (adapter.init: lq-shared as a run computes it), base quant(W − B·A)
  projq (own)         each configuration's own whitened SVD of its error: one adapter per configuration, the best any
                      rank-r adapter can do on these codes (J_r); QLoRA with ProjQ's init, without noise shaping
  shared, exact cores projq-shared's limit: one (U, V) for the set, each configuration's best r×r core inside it
  shared, M = I       projq-shared's factors with M = I: what a plain shared LoRA (or θ at M = I) starts from
  shared, θ fitted    projq-shared as a run starts: θ fitted to the cores (``--prefit-steps`` Adam steps)
Table 2, the matrices of block ``--gptq-block``: the same on GPTQ codes (zero_B there is GPTQ's own error), per-
configuration ProjQ with noise shaping (3 iterations), and projq.md's B2 (the set's codes re-chosen by GPTQ under one
shared projected Hessian Y(I − β·V_s·V_sᵀ)Yᵀ, 2 passes, then the shared init) at β = 0.25 and 1.

    .venv/bin/python bench/init_error.py --model minilm --out bench-out/init-error

The last line is one JSON object. MiniLM: about 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from search.space import QuantSetting, SearchSpace  # noqa: E402
from workers.calibration import coa_covariances  # noqa: E402
from workers.adapters.coa import CoAModel  # noqa: E402
from workers.data.packaged import packaged_source  # noqa: E402
from workers.fisher import layer_fisher  # noqa: E402
from workers.adapters.lora import truncated_svd_factors  # noqa: E402
from workers.init.lq import apply_shared_lq  # noqa: E402
from workers.init.projq import (  # noqa: E402
    apply_shared_init,
    projected_hessian,
    projq_quantize,
    shared_init,
    shared_subspace,
    uncorrectable_error,
    whitening,
)
from workers.quant.blockwise import dequantize, fake_quantize  # noqa: E402
from workers.quant.gptq import gptq_quantize  # noqa: E402
from workers.tasks import build_source_task  # noqa: E402

MODELS = {"minilm": ("reviews", "classification", "conf/space/default.yaml"),
          "smollm2": ("shakespeare", "causal-lm", "conf/space/default.yaml")}
CODES = ("nf2", "nf3", "nf4")
BLOCKS = (32, 64)
B2_PASSES = 2


def configurations() -> list[QuantSetting]:
    return [QuantSetting(code, 8, "fp32", block, 256) for code in CODES for block in BLOCKS]


Rows = dict[str, dict[str, list[float]]]
"""init row → setting code → one ratio per (matrix, configuration)."""


def _add(rows: Rows, row: str, setting: QuantSetting, value: float) -> None:
    rows.setdefault(row, {}).setdefault(setting.code, []).append(value)


def whitened_ratio(residual: torch.Tensor, y: torch.Tensor, reference: float) -> float:
    return float((residual.double() @ y).square().sum()) / reference


def build(model_name: str, calibration: int, fisher_examples: int, rank: int,
          seed: int) -> tuple[CoAModel, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The packaged model wrapped as a run wraps it (zero-B layers, θ unanchored), Σ of every target, and every
    target's diagonal Fisher on the first ``fisher_examples`` training examples (as a worker estimates it)."""
    corpus, kind, space_file = MODELS[model_name]
    task = build_source_task(model_name, *packaged_source(corpus), n_train=max(calibration, fisher_examples),
                             n_validation=8, batch_size=16, max_length=64, seed=seed)
    model = CoAModel(task.model, SearchSpace.from_yaml(space_file), rank=rank, alpha=2 * rank, seed=seed).eval()
    items = list(task.train_loader.dataset)
    collate = task.train_loader.collate_fn
    covariances = coa_covariances(model, [collate(items[i:i + 16]) for i in range(0, calibration, 16)])
    fisher = layer_fisher(model, [collate([item]) for item in items[:fisher_examples]], fisher_examples)
    return model, covariances, fisher


def every_matrix(model: CoAModel, covariances: dict[str, torch.Tensor], settings: list[QuantSetting],
                 prefit_steps: int, seed: int, fisher: dict[str, torch.Tensor] | None = None) -> Rows:
    """Table 1: rows → setting code → per-(matrix, configuration) ratios, on round-to-nearest codes."""
    rows: Rows = {}
    add = partial(_add, rows)
    configs = [[s] * len(model.layers) for s in settings]
    references: dict[tuple[str, QuantSetting], float] = {}
    lq_model = copy.deepcopy(model)  # lq-shared exactly as a worker computes it, on a copy
    apply_shared_lq([lq_model], model.space, model.rank, fisher=fisher, seed=seed)
    lq_low = {layer.name: (layer.scaling * layer.lora_B @ layer.lora_A).detach() for layer in lq_model.layers}
    del lq_model
    for layer in model.layers:  # the closed-form rows, before the init changes B and A
        w = layer.weight.detach()
        y, _ = whitening(covariances[layer.name])
        l1, l2 = truncated_svd_factors(w, layer.rank)
        low = lq_low[layer.name]
        errors = []
        for s in settings:
            error = w - fake_quantize(w, s)
            references[layer.name, s] = float((error.double() @ y).square().sum())
            errors.append(error)
            add("zero_B", s, 1.0)
            add("svd_of_W", s, whitened_ratio((w - l1 @ l2) - fake_quantize(w - l1 @ l2, s), y,
                                              references[layer.name, s]))
            add("lq-shared", s, whitened_ratio((w - low) - fake_quantize(w - low, s), y, references[layer.name, s]))
            add("projq (own)", s, uncorrectable_error(error, y, layer.rank) / references[layer.name, s])
        sub = shared_subspace(errors, y, layer.rank)
        for s, left in zip(settings, (sub.residual() / sub.energy).tolist()):
            add("shared, exact cores", s, left)
    stats = apply_shared_init(model, configs, covariances, fit_steps=prefit_steps, seed=seed)
    with torch.no_grad():
        for s, config in zip(settings, configs):
            mixing = model.mixing_matrices(model.resolve(config))
            for n, layer in enumerate(model.layers):
                w, b, a = layer.weight.detach(), layer.lora_B.detach(), layer.lora_A.detach()
                y, _ = whitening(covariances[layer.name])
                error = w - layer.quantized_weight(s)
                add("shared, M = I", s, whitened_ratio(error - layer.scaling * b @ a, y, references[layer.name, s]))
                add("shared, θ fitted", s, whitened_ratio(error - layer.scaling * b @ mixing[n] @ a, y,
                                                          references[layer.name, s]))
    fitted = statistics.fmean(v for vs in rows["shared, θ fitted"].values() for v in vs)
    if abs(fitted - stats["init_error_fitted"]) > 1e-3 * max(fitted, 1e-12):  # the run's own report must agree
        raise AssertionError(f"apply_shared_init reported {stats['init_error_fitted']}, measured {fitted}")
    return rows


def one_block(model: CoAModel, covariances: dict[str, torch.Tensor], settings: list[QuantSetting],
              block: int) -> Rows:
    """Table 2: GPTQ codes, per-configuration ProjQ, and B2 at two β, on block ``block``'s matrices."""
    rows: Rows = {}
    add = partial(_add, rows)
    def shared_rows(name: str, w: torch.Tensor, quantized: list[torch.Tensor], y: torch.Tensor,
                    y_inv: torch.Tensor, scaling: float, rank: int, refs: list[float]) -> None:
        sub = shared_subspace([w - q for q in quantized], y, rank)
        init = shared_init(sub, y_inv, scaling)
        delta = scaling * init.lora_B @ init.lora_A
        for s, q, ref, left in zip(settings, quantized, refs, sub.residual().tolist()):
            add(f"{name}, exact cores", s, left / ref)
            add(f"{name}, M = I", s, whitened_ratio(w - q - delta, y, ref))

    blocks = model.registry.blocks()
    for layer, layer_block in zip(model.layers, blocks):
        if layer_block != block:
            continue
        w, sigma, r = layer.weight.detach(), covariances[layer.name], layer.rank
        y, y_inv = whitening(sigma)
        refs = [float(((w - fake_quantize(w, s)).double() @ y).square().sum()) for s in settings]
        gptq = [dequantize(gptq_quantize(w, s, sigma)) for s in settings]
        for s, q, ref in zip(settings, gptq, refs):
            add("gptq, zero_B", s, whitened_ratio(w - q, y, ref))
            add("gptq, own whitened SVD", s, uncorrectable_error(w - q, y, r) / ref)
            shaped = dequantize(projq_quantize(w, s, sigma, r, iterations=3).packed)
            add("projq noise shaping (own)", s, uncorrectable_error(w - shaped, y, r) / ref)
        shared_rows("gptq + shared", w, gptq, y, y_inv, layer.scaling, r, refs)
        for beta in (0.25, 1.0):
            quantized = gptq
            for _ in range(B2_PASSES):
                weights = [1.0 / float(((w - q).double() @ y).square().sum()) for q in quantized]
                stacked = torch.cat([(w - q).double() * wk**0.5 for q, wk in zip(quantized, weights)])
                h = projected_hessian(stacked, y, r, beta)
                quantized = [dequantize(gptq_quantize(w, s, h)) for s in settings]
            shared_rows(f"B2 β={beta:g} + shared", w, quantized, y, y_inv, layer.scaling, r, refs)
    return rows


def summarise(rows: Rows) -> dict[str, dict[str, float]]:
    return {row: {**{code: round(statistics.fmean(v), 4) for code, v in by.items()},
                  "mean": round(statistics.fmean(x for v in by.values() for x in v), 4)} for row, by in rows.items()}


def print_table(title: str, table: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}\n| init | " + " | ".join(CODES) + " | mean |\n|---|" + "---|" * (len(CODES) + 1))
    for row, by in table.items():
        print(f"| {row} | " + " | ".join(f"{by[c]:.3f}" for c in CODES) + f" | {by['mean']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="minilm")
    ap.add_argument("--calibration", type=int, default=128, help="training examples whose inputs give Σ")
    ap.add_argument("--fisher", type=int, default=32, help="training examples whose Fisher weights lq-shared")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prefit-steps", type=int, default=300)
    ap.add_argument("--gptq-block", type=int, default=1, help="the block whose matrices Table 2 covers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-out/init-error"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, covariances, fisher = build(args.model, args.calibration, args.fisher, args.rank, args.seed)
    settings = configurations()
    every = summarise(every_matrix(model, covariances, settings, args.prefit_steps, args.seed, fisher))
    block = summarise(one_block(model, covariances, settings, args.gptq_block))
    print_table(f"{args.model}: all {len(model.layers)} target matrices, round-to-nearest codes "
                f"(block 32 and 64 averaged per code)", every)
    print_table(f"{args.model}: block {args.gptq_block}'s matrices, GPTQ codes and noise shaping", block)
    result = {"model": args.model, "rank": args.rank, "calibration_examples": args.calibration,
              "configurations": [str(s) for s in settings], "minutes": round((time.perf_counter() - started) / 60, 1),
              "all_matrices_rtn": every, f"block{args.gptq_block}_gptq": block}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.model}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
