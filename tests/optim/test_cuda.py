"""The optimizers on a CUDA device take the same steps as on the CPU (float64).

On CUDA the rules run as whole-list multi-tensor kernels (no CPU chunking) and AdaHessian draws
its probes on a CUDA generator; both must agree with the CPU path. Skipped where no GPU exists
(CI and the development machines have none; the device check runs them on one)."""

import copy

import pytest
import torch

from meanwise.optim import AdaBelief, AdaHessian, DiffGrad
from tests.optim._models import batches, loss_of, make

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(model, opt, data, device, create_graph=lambda opt: False):
    for x, y in data:
        opt.zero_grad()
        loss_of(model, (x.to(device), y.to(device))).backward(create_graph=create_graph(opt))
        opt.step()


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (AdaBelief, {}),
        (AdaBelief, {"rectify": False, "amsgrad": True, "weight_decay": 5e-4}),
        (DiffGrad, {"weight_decay": 1e-3}),
    ],
)
def test_first_order_optimizers_match_cpu(cls, kwargs):
    data = batches("conv", 50)
    cpu_model = make("conv")
    gpu_model = copy.deepcopy(cpu_model).cuda()
    _run(cpu_model, cls(cpu_model.parameters(), **kwargs), data, "cpu")
    _run(gpu_model, cls(gpu_model.parameters(), **kwargs), data, "cuda")
    for p, q in zip(cpu_model.parameters(), gpu_model.parameters(), strict=True):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-9, atol=1e-11)


def test_adahessian_matches_cpu_with_the_same_probes():
    data = batches("conv", 30)
    cpu_model = make("conv")
    gpu_model = copy.deepcopy(cpu_model).cuda()
    # A CPU generator drives both: the probes are drawn on the CPU and moved to the GPU.
    cpu_opt = AdaHessian(
        cpu_model.parameters(), lr=0.05, update_each=2, generator=torch.Generator().manual_seed(1)
    )
    gpu_opt = AdaHessian(
        gpu_model.parameters(), lr=0.05, update_each=2, generator=torch.Generator().manual_seed(1)
    )
    due = lambda opt: opt.hessian_due  # noqa: E731
    _run(cpu_model, cpu_opt, data, "cpu", due)
    _run(gpu_model, gpu_opt, data, "cuda", due)
    for p, q in zip(cpu_model.parameters(), gpu_model.parameters(), strict=True):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-8, atol=1e-10)


def test_adahessian_default_generator_lives_on_the_parameters_device():
    model = make("mlp").cuda()
    opt = AdaHessian(model.parameters())
    assert opt.generator.device.type == "cuda"
    _run(model, opt, batches("mlp", 3), "cuda", lambda opt: opt.hessian_due)
    assert all(torch.isfinite(p).all() for p in model.parameters())
