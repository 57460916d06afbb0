"""The IMLE objective on a hand-made scene, term by term."""

from __future__ import annotations

import math

import pytest
import torch

from meanwise.trajectory.imle import imle_loss, pairwise_angles


def test_imle_loss_by_hand():
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)  # T = 1, N = 2
    pred = torch.stack(
        [
            target + 3.0,  # farthest: summed error 12
            target + torch.tensor([[[0.5, 0.0], [0.0, 0.0]]], dtype=torch.float64),  # 0.5: chosen
            target + 1.0,  # second: 4
        ]
    )
    loss, index = imle_loss(pred, target, distance_weight=0.1, angle_weight=0.2, triplet_weight=0.3)
    assert index == 1
    l1 = 0.5 / 4
    triplet = (3.5 / 4) - (11.5 / 4)  # chosen vs second (|0.5|+1+1+1... ) and vs farthest
    chosen = pred[1].reshape(-1, 2)  # vectors (1.5, 0) and (0, 1)
    # pairwise distances: chosen sqrt(1.5^2 + 1), truth sqrt(2); each off-diagonal pair twice
    distance = 2 * abs(math.sqrt(1.5**2 + 1) - math.sqrt(2)) / 4
    angle = 0.0  # both pairs are perpendicular, as in the truth
    expected = l1 + 0.3 * triplet + 0.1 * distance + 0.2 * angle
    assert torch.allclose(
        pairwise_angles(chosen)[0, 1], torch.tensor(math.pi / 2, dtype=torch.float64)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_imle_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="pred must be"):
        imle_loss(torch.zeros(3, 12, 2), torch.zeros(12, 2))
    with pytest.raises(ValueError, match="K >= 2"):
        imle_loss(torch.zeros(1, 12, 2, 2), torch.zeros(12, 2, 2))
