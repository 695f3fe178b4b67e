"""Quantizer speed: coalora's fused kernels vs bitsandbytes, vs its own torch reference path, vs a plain copy.

Three tables, each measured with the functions of a row interleaved (A, B, A, B, ...) so machine noise hits both
alike; medians reported:

1. NF4 as QLoRA stores it (8-bit scales, fp32 second level, B0=64, B1=256) on one SIZE² fp32 matrix, at 1 and 2
   threads: coalora ``quantize`` vs bitsandbytes ``quantize_4bit(nf4, compress_statistics=True)``, coalora
   ``dequantize`` vs ``dequantize_4bit``, and dequantize vs a torch copy of the same fp32 output bytes (the
   memory-bound ceiling). Ratios > 1 mean coalora is faster.
2. Every code family of the shipped spaces (NF2..NF8, INT2..INT8), fused vs reference, fake-quantize / quantize /
   dequantize, at 1 and 2 threads.
3. The table-1 NF4 row at 2 threads while another process keeps one core busy (the case a shared machine or a
   co-located worker creates).

With ``--device cuda`` the fused kernels are Triton's (workers/quant/fused_triton.py) and bitsandbytes runs its CUDA
kernels: one row per table (CPU threads do not matter there), every timing synchronised.

The last line is one JSON object of every figure.

    python bench/quant.py [--size 4096] [--repeats 9] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the packages, not bench/search.py

import torch  # noqa: E402

from search.space import QuantSetting  # noqa: E402
from workers.quant import blockwise  # noqa: E402

from timing import interleaved  # noqa: E402  (bench/timing.py)

QLORA_NF4 = QuantSetting("nf4", 8, "fp32", 64, 256)
CODES = ("nf2", "nf3", "nf4", "nf5", "nf6", "nf8", "int2", "int3", "int4", "int8")
THREADS = (1, 2)


@contextmanager
def threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def busy_core() -> Iterator[None]:
    """A second process spinning on one core for the duration of the block."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    return {name: 1e3 * s for name, s in interleaved(fns, repeats).items()}


def versus_bitsandbytes(w: torch.Tensor, repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Table 1's figures at the current thread count."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' import-time notices
        import bitsandbytes.functional as bnbf

    packed = blockwise.quantize(w, QLORA_NF4)
    bnb_q, bnb_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)

    def timed(fn: Callable[[], object]) -> Callable[[], object]:
        return lambda: (fn(), sync())

    q = interleaved_ms({"coalora": timed(lambda: blockwise.quantize(w, QLORA_NF4)),
                     "bnb": timed(lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                              compress_statistics=True))}, repeats)
    d = interleaved_ms({"coalora": timed(packed.dequantize),
                     "bnb": timed(lambda: bnbf.dequantize_4bit(bnb_q, bnb_state)),
                     "copy": timed(w.clone)}, repeats)
    return {"quantize_ms": q["coalora"], "bnb_quantize_ms": q["bnb"], "dequantize_ms": d["coalora"],
            "bnb_dequantize_ms": d["bnb"], "copy_ms": d["copy"],
            "quantize_vs_bnb": q["bnb"] / q["coalora"], "dequantize_vs_bnb": d["bnb"] / d["coalora"],
            "dequantize_vs_copy": d["copy"] / d["coalora"],
            "dequantize_GBps": w.numel() * 4 / d["coalora"] / 1e6}


def fused_vs_reference(w: torch.Tensor, code: str, repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Table 2's row for one code family (8-bit scales, fp32 second level, B0=64, B1=256)."""
    s = QuantSetting(code, 8, "fp32", 64, 256)
    packed = blockwise.quantize(w, s)
    ops = {
        "fake_fused": lambda: blockwise.fake_quantize(w, s),
        "fake_reference": lambda: blockwise.fake_quantize(w, s, reference=True),
        "quantize_fused": lambda: blockwise.quantize(w, s),
        "quantize_reference": lambda: blockwise.quantize(w, s, reference=True),
        "dequantize_fused": lambda: blockwise.dequantize(packed),
        "dequantize_reference": lambda: blockwise.dequantize(packed, reference=True),
    }
    ms = interleaved_ms({name: (lambda fn=fn: (fn(), sync())) for name, fn in ops.items()}, repeats)
    return {**ms, **{f"{op}_speedup": ms[f"{op}_reference"] / ms[f"{op}_fused"]
                     for op in ("fake", "quantize", "dequantize")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--family-size", type=int, default=2048, help="matrix side for table 2")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(args.size, args.size, generator=generator).to(args.device)
    small = torch.randn(args.family_size, args.family_size, generator=generator).to(args.device)
    sync = torch.cuda.synchronize if w.is_cuda else (lambda: None)
    figures: dict[str, object] = {"bench": "quant", "device": args.device, "size": args.size,
                                  "family_size": args.family_size, "repeats": args.repeats,
                                  "cpu": platform.processor() or platform.machine(), "nf4": {}, "families": {}}

    print(f"1. NF4 double-quant on {args.size}x{args.size} fp32 ({args.device}), median of {args.repeats}")
    print(f"{'threads':<12} {'quant ms':>9} {'bnb':>8} {'ratio':>6} {'dequant ms':>11} {'bnb':>8} {'ratio':>6} "
          f"{'copy ms':>8} {'vs copy':>8}")
    # on a GPU the CPU thread count and a busy core do not matter: one row, Triton's kernels against bitsandbytes'
    rows = [("cuda", 1, False)] if w.is_cuda else [(f"{n}", n, False) for n in THREADS] + [("2 + busy", 2, True)]
    for label, n, loaded in rows:
        with threads(n), (busy_core() if loaded else _nothing()):
            r = versus_bitsandbytes(w, args.repeats, sync)
        figures["nf4"][label] = {k: round(v, 3) for k, v in r.items()}
        print(f"{label:<12} {r['quantize_ms']:>9.1f} {r['bnb_quantize_ms']:>8.1f} {r['quantize_vs_bnb']:>5.2f}x "
              f"{r['dequantize_ms']:>11.1f} {r['bnb_dequantize_ms']:>8.1f} {r['dequantize_vs_bnb']:>5.2f}x "
              f"{r['copy_ms']:>8.1f} {r['dequantize_vs_copy']:>7.2f}x")

    print(f"\n2. fused vs reference, {args.family_size}x{args.family_size}, ms (speed-up)")
    print(f"{'code':<6} {'threads':>7} {'fake-quantize':>20} {'quantize':>20} {'dequantize':>20}")
    for code in CODES:
        for n in (1,) if w.is_cuda else THREADS:
            with threads(n):
                r = fused_vs_reference(small, code, args.repeats, sync)
            figures["families"][f"{code}/{n}"] = {k: round(v, 3) for k, v in r.items()}
            cells = [f"{r[f'{op}_fused']:.1f} ({r[f'{op}_speedup']:.1f}x)" for op in ("fake", "quantize", "dequantize")]
            print(f"{code:<6} {n:>7} " + " ".join(f"{c:>20}" for c in cells))
    print(json.dumps(figures))


@contextmanager
def _nothing() -> Iterator[None]:
    yield


if __name__ == "__main__":
    main()
