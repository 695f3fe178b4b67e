"""``coalora export --format gguf --bits 3.5`` with the K-quants on every matrix, run by llama.cpp.

The packaged SmolLM2's 576-weight rows do not take the K-quants' 256-weight blocks, so this uses SmolLM2 widened
to 768 with zero padding (bench/widen.py: the same function, checked below against the packaged model), cut to 2
blocks to stay fast. llama.cpp runs the export twice: as written, and with its quantized tensors stored as their
F32 values (gguf-py's dequantization). The F32 run computes with coalora's weights and no activation quantization,
so it must give coalora's logits with the adapter applied to 1% of their range (0.3 of 50 measured; llama.cpp keeps
its attention cache in F16), against an adapter effect of about 30: that holds the K-quant values, the adapter's
layout and θ's folding to coalora's forward. The quantized run differs from it only by llama.cpp's quantization of
the activations (Q8_K blocks of 256 for the K-quants), so for it the test asks for the same next token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from orchestrator.cli import main
from orchestrator.runs import load_run_config, worker_spec
from orchestrator.state import CheckpointStore
from workers.export.gguf import exported_settings, open_base, tensor_names, write_f32
from workers.models import ModelSource, load_model, resolve_model

pytestmark = pytest.mark.integration
pytest.importorskip("llama_cpp", reason="the [gguf] extra (make test installs it)")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
sys.path.insert(0, str(Path(__file__).parent))
from llama_runtime import FAST, PROMPTS, gaps, llama, llama_logits, tokens  # noqa: E402
from widen import widen  # noqa: E402

BITS = 3.5


@pytest.fixture(scope="module")
def widened(tmp_path_factory) -> Path:
    return widen(tmp_path_factory.mktemp("widened") / "smollm2-w768-2.gguf", layers=2)


@pytest.fixture(scope="module")
def exported(widened, tmp_path_factory, mlflow_template, request):
    import shutil

    root = tmp_path_factory.mktemp("kquants")
    shutil.copy(mlflow_template, root / "mlflow.db")
    monkeypatch = pytest.MonkeyPatch()  # the widened model's conversion cached beside it, for this module only
    monkeypatch.setenv("COALORA_CACHE", str(root / "cache"))
    request.addfinalizer(monkeypatch.undo)
    args = ["run", "conf/gguf.yaml", *FAST, f"model.name={widened}", "search.budget_min=3.0", "search.budget_max=6.0",
            f"evaluation.targets=[{BITS}]", "training.steps_per_round=3", f"run.root={root / 'runs'}", "run.name=k",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}"]
    assert main(args) == 0
    run_dir, out = root / "runs" / "k", root / "export"
    assert main(["export", str(run_dir), "--format", "gguf", "--bits", str(BITS), "--out", str(out)]) == 0
    return run_dir, out


def test_the_widened_model_computes_what_smollm2_does(widened, monkeypatch):
    """The widened blocks against the packaged model's first two blocks (with its final norm and tied head)."""
    ids = torch.tensor([tokens(PROMPTS[0])])
    packaged = load_model(resolve_model("smollm2"), "causal-lm").eval()
    packaged.model.layers = packaged.model.layers[:2]
    packaged.config.num_hidden_layers = 2
    monkeypatch.setenv("COALORA_CACHE", "off")  # the widened file lives in a temporary folder
    with torch.no_grad():
        ours = load_model(ModelSource(str(widened.parent), widened.name), "causal-lm").eval()(input_ids=ids).logits
        theirs = packaged(input_ids=ids).logits
    assert (ours - theirs).abs().max() < 0.01 * theirs.abs().max()  # RMSNorm's epsilon, and float order
    assert ours.argmax(-1).equal(theirs.argmax(-1))


def test_a_3_5_bit_export_in_k_quants_runs_in_llama_cpp_with_coaloras_logits(exported, widened):
    from workers.worker import Worker

    run_dir, out = exported
    coa = Worker(worker_spec(load_run_config(run_dir))).models["main"].eval()
    coa.load_trainable_state(CheckpointStore(run_dir / "checkpoints").load_latest().tensors["trainable"])
    names = tensor_names(coa, *reversed(open_base(widened)))
    summary = json.loads((out / "coalora_export.json").read_text())
    settings = exported_settings(coa, out, ModelSource(str(widened.parent), widened.name))
    numels = np.array(coa.registry.numels)
    k_share = numels[[s.row_multiple == 256 for s in settings]].sum() / numels.sum()
    assert summary["average_bits"] <= BITS and k_share >= 0.5  # below 4.5 bits only q2_k / q3_k get there
    assert all(r % 256 == 0 for r in coa.registry.row_lengths)
    exact = llama(write_f32(out / "model.gguf", out / "model-f32.gguf"), out / "adapter.gguf")
    deployed = llama(out / "model.gguf", out / "adapter.gguf")
    for text in PROMPTS:
        ids = tokens(text)
        with torch.no_grad():
            ours = coa(settings, input_ids=torch.tensor([ids])).logits[0].double().numpy()
            with coa.adapters_disabled():
                effect = np.abs(ours - coa(settings, input_ids=torch.tensor([ids])).logits[0].double().numpy()).max()
        theirs, theirs_exact = llama_logits(deployed, ids), llama_logits(exact, ids)
        exact_gap = gaps(theirs_exact, ours)[0]  # the same weights, adapter and sums, up to llama.cpp's F16 KV cache
        assert effect > 2.0 and exact_gap < 0.01 * np.abs(ours).max(), (text, exact_gap, effect)
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.75, text  # and the deployed file agrees
    stored = {t.name: t for t in gguf.GGUFReader(out / "model.gguf").tensors}
    for target, setting in zip(coa.registry, settings):
        tensor = stored[names[target.name]]
        assert tensor.tensor_type.name.lower() == setting.code
        assert int(tensor.n_bytes) == setting.exact_bits * target.numel / 8
