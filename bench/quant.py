"""Quantizer speed, side by side with bitsandbytes, on one 4096x4096 fp32 matrix.

Pairs compared (runs interleaved A, B, A, B, ... so machine noise hits both alike; medians reported):
  * quantize:   coalora ``quantize`` (NF4, QLoRA setting: 8-bit scales, fp32 second level, B0=64, B1=256)
                vs bitsandbytes ``quantize_4bit(nf4, blocksize=64, compress_statistics=True)``, the same double
                quantization; and coalora vs bitsandbytes without double quantization.
  * dequantize: coalora ``dequantize`` vs bitsandbytes ``dequantize_4bit`` on the results above.
  * throughput: coalora dequantize vs a plain torch copy of the same fp32 output bytes (the memory-bound ceiling).
Ratios > 1 mean coalora is faster. The last line is one JSON object of the figures.

    python bench/quant.py [--size 4096] [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the packages, not bench/search.py

import torch

from search.space import QuantSetting
from workers.quant import blockwise


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, running them in turn ``repeats`` times after one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    w = torch.randn(args.size, args.size, device=args.device)
    setting = QuantSetting("nf4", 8, "fp32", 64, 256)
    packed = blockwise.quantize(w, setting)
    bnb_dq, bnb_dq_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    bnb_plain, bnb_plain_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    out_bytes = w.numel() * 4
    sync = torch.cuda.synchronize if w.is_cuda else (lambda: None)

    def timed(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            r = fn()
            sync()
            return r

        return run

    q = interleaved(
        {
            "coalora_quantize": timed(lambda: blockwise.quantize(w, setting)),
            "bnb_quantize_dq": timed(lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)),
            "bnb_quantize": timed(lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)),
        },
        args.repeats,
    )
    d = interleaved(
        {
            "coalora_dequantize": timed(packed.dequantize),
            "bnb_dequantize_dq": timed(lambda: bnbf.dequantize_4bit(bnb_dq, bnb_dq_state)),
            "bnb_dequantize": timed(lambda: bnbf.dequantize_4bit(bnb_plain, bnb_plain_state)),
            "torch_copy": timed(w.clone),
        },
        args.repeats,
    )
    ms = {k: v * 1e3 for k, v in {**q, **d}.items()}
    figures = {
        "bench": "quant",
        "device": args.device,
        "shape": [args.size, args.size],
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "ms": {k: round(v, 2) for k, v in ms.items()},
        "quantize_speedup_vs_bnb_double_quant": round(ms["bnb_quantize_dq"] / ms["coalora_quantize"], 3),
        "quantize_speedup_vs_bnb": round(ms["bnb_quantize"] / ms["coalora_quantize"], 3),
        "dequantize_speedup_vs_bnb_double_quant": round(ms["bnb_dequantize_dq"] / ms["coalora_dequantize"], 3),
        "dequantize_speedup_vs_bnb": round(ms["bnb_dequantize"] / ms["coalora_dequantize"], 3),
        "dequantize_GBps": round(out_bytes / d["coalora_dequantize"] / 1e9, 2),
        "copy_GBps": round(out_bytes / d["torch_copy"] / 1e9, 2),
        "dequantize_vs_copy": round(d["torch_copy"] / d["coalora_dequantize"], 3),
        "coalora_packed_bytes": packed.nbytes,
    }
    print(f"{args.size}x{args.size} fp32 on {args.device}, {figures['threads']} threads, median of {args.repeats}")
    print(f"{'operation':<24} {'ms':>9}")
    for name, value in ms.items():
        print(f"{name:<24} {value:>9.2f}")
    print(f"quantize   speed-up vs bnb (double quant / plain): {figures['quantize_speedup_vs_bnb_double_quant']}x / "
          f"{figures['quantize_speedup_vs_bnb']}x")
    print(f"dequantize speed-up vs bnb (double quant / plain): {figures['dequantize_speedup_vs_bnb_double_quant']}x / "
          f"{figures['dequantize_speedup_vs_bnb']}x")
    print(f"dequantize {figures['dequantize_GBps']} GB/s of output vs torch copy {figures['copy_GBps']} GB/s "
          f"({figures['dequantize_vs_copy']}x of copy speed)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
