"""Social-Implicit: the released weights reproduce the published errors, the forward equals the
authors' code transcribed, and the zones really route pedestrians by speed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from meanwise.average import weighted_average
from meanwise.trajectory.data import load_split
from meanwise.trajectory.metrics import ade_fde
from meanwise.trajectory.social_implicit import (
    NOISE_FACTORS,
    NOISE_FACTORS_ETH,
    SocialImplicit,
)

# best-of-20 per pedestrian with the released weights (data README; the authors' own code spans
# about 0.017 ADE / 0.04 FDE across seeds on ETH), tolerance +-0.02 ADE, +-0.05 FDE
EXPECTED = {
    "eth": (0.67, 1.48),
    "hotel": (0.20, 0.36),
    "univ": (0.31, 0.60),
    "zara1": (0.26, 0.51),
    "zara2": (0.22, 0.44),
}


def test_parameter_counts_match_the_paper():
    model = SocialImplicit()
    assert sum(p.numel() for p in model.parameters()) == 5836
    assert sum(p.numel() for p in model.implicit_cells[0].parameters()) == 1459


@pytest.mark.parametrize("split", sorted(EXPECTED))
def test_released_weights_reproduce_expected_ade_fde(checkpoints_root, data_root, split):
    model = SocialImplicit.from_official_checkpoint(checkpoints_root / split)
    assert model.compat and model.implicit_cells[0].feat.weight.dtype == torch.float64
    scenes = load_split(split, "test", data_root)
    generator = torch.Generator().manual_seed(0)
    ades, fdes, counts = [], [], []
    with torch.no_grad():
        for scene in scenes:
            pred = model.predict(scene.observed, 20, generator=generator)
            ade, fde = ade_fde(pred, scene.future)
            ades.append(ade)
            fdes.append(fde)
            counts.append(scene.num_pedestrians)
    ade = weighted_average(torch.stack(ades), torch.tensor(counts, dtype=torch.float64)).item()
    fde = weighted_average(torch.stack(fdes), torch.tensor(counts, dtype=torch.float64)).item()
    expected_ade, expected_fde = EXPECTED[split]
    assert abs(ade - expected_ade) <= 0.02 and abs(fde - expected_fde) <= 0.05, (ade, fde)


def test_noise_factors_follow_args_json(checkpoints_root, tmp_path):
    eth = SocialImplicit.from_official_checkpoint(checkpoints_root / "eth" / "val_best.pth")
    hotel = SocialImplicit.from_official_checkpoint(checkpoints_root / "hotel")
    assert eth.noise_factors == NOISE_FACTORS_ETH == (0.175, 1.5, 4.0, 8.0)
    assert hotel.noise_factors == NOISE_FACTORS == (0.05, 1.0, 4.0, 8.0)
    # no args.json and no dataset= -> a clear error; a wrong state dict -> names the keys
    weights = tmp_path / "val_best.pth"
    torch.save({"implicit_cells.0.noise_w": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="no args.json"):
        SocialImplicit.from_official_checkpoint(weights)
    (tmp_path / "args.json").write_text(json.dumps({"dataset": "zara1"}))
    with pytest.raises(ValueError, match="missing"):
        SocialImplicit.from_official_checkpoint(tmp_path)


def _authors_cell(params: dict, prefix: str, v, noise, factor):
    """One Social-Cell as ../shared/REFERENCES.md describes it, in functional ops on the
    released layout [K, 2, time, N] (independent of the module code under test)."""

    def p(name):
        return params[prefix + name]

    v = v + p("noise_w") * factor * noise
    # local stream
    k, c, t, n = v.shape
    w = v.permute(0, 3, 1, 2).reshape(k * n, c, t)
    w_res = F.conv1d(w, p("ped.highway_input.weight"), p("ped.highway_input.bias"))
    w = F.relu(F.conv1d(w, p("ped.feat.weight"), p("ped.feat.bias"), padding=1)) + w_res
    w = w.permute(0, 2, 1)
    w_res = F.conv1d(w, p("ped.highway.weight"), p("ped.highway.bias"))
    w = F.conv1d(w, p("ped.tpcnn.weight"), p("ped.tpcnn.bias"), padding=1) + w_res
    v_ped = w.permute(0, 2, 1).reshape(k, n, c, 12).permute(0, 2, 3, 1)
    # global stream
    v_res = F.conv2d(v, p("highway_input.weight"), p("highway_input.bias"))
    v = F.relu(F.conv2d(v, p("feat.weight"), p("feat.bias"), padding=1)) + v_res
    v = v.permute(0, 2, 1, 3)
    v_res = F.conv2d(v, p("highway.weight"), p("highway.bias"))
    v = F.conv2d(v, p("tpcnn.weight"), p("tpcnn.bias"), padding=1) + v_res
    v = v.permute(0, 2, 1, 3)
    return p("global_w") * v + p("local_w") * v_ped


def _random_model(seed: int, compat: bool = False) -> SocialImplicit:
    torch.manual_seed(seed)
    model = SocialImplicit(compat=compat).double()
    with torch.no_grad():
        for cell in model.implicit_cells:  # the scalars start at 0; make every stream count
            cell.noise_w.uniform_(0.5, 1.5)
            cell.global_w.uniform_(0.5, 1.5)
            cell.local_w.uniform_(0.5, 1.5)
    return model


def _scene_with_speeds(speeds):
    """Observed displacements [8, N, 2] whose max inf-norm is exactly each speed."""
    torch.manual_seed(1)
    rel = torch.rand(8, len(speeds), 2, dtype=torch.float64) * torch.tensor(speeds)[None, :, None]
    rel[0] = 0.0
    rel[3, :, 1] = torch.tensor(speeds, dtype=torch.float64)
    return rel


def test_forward_equals_authors_code_zone_by_zone():
    model = _random_model(0)
    params = dict(model.state_dict())
    speeds = [0.0, 0.005, 0.01, 0.05, 0.0999, 0.1, 0.7, 1.2, 3.0]
    rel = _scene_with_speeds(speeds)
    # bucketize(right=True) - 1 with bins [0, 0.01, 0.1, 1.2]: bins[i] <= speed < bins[i+1]
    assert model.zones(rel).tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3]
    noise = torch.randn(5, 2, dtype=torch.float64)
    out = model(rel, 5, noise=noise)  # [K, 12, N, 2]
    v = rel.permute(2, 0, 1).unsqueeze(0)
    zone = model.zones(rel)
    for i in range(4):
        select = zone == i
        expected = _authors_cell(
            params,
            f"implicit_cells.{i}.",
            v[..., select],
            noise.view(5, 2, 1, 1),
            NOISE_FACTORS[i],
        )
        assert torch.allclose(out[:, :, select].permute(0, 3, 1, 2), expected, atol=1e-12)


def test_zones_route_each_pedestrian_to_its_own_cell():
    model = _random_model(2)
    rel = _scene_with_speeds([0.005, 0.05, 0.5, 2.0, 0.06])
    noise = torch.randn(3, 2, dtype=torch.float64)
    before = model(rel, 3, noise=noise)
    with torch.no_grad():
        model.implicit_cells[1].tpcnn.bias.add_(1.0)  # touch the zone-1 cell only
    after = model(rel, 3, noise=noise)
    changed = (after - before).abs().amax(dim=(0, 1, 3)) > 1e-9
    assert changed.tolist() == [False, True, False, False, True]
    # compatibility mode: the first step is 0, so everyone is in zone 0 and cell 1 is unused
    compat = _random_model(2, compat=True)
    assert compat.zones(rel).tolist() == [0] * 5
    ref = compat(rel, 3, noise=noise)
    with torch.no_grad():
        compat.implicit_cells[1].tpcnn.bias.add_(1.0)
    assert torch.equal(compat(rel, 3, noise=noise), ref)


def test_sampling_is_seeded_and_predict_is_cumulative():
    model = _random_model(3)
    observed = torch.cumsum(torch.rand(8, 4, 2, dtype=torch.float64), dim=0)
    a = model.predict(observed, 7, generator=torch.Generator().manual_seed(5))
    b = model.predict(observed, 7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (7, 12, 4, 2)
    rel = torch.zeros_like(observed)
    rel[1:] = observed[1:] - observed[:-1]
    steps = model(rel, 7, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a[:, 0], observed[-1] + steps[:, 0])
    assert torch.allclose(a[:, -1], observed[-1] + steps.sum(dim=1))


def test_bad_inputs_raise_value_errors():
    model = SocialImplicit()
    with pytest.raises(ValueError, match="displacements must be"):
        model(torch.zeros(7, 3, 2))
    with pytest.raises(ValueError, match="num_samples"):
        model(torch.zeros(8, 3, 2), 0)
    with pytest.raises(ValueError, match="bins"):
        SocialImplicit(bins=(0.0, 0.1, 0.05, 1.0))
    with pytest.raises(ValueError, match="noise_factors"):
        SocialImplicit(noise_factors=(1.0, 2.0))
