"""How fast CoA-LoRA serves a new configuration, and what re-quantization costs inside a training step.

On SmolLM2-135M (the packaged GGUF, all 7 projections of every layer wrapped):
1. adapter for a new configuration = one batched θ call for all N matrices + folding M into A (A' = M·A);
   median of 20 fresh random configurations (target ≤ 50 ms on CPU);
2. a training step (K = 1, batch 8×64) split into re-quantization and forward/backward, with the quantized-weight
   cache cold (a configuration never seen) and warm (seen before; target: re-quantization ≤ 10% of the step).

Prints a table; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from search.space import SearchSpace  # noqa: E402
from workers.adapters.coa import CoAModel  # noqa: E402
from workers.export.peft import folded_adapter  # noqa: E402
from workers.models import load_model, resolve_model  # noqa: E402
from workers.training import compute_gradients  # noqa: E402

RANK = 16
SEED = 0


def random_configuration(space: SearchSpace, n: int, generator: torch.Generator) -> list:
    idx = torch.randint(0, space.n_settings, (n,), generator=generator)
    return [space.settings[int(i)] for i in idx]


def requantize(coa: CoAModel, configuration: list) -> float:
    """Seconds to quantize every layer's W under ``configuration`` into its packed form (cache hits cost a
    lookup; the dense W_q is decoded inside each matmul, which the step time includes)."""
    start = time.perf_counter()
    for layer, setting in zip(coa.layers, configuration):
        layer.packed_weight(setting)
    return time.perf_counter() - start


def main() -> None:
    # One thread by default: on a shared 2-core machine two threads spin against other work (measured 8x slower
    # backward); set BENCH_THREADS to compare.
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    torch.manual_seed(SEED)
    space = SearchSpace.default()
    t0 = time.perf_counter()
    model = load_model(resolve_model("smollm2"), task="causal-lm")
    load_s = time.perf_counter() - t0
    coa = CoAModel(model, space, rank=RANK, alpha=2.0 * RANK, seed=SEED)
    n = len(coa.registry)
    generator = torch.Generator().manual_seed(SEED)

    adapt_ms = []
    for _ in range(21):
        configuration = random_configuration(space, n, generator)
        start = time.perf_counter()
        folded_adapter(coa, configuration)
        adapt_ms.append(1000 * (time.perf_counter() - start))
    adapt_ms = adapt_ms[1:]  # the first call pays one-off allocator / dispatch warm-up

    ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    configuration = random_configuration(space, n, generator)
    state = {k: v for k, v in coa.named_parameters() if v.requires_grad}
    cold_quant = requantize(coa, configuration)
    warm_quant, steps = [], []
    for _ in range(3):
        warm_quant.append(requantize(coa, configuration))
        start = time.perf_counter()
        compute_gradients(coa, state, batch, [configuration])
        steps.append(time.perf_counter() - start)
    step_s = statistics.median(steps)  # includes the (warm) cache lookups
    warm_s = statistics.median(warm_quant)
    cold_share = cold_quant / (cold_quant + step_s)
    warm_share = warm_s / step_s

    figures = {
        "model": "smollm2-135m",
        "n_matrices": n,
        "rank": RANK,
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "adapter_ms_median": round(statistics.median(adapt_ms), 2),
        "adapter_ms_max": round(max(adapt_ms), 2),
        "step_fwd_bwd_s": round(step_s, 3),
        "requant_cold_s": round(cold_quant, 3),
        "requant_warm_s": round(warm_s, 6),
        "requant_share_cold": round(cold_share, 4),
        "requant_share_warm": round(warm_share, 6),
    }
    rows = [
        ("model load (GGUF)", f"{load_s:.1f} s"),
        (f"adapter for a new configuration (θ for {n} matrices + fold), median of 20", f"{figures['adapter_ms_median']} ms"),
        ("  max of 20", f"{figures['adapter_ms_max']} ms"),
        ("training step K=1, batch 8×64: forward/backward (median of 3)", f"{step_s:.2f} s"),
        ("re-quantization, cache cold (new configuration)", f"{cold_quant:.2f} s ({100 * cold_share:.1f}% of step)"),
        ("re-quantization, cache warm", f"{1000 * warm_s:.3f} ms ({100 * warm_share:.3f}% of step)"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
