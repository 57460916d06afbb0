"""Gossip merges against their closed forms, and the vanishing-variance effect they fix."""

import pytest
import torch
from torch import nn

from meanwise.gossip import corrected_merge, merge_state_dicts, plain_merge


def test_plain_merge_closed_form():
    own = torch.tensor([1.0, 2.0], dtype=torch.float64)
    received = [
        torch.tensor([3.0, 6.0], dtype=torch.float64),
        torch.tensor([5.0, 10.0], dtype=torch.float64),
    ]
    # beta 0.5: 0.5*own + 0.5*mean(received) = 0.5*[1,2] + 0.5*[4,8]
    torch.testing.assert_close(
        plain_merge(own, received, 0.5), torch.tensor([2.5, 5.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        plain_merge(own, received, 0.0), torch.tensor([4.0, 8.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="beta"):
        plain_merge(own, received, 1.0)
    with pytest.raises(ValueError, match="at least one received"):
        plain_merge(own, [], 0.5)


def test_corrected_merge_restores_the_received_variance():
    torch.manual_seed(0)
    m = 8
    own = torch.randn(256, 64, dtype=torch.float64) * 0.05
    received = [torch.randn(256, 64, dtype=torch.float64) * 0.05 for _ in range(m)]
    plain = plain_merge(own, received, 0.5)
    # independent models: Var = (beta^2 + (1-beta)^2/m) sigma^2, the paper's prediction
    predicted = (0.25 + 0.25 / m) * 0.05**2
    assert plain.var().item() == pytest.approx(predicted, rel=0.05)
    fixed = corrected_merge(own, received, 0.5, eps=1e-4)
    v = torch.stack([r.var() for r in received]).mean()
    expected = (plain - plain.mean()) * torch.sqrt((v + 1e-4) / (plain.var() + 1e-4)) + plain.mean()
    torch.testing.assert_close(fixed, expected)
    # with eps tiny the variance is the received models' exactly
    exact = corrected_merge(own, received, 0.5, eps=1e-12)
    assert exact.var().item() == pytest.approx(v.item(), rel=1e-6)
    with_self = corrected_merge(own, received, 0.5, eps=1e-12, include_self_variance=True)
    weights = [0.5] + [0.5 / m] * m
    v_self = sum(w * t.var() for w, t in zip(weights, [own, *received], strict=True))
    assert with_self.var().item() == pytest.approx(v_self.item(), rel=1e-6)


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 30), nn.BatchNorm1d(30), nn.Linear(30, 4)).double()


def test_state_dict_merge_skips_statistics_scalars_and_optionally_biases():
    nets = [_net(s) for s in range(5)]
    for i, net in enumerate(nets):  # distinct running statistics
        net[1].running_mean.fill_(float(i))
        net[1].num_batches_tracked.fill_(i + 3)
    states = [n.state_dict() for n in nets]
    merged = merge_state_dicts(states[0], states[1:], 0.5, correct_variance=True, eps=1e-4)
    plain = merge_state_dicts(states[0], states[1:], 0.5)
    # statistics and integer buffers: merged plainly / taken from the own model, never rescaled
    torch.testing.assert_close(merged["1.running_mean"], plain["1.running_mean"])
    assert merged["1.num_batches_tracked"].item() == 3
    for key in ("0.weight", "2.weight", "0.bias"):
        expected = corrected_merge(states[0][key], [s[key] for s in states[1:]], 0.5, eps=1e-4)
        torch.testing.assert_close(merged[key], expected)
    keep_bias = merge_state_dicts(
        states[0], states[1:], 0.5, correct_variance=True, rescale_biases=False
    )
    torch.testing.assert_close(keep_bias["0.bias"], plain["0.bias"])
    with pytest.raises(ValueError, match="key '0.weight'"):
        bad = dict(states[1], **{"0.weight": torch.zeros(3, 3, dtype=torch.float64)})
        merge_state_dicts(states[0], [bad])
