"""Where a worker's replicas live (``WorkerSpec.device``, from ``cluster.gpus_per_worker``): names a worker can use,
layers that keep one copy of W when moved, and, on a machine with a GPU, a worker on CUDA that computes what the
CPU worker computes (initial state exactly; gradients and metrics up to bf16 autocast) and returns host tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from orchestrator.config import build_config
from orchestrator.runs import worker_spec
from search.space import QuantSetting
from workers.adapters.lora import CoALoRALinear
from workers.quant.formats import quantize
from workers.worker import Worker, worker_device

CUDA = torch.cuda.is_available()
NF4 = QuantSetting("nf4", 8, "fp32", 64, 4)


def test_device_names():
    assert worker_device("cpu") == torch.device("cpu")
    for name, match in [("meta", "workers run on 'cpu' or 'cuda'"), ("tpu", "is not a device name")]:
        with pytest.raises(ValueError, match=match):
            worker_device(name)
    if not CUDA:
        with pytest.raises(ValueError, match="sees no CUDA device .*cluster.gpus_per_worker"):
            worker_device("cuda")


def test_gpus_per_worker_put_the_workers_on_cuda(make_config):
    config, _ = make_config()
    assert worker_spec(build_config(config)).device == "cpu"
    config["cluster"].update(executor="ray", gpus_per_worker=0.5)
    assert worker_spec(build_config(config)).device == "cuda"


def layer() -> CoALoRALinear:
    torch.manual_seed(0)
    return CoALoRALinear(torch.nn.Linear(64, 32), 4, 8.0)


def test_a_moved_layer_keeps_one_copy_of_w_and_drops_codes_made_where_it_was():
    lin = layer()
    lin.setting = NF4
    lin(torch.randn(2, 64))
    assert len(lin.cache) == 1
    lin.double()  # a move whose effect shows on the CPU: every float tensor becomes a new one
    assert lin.residual.dtype == torch.float64 and lin.residual.data_ptr() == lin.weight.data_ptr()
    assert len(lin.cache) == 0 and "residual" not in lin.state_dict()
    lin.float()
    assert lin(torch.randn(2, 64)).dtype == torch.float32


def test_a_moved_decomposed_layer_moves_its_residual_hessian_and_pinned_codes():
    lin = layer()
    lin.reset_lora("svd_of_W")
    residual = lin.residual.clone()
    assert not torch.equal(residual, lin.weight)
    lin.set_hessian(torch.eye(64))
    stored = quantize(lin.residual, NF4)
    lin.pin(NF4, stored)
    lin.double()
    assert lin.residual.dtype == torch.float64 and lin.residual.data_ptr() != lin.weight.data_ptr()
    assert torch.equal(lin.residual.float(), residual) and lin.hessian.device == lin.weight.device
    assert lin.packed_weight(NF4).codes.dtype == torch.uint8  # codes keep their dtype
    assert torch.equal(lin.packed_weight(NF4).codes, stored.codes)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_worker_on_the_gpu_computes_what_the_cpu_worker_computes(make_config):
    config, _ = make_config(adapter={"rank": 4, "alpha": 8, "init": "lq-shared"})
    spec = worker_spec(build_config(config))
    cpu, gpu = Worker(spec), Worker(dataclasses.replace(spec, device="cuda"))
    assert next(gpu.models["main"].parameters()).is_cuda
    state = cpu.initial_state()
    on_gpu = gpu.initial_state()
    assert all(t.device.type == "cpu" and torch.equal(t, state[n]) for n, t in on_gpu.items())
    nf3 = next(s for s in cpu.space.settings if s.code == "nf3")
    configuration = cpu.space.encode([nf3] * len(cpu.numels()))
    losses_cpu, grads_cpu, _ = cpu.gradients("main", state, list(range(16)), [configuration, None])
    losses_gpu, grads_gpu, _ = gpu.gradients("main", state, list(range(16)), [configuration, None])
    assert all(g.device.type == "cpu" for g in grads_gpu.values())
    assert losses_gpu == pytest.approx(losses_cpu, rel=2e-2)
    for name, g in grads_cpu.items():
        assert torch.allclose(grads_gpu[name], g, rtol=0.1, atol=1e-3 * float(g.abs().max()) + 1e-8), name
    assert gpu.evaluate("main", state, configuration)["loss"] == pytest.approx(
        cpu.evaluate("main", state, configuration)["loss"], rel=2e-2)
