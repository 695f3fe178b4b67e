import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from search.space import QuantSetting, SearchSpace
from workers.apply import applied_configuration, resolve_configuration, uniform_configuration
from workers.quant.blockwise import fake_quantize, packed_nbytes
from workers.registry import ModuleRegistry

SPACE = SearchSpace.default()


@pytest.fixture
def llama():
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    ).eval()
    return model, ModuleRegistry.from_model(model)


def random_configuration(reg, seed=0):
    rng = np.random.default_rng(seed)
    return SPACE.decode(rng.integers(0, SPACE.upper_bounds(len(reg)) + 1))


def test_report_and_weights(llama):
    model, reg = llama
    config = random_configuration(reg)
    originals = {n: reg.module(model, n).weight.detach().clone() for n in reg.names}
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        fp_logits = model(ids).logits
    with applied_configuration(model, reg, config, SPACE) as report:
        assert report.average_bits == pytest.approx(SPACE.average_bits(config, reg.numels))
        assert report.packed_bytes == sum(packed_nbytes(t.numel, s) for t, s in zip(reg, config))
        for t, s in zip(reg, config):
            assert torch.equal(reg.module(model, t).weight, fake_quantize(originals[t.name], s))
        with torch.no_grad():
            q_logits = model(ids).logits
        assert not torch.equal(q_logits, fp_logits)
    for n in reg.names:
        assert torch.equal(reg.module(model, n).weight, originals[n])


def test_configuration_forms_agree(llama):
    _, reg = llama
    config = random_configuration(reg, seed=1)
    as_map = dict(zip(reg.names, config))
    as_vec = SPACE.encode(config)
    assert resolve_configuration(reg, as_map) == resolve_configuration(reg, as_vec, SPACE) == config


def test_more_bits_less_error(llama):
    model, reg = llama
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
    errors = []
    for code in SPACE.code:
        with applied_configuration(model, reg, uniform_configuration(reg, QuantSetting(code, 8, "fp32", 16, 16))):
            with torch.no_grad():
                errors.append((model(ids).logits - ref).norm().item())
    assert errors == sorted(errors, reverse=True)


def test_bad_configurations_leave_model_untouched(llama):
    model, reg = llama
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    good = QuantSetting("nf4", 8, "fp32", 64, 256)
    small_space = SearchSpace.from_dict({**SPACE.to_dict(), "code": ["nf3", "nf4"]})
    cases = [
        (uniform_configuration(reg, good)[:-1], "settings but the model has"),
        ({"lm_head": good}, "'lm_head' is not a target"),
        ({reg.names[0]: good}, "no setting for"),
        (uniform_configuration(reg, QuantSetting("nf8", 8, "fp32", 64, 256)), "nf8"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            with applied_configuration(model, reg, config, small_space):
                pass
    # a NaN in the last target: the error names it, and no earlier weight was swapped
    last = reg.module(model, reg[-1])
    with torch.no_grad():
        last.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=reg[-1].name):
        with applied_configuration(model, reg, uniform_configuration(reg, good)):
            pass
    with torch.no_grad():
        last.weight[0, 0] = before[reg[-1].name + ".weight"][0, 0]
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_error_inside_block_restores_weights(llama):
    model, reg = llama
    before = reg.module(model, reg[0]).weight.detach().clone()
    with pytest.raises(RuntimeError):
        with applied_configuration(model, reg, uniform_configuration(reg, QuantSetting("nf2", 2, "bf16", 64, 256))):
            raise RuntimeError("boom")
    assert torch.equal(reg.module(model, reg[0]).weight, before)


def test_llama_cpp_types_apply_only_where_their_blocks_fit_the_rows():
    """A model with 256-wide rows (attention, gate, up) and 64-wide rows (down): the K-quant costs +inf on the
    64-wide rows, a configuration putting it there is refused naming the matrix, and a space none of whose types
    fits a matrix is refused before any compute."""
    pytest.importorskip("llama_cpp", reason="the [gguf] extra (make test installs it)")
    from workers.apply import check_space_fits
    from workers.fisher import setting_costs

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    reg = ModuleRegistry.from_model(model)
    space = SearchSpace.from_dict({"code": ["q2_k", "q4_0", "q8_0"]})
    check_space_fits(reg, space)
    down = next(t for t in reg if t.shape[1] == 64)
    costs = setting_costs(reg.module(model, down).weight, space)
    assert costs[0] == np.inf and np.isfinite(costs[1:]).all() and costs[1] > costs[2] > 0
    with_k = [QuantSetting("q2_k") if t.shape[1] == 256 else QuantSetting("q4_0") for t in reg]
    assert len(resolve_configuration(reg, with_k, space)) == len(reg)
    with pytest.raises(ValueError, match=rf"{down.name} has rows of 64 weights.*q2_k quantizes rows in blocks of 256"):
        resolve_configuration(reg, [QuantSetting("q2_k")] * len(reg), space)
    with pytest.raises(ValueError, match=rf"{down.name} has rows of 64 weights.*no type of this space fits"):
        check_space_fits(reg, SearchSpace.from_dict({"code": ["q2_k", "q4_k"]}))
