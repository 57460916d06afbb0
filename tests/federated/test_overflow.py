"""No finite input drives the global model to inf/NaN (issue 16 §1): huge finite updates are
averaged overflow-safe, an aggregate outside the dtype is refused as a whole (memories
restored), and max_update_norm clips updates."""

import warnings

import pytest
import torch

from meanwise.federated import AFACD, AFACS, MIFA, FedAU, FedAvg, FedVARP, KnownParticipation


def _all(n=2, **kw):
    return [
        FedAvg(n, **kw),
        FedAvg(n, over="all", **kw),
        MIFA(n, **kw),
        FedVARP(n, **kw),
        FedAU(n, **kw),
        KnownParticipation([0.5] * n, **kw),
        AFACD(n, 1.0, 1.0, **kw),
        AFACS(n, 1.0, 1.0, **kw),
    ]


def _step(agg, x, deltas, clients):
    extra = {"local_steps": [1] * len(clients)} if agg.needs_local_steps else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = agg.step(x, deltas, clients, **extra)
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize("agg", _all(), ids=lambda a: type(a).__name__)
def test_huge_finite_updates_never_make_the_model_non_finite(agg):
    x = torch.zeros(3)
    deltas = torch.tensor([[3e38, 1.0, 0.0], [3e38, 1.0, 0.0]])
    y, _ = _step(agg, x, deltas, [0, 1])
    assert torch.isfinite(y).all()
    # one 3e38 update on a model at 3e38: the true aggregate overflows, the round is refused
    x_big = torch.full((3,), 3e38)
    before = getattr(agg, "memory", None)
    before = None if before is None else before.clone()
    z, messages = _step(agg, x_big, torch.tensor([[3e38, 0.0, 0.0]]), [0])
    assert torch.equal(z, x_big)
    assert agg.refused_rounds >= 1
    assert any("refused round" in m and "[0]" in m for m in messages)
    if before is not None:
        torch.testing.assert_close(agg.memory, before)  # the refused round left no trace


def test_refused_round_is_counted_in_the_state_dict():
    agg = FedAvg(2)
    _step(agg, torch.full((2,), 3e38), torch.tensor([[3e38, 0.0]]), [0])
    state = agg.state_dict()
    assert state["refused_rounds"] == 1
    twin = FedAvg(2)
    twin.load_state_dict(state)
    assert twin.refused_rounds == 1
    legacy = {k: v for k, v in state.items() if k not in ("refused_rounds", "clipped_updates")}
    FedAvg(2).load_state_dict(legacy)  # checkpoints written before these counters still load


def test_max_update_norm_clips_each_update():
    agg = FedAvg(2, max_update_norm=1.0)
    deltas = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    y, _ = _step(agg, torch.zeros(2), deltas, [0, 1])
    expected = (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])) / 2
    torch.testing.assert_close(y, expected)
    assert agg.clipped_updates == 1
    huge, _ = _step(agg, torch.zeros(2), torch.tensor([[1e30, 1e30], [0.0, 0.0]]), [0, 1])
    torch.testing.assert_close(huge, torch.tensor([2**-0.5, 2**-0.5]) / 2)
    with pytest.raises(ValueError, match="max_update_norm"):
        FedAvg(2, max_update_norm=0.0)
