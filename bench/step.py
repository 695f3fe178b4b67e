"""What a CoA-LoRA training step costs per configuration, next to a PEFT LoRA step and a QLoRA-style step.

On the packaged models (MiniLM: sequence classification, batch 16×64; SmolLM2: causal LM, batch 8×64), one
fixed batch, rank 16 on every target matrix, forward + backward to the trainable tensors:

* ``peft``: PEFT LoRA on the fp32 model (the speed and memory reference);
* ``qlora``: PEFT LoRA on the bitsandbytes NF4 double-quantized model (QLoRA's set-up; on a CPU bitsandbytes
  dequantizes each 4-bit matrix in every forward and backward);
* ``coa-warm-K``: a CoA-LoRA step over K configurations whose quantized weights are already cached, per
  configuration (step time / K);
* ``coa-cold-K``: the same for K configurations never seen before (every matrix is quantized in the step).

Timing: all variants in one process, interleaved (A, B, C, ... repeated), medians. Memory: one process per
variant, peak RSS of that process: ``peft``, ``qlora``, ``coa`` (the default job's K = 2, warm and cold steps, the
default cache, started as a Ray worker is: with ``training.allocator``'s default preloaded), ``coa-system`` (the
same with the C library's allocator), and ``peft`` / ``coa`` again under ``training.low_memory``'s policy
(workers/allocator.py).
Ratios are vs ``peft`` in the same run. The last line is one JSON object with every figure.

``--device cuda``: every variant on the GPU under the bf16 autocast the workers train with (PEFT's too), each step
synchronised; QLoRA's ``Linear4bit`` runs bitsandbytes' CUDA kernels and CoA-LoRA the Triton ones. Memory is then
the peak of ``torch.cuda.max_memory_allocated`` per variant (``peft``, ``qlora``, ``coa``), one process each.

    python bench/step.py [--models minilm,smollm2] [--repeats 5] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from orchestrator.config import TrainingSection  # noqa: E402
from search.space import SearchSpace  # noqa: E402
from workers.allocator import pin_mmap_threshold, preload_library, worker_env  # noqa: E402
from workers.adapters.coa import CoAModel  # noqa: E402
from workers.data import on_device  # noqa: E402
from workers.quant.cache import DEFAULT_CACHE_MB  # noqa: E402
from workers.models import load_model, quiet_transformers, resolve_model  # noqa: E402
from workers.registry import ModuleRegistry  # noqa: E402
from workers.training import autocast_for, compute_gradients  # noqa: E402

from timing import interleaved  # noqa: E402  (bench/timing.py)

RANK = 16
SEED = 0
DEVICE = torch.device("cpu")  # --device
KS = (1, 2, 4)
SHAPES = {"minilm": ("classification", 16, 64), "smollm2": ("causal-lm", 8, 64)}
TIMING_CACHE_MB = 1024.0  # room for K = 4 configurations, so "warm" means warm for every K
MEMORY_VARIANTS = ("peft", "qlora", "coa", "coa-system", "peft-low-memory", "coa-low-memory")
PRELOADED = {"coa"}  # started with the default allocator, as the workers are (the others with the C library's)


# ---- the three set-ups on one batch --------------------------------------------------------------------------------
def make_batch(model_name: str, vocab: int) -> dict[str, torch.Tensor]:
    _, batch, length = SHAPES[model_name]
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(5, vocab, (batch, length), generator=generator)
    if SHAPES[model_name][0] == "classification":
        tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "labels": torch.randint(0, 2, (batch,), generator=generator)}
    else:
        tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return on_device(tensors, DEVICE)


def base_model(model_name: str) -> nn.Module:
    torch.manual_seed(SEED)  # the classification head's init
    return load_model(resolve_model(model_name), SHAPES[model_name][0])


def nf4_model(model: nn.Module) -> nn.Module:
    """``model`` with every linear layer but the head replaced by bitsandbytes' NF4 double-quant ``Linear4bit``,
    as QLoRA loads a model (by hand: transformers refuses a quantization config for a GGUF checkpoint)."""
    import bitsandbytes as bnb

    heads = {"classifier", "lm_head", "score"}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.split(".")[0] in heads:
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.to(DEVICE))  # quantizes on a GPU
    return model.to(DEVICE)


def peft_lora(model: nn.Module, targets: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    task_type = "SEQ_CLS" if isinstance(getattr(model, "classifier", None), nn.Module) else "CAUSAL_LM"
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, lora_dropout=0.0,
                                            task_type=task_type))


def peft_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with autocast_for(DEVICE):  # as compute_gradients does for CoA-LoRA
            loss = model(**batch).loss
        torch.autograd.grad(loss.float(), params)

    return step


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` that returns once the device has finished its work (a no-op wait on the CPU)."""
    if DEVICE.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


def coa_steps(coa: CoAModel, batch: dict[str, torch.Tensor], k: int, generator: torch.Generator
              ) -> tuple[Callable[[], None], Callable[[], None]]:
    """(warm step, cold step) over K configurations: warm reuses K configurations cached once; cold draws K
    new random ones every call."""
    state = {n: p.detach() for n, p in coa.named_parameters() if p.requires_grad}
    space, n = coa.space, len(coa.registry)

    def draw() -> list[list]:
        return [[space.settings[int(i)] for i in torch.randint(0, space.n_settings, (n,), generator=generator)]
                for _ in range(k)]

    seen = draw()
    compute_gradients(coa, state, batch, seen)  # fills the cache
    return (lambda: compute_gradients(coa, state, batch, seen)), (lambda: compute_gradients(coa, state, batch, draw()))


# ---- timing --------------------------------------------------------------------------------------------------------
def time_model(model_name: str, repeats: int) -> dict[str, float]:
    base = base_model(model_name)
    targets = [t.name for t in ModuleRegistry.from_model(base)]
    batch = make_batch(model_name, base.config.vocab_size)
    fns = {"peft": peft_step(peft_lora(copy.deepcopy(base), targets).to(DEVICE), batch),
           "qlora": peft_step(peft_lora(nf4_model(copy.deepcopy(base)), targets), batch)}
    coa = CoAModel(base, SearchSpace.default(), rank=RANK, alpha=2.0 * RANK, cache_mb=TIMING_CACHE_MB, seed=SEED)
    coa.to(DEVICE)
    generator = torch.Generator().manual_seed(SEED)
    for k in KS:
        fns[f"coa-warm-{k}"], fns[f"coa-cold-{k}"] = coa_steps(coa, batch, k, generator)
    seconds = interleaved({name: synced(fn) for name, fn in fns.items()}, repeats)
    per_config = {name: s / int(name.rsplit("-", 1)[1]) if name.startswith("coa") else s for name, s in seconds.items()}
    return {name: round(s, 4) for name, s in per_config.items()}


# ---- memory: one process per variant -------------------------------------------------------------------------------
def memory_child(model_name: str, variant: str) -> None:
    """Build one variant, run its steps, print the process's peak RSS in MiB as one JSON line."""
    if variant.endswith("-low-memory"):
        pin_mmap_threshold()
        variant = variant.removesuffix("-low-memory")
    variant = variant.removesuffix("-system")
    base = base_model(model_name)
    if variant == "qlora":
        base = nf4_model(base)
    batch = make_batch(model_name, base.config.vocab_size)
    if variant == "coa":
        coa = CoAModel(base, SearchSpace.default(), rank=RANK, alpha=2.0 * RANK, cache_mb=DEFAULT_CACHE_MB, seed=SEED)
        warm, cold = coa_steps(coa.to(DEVICE), batch, 2, torch.Generator().manual_seed(SEED))
        for step in (warm, cold, cold, cold, warm):
            step()
    else:
        targets = [t.name for t in ModuleRegistry.from_model(base)]
        step = peft_step(peft_lora(base, targets).to(DEVICE), batch)
        for _ in range(3):
            step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        print(json.dumps({"peak_rss_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}))
        return
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that across ``exec`` from
    the parent that forked the process, so every child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory(model_name: str, threads: int) -> tuple[dict[str, float], str]:
    """Peak RSS per variant (on a GPU: peak GPU memory allocated), and the allocator ``coa`` ran with."""
    preload = preload_library(TrainingSection.model_fields["allocator"].default)
    peaks = {}
    for variant in MEMORY_VARIANTS if DEVICE.type == "cpu" else ("peft", "qlora", "coa"):
        env = {**os.environ, "LD_PRELOAD": ""} | (worker_env(preload) if variant in PRELOADED else {})
        out = subprocess.run([sys.executable, __file__, "--memory-child", model_name, variant, "--threads", str(threads),
                              "--device", str(DEVICE)], capture_output=True, text=True, check=True, env=env)
        peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return peaks, preload or "system"


# ---- report --------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch (and kernel) threads of every process")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    warnings.filterwarnings("ignore")
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    figures: dict[str, object] = {"bench": "step", "device": args.device, "threads": args.threads,
                                  "repeats": args.repeats, "rank": RANK}
    for model_name in args.models.split(","):
        if model_name not in SHAPES:
            parser.error(f"unknown model {model_name!r}; choose from {sorted(SHAPES)}")
        seconds = time_model(model_name, args.repeats)
        peaks, allocator = memory(model_name, args.threads)
        ratio = {name: round(s / seconds["peft"], 3) for name, s in seconds.items()}
        rss_ratio = {name: round(mb / peaks["peft"], 3) for name, mb in peaks.items()}
        task, batch, length = SHAPES[model_name]
        print(f"\n{model_name} ({task}, batch {batch}×{length}, rank {RANK}, {args.threads} thread(s), "
              f"median of {args.repeats})")
        print(f"{'variant':<14} {'s/config':>9} {'vs peft':>8}")
        for name, s in seconds.items():
            print(f"{name:<14} {s:>9.3f} {ratio[name]:>7.2f}x")
        print(f"{'peak RSS':<14} " + "  ".join(f"{v} {mb:.0f} MiB ({rss_ratio[v]:.2f}x)" for v, mb in peaks.items())
              + f"  (coa's allocator: {allocator})")
        figures[model_name] = {"seconds_per_config": seconds, "vs_peft": ratio, "peak_rss_mb": peaks,
                               "rss_vs_peft": rss_ratio, "coa_allocator": allocator}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
