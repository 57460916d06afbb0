"""The aggregators follow their inputs' device and dtype (DESIGN.md's device convention).

Oracle: the same rounds in float64 on the CPU, whose numbers test_aggregators.py checks
against the papers' equations. A float32 run must agree with it to float32 precision, a CUDA
run with the CPU run of its dtype; the result and every per-client state tensor (memories,
FedAU's interval counters) must live on the inputs' device, in their dtype.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from meanwise.federated.aggregators import (
    AFACD,
    AFACS,
    MIFA,
    Aggregator,
    FedAU,
    FedAvg,
    FedVARP,
    KnownParticipation,
)

N, P, ROUNDS = 5, 7, 8
MAKERS = {
    "FedAvg": lambda: FedAvg(N),
    "FedAvg-all": lambda: FedAvg(N, over="all", server_lr=0.7),
    "KnownParticipation": lambda: KnownParticipation([0.3, 0.5, 0.6, 0.8, 0.9]),
    "MIFA": lambda: MIFA(N),
    "FedVARP": lambda: FedVARP(N),
    "FedAU": lambda: FedAU(N, cutoff=3, server_lr=0.9),
    "AFACD": lambda: AFACD(N, 0.8, 0.1, arrivals_per_round=2),
    "AFACS": lambda: AFACS(N, 0.8, 0.1, arrivals_per_round=2),
}
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: the aggregators' CUDA check runs only where one is",
)


def _script(seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor]]:
    """ROUNDS rounds of (clients, float64 deltas, local steps), drawn once on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    rounds = []
    for _ in range(ROUNDS):
        clients = (torch.rand(N, generator=gen) < 0.6).nonzero().flatten()
        deltas = torch.randn(clients.numel(), P, generator=gen, dtype=torch.float64)
        rounds.append((clients, deltas, torch.randint(1, 5, (clients.numel(),), generator=gen)))
    return rounds


def _run(agg: Aggregator, device: str, dtype: torch.dtype, script=None, x=None) -> Tensor:
    x = torch.linspace(-1, 1, P, dtype=torch.float64) if x is None else x
    x = x.to(device, dtype)
    for clients, deltas, steps in _script() if script is None else script:
        # indices and step counts as the caller has them (CPU), the updates on the device
        x = agg.step(x, deltas.to(device, dtype), clients, local_steps=steps)
        assert x.device.type == torch.device(device).type and x.dtype == dtype
    return x


def _state_tensors(agg: Aggregator) -> dict[str, Tensor]:
    tensors = {k: v for k, v in vars(agg).items() if isinstance(v, Tensor)}
    weights = getattr(agg, "weights", None)
    if weights is not None:
        tensors.update(
            {f"weights.{k}": v for k, v in vars(weights).items() if isinstance(v, Tensor)}
        )
    tensors.pop("probs", None)  # KnownParticipation's given probabilities: moved per round
    return tensors


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_result_and_state_follow_the_inputs_dtype(name, dtype):
    agg = MAKERS[name]()
    got = _run(agg, "cpu", dtype)
    expected = _run(MAKERS[name](), "cpu", torch.float64)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(got.double(), expected, **tol)
    for key, tensor in _state_tensors(agg).items():
        assert tensor.device.type == "cpu", key
        if key == "memory":
            assert tensor.dtype == dtype  # the updates' dtype, not a hidden float64 copy


def test_updates_on_another_device_than_the_model_are_refused():
    x = torch.zeros(P)
    with pytest.raises(ValueError, match="deltas are on meta but x is on cpu"):
        FedAvg(N).step(x, torch.zeros(2, P, device="meta"), [0, 1])


@CUDA
@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_matches_the_cpu_and_keeps_its_state_there(name, dtype):
    agg = MAKERS[name]()
    got = _run(agg, "cuda", dtype)
    expected = _run(MAKERS[name](), "cpu", dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(got.cpu(), expected, **tol)
    for key, tensor in _state_tensors(agg).items():
        assert tensor.device.type == "cuda", key
    if isinstance(agg, FedAU):  # integer counts and sums of integers: exact on any device
        reference = MAKERS[name]()
        _run(reference, "cpu", dtype)
        assert torch.equal(agg.weights.interval_sum.cpu(), reference.weights.interval_sum)


@CUDA
@pytest.mark.parametrize("name", MAKERS)
def test_a_cpu_checkpoint_continues_on_cuda(name):
    script = _script(1)
    first, rest = script[:4], script[4:]
    cpu = MAKERS[name]()
    x = _run(cpu, "cpu", torch.float64, first)
    resumed = MAKERS[name]()
    resumed.load_state_dict(cpu.state_dict())  # CPU tensors
    got = _run(resumed, "cuda", torch.float64, rest, x)
    expected = _run(cpu, "cpu", torch.float64, rest, x)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)
    assert all(t.device.type == "cuda" for t in _state_tensors(resumed).values())


@CUDA
@pytest.mark.parametrize("name", MAKERS)
def test_cuda_indices_and_a_dropped_nonfinite_update(name):
    # the clients as a CUDA tensor and a NaN update: the drop (and its warning, which names
    # the clients) indexes on one device
    clients, deltas, steps = _script(2)[0]
    bad = deltas.clone()
    bad[0, 1] = float("nan")
    x = torch.linspace(-1, 1, P, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        got = MAKERS[name]().step(x.cuda(), bad.cuda(), clients.cuda(), local_steps=steps.cuda())
    expected = MAKERS[name]().step(x, deltas[1:], clients[1:], local_steps=steps[1:])
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)
