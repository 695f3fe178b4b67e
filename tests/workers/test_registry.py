import pytest
from torch import nn

from workers.registry import MODULE_TYPES, ModuleRegistry, TargetRule

DECODER_TYPES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]
ENCODER_TYPES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]


@pytest.fixture
def tiny(make_model):
    """The registry tests' models: 3 layers (a middle block to index) and an FFN width unlike the hidden size."""
    return lambda kind: make_model(kind, layers=3, intermediate=48)


@pytest.mark.parametrize(
    "kind, types, kv_out",
    [("llama", DECODER_TYPES, 16), ("qwen2", DECODER_TYPES, 16), ("bert", ENCODER_TYPES, 32), ("roberta", ENCODER_TYPES, 32)],
)
def test_targets_blocks_types_shapes(tiny, kind, types, kv_out):
    model = tiny(kind)
    reg = ModuleRegistry.from_model(model)
    assert len(reg) == 3 * len(types)
    assert reg.n_blocks == 3
    assert reg.module_types == types
    # every (block, type) pair appears exactly once: no aliasing, no constant block index
    assert sorted((t.block, t.module_type) for t in reg) == sorted((b, m) for b in range(3) for m in types)
    assert reg.blocks() == [b for b in range(3) for _ in types]
    by_type = {t.module_type: t for t in reg if t.block == 1}
    assert by_type["attn.k"].shape == (kv_out, 32)
    assert by_type["mlp.up"].shape == (48, 32)
    assert by_type["mlp.down"].shape == (32, 48)
    for t in reg:
        assert reg.module(model, t).weight.shape == t.shape
    assert reg.total_numel == sum(t.numel for t in reg)


def test_bert_attention_output_and_ffn_output_are_distinct(tiny):
    reg = ModuleRegistry.from_model(tiny("bert"))
    attn_o = reg.get("bert.encoder.layer.2.attention.output.dense")
    ffn_down = reg.get("bert.encoder.layer.2.output.dense")
    assert (attn_o.module_type, ffn_down.module_type) == ("attn.o", "mlp.down")
    assert attn_o.block == ffn_down.block == 2


def test_classifier_head_and_embeddings_are_not_targets(tiny):
    model = tiny("roberta")
    reg = ModuleRegistry.from_model(model)
    assert not any("classifier" in n or "embed" in n or "lm_head" in n for n in reg.names)


def test_not_a_target_is_a_value_error(tiny):
    reg = ModuleRegistry.from_model(tiny("llama"))
    with pytest.raises(ValueError, match="'lm_head' is not a target"):
        reg.get("lm_head")
    with pytest.raises(ValueError, match="not a target"):
        reg.module(tiny("llama"), "model.layers.0.input_layernorm")


def test_unsupported_architecture_fails_clearly_and_custom_rules_work():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no target linear layers found in Sequential"):
        ModuleRegistry.from_model(model)
    stack = nn.ModuleDict({"blocks": nn.ModuleList([nn.ModuleDict({"fc": nn.Linear(4, 4)}) for _ in range(2)])})
    reg = ModuleRegistry.from_model(stack, [TargetRule(r"blocks\.(?P<block>\d+)\.fc$", "mlp.up")])
    assert [t.block for t in reg] == [0, 1]


def test_bad_rules():
    with pytest.raises(ValueError, match="unknown module type"):
        TargetRule(r"x\.(?P<block>\d+)", "ffn")
    with pytest.raises(ValueError, match="block"):
        TargetRule(r"x\.\d+", "attn.q")
    assert len(MODULE_TYPES) == len(set(MODULE_TYPES))
