"""ParameterLayout against torch's own parameters_to_vector, its validation, the numpy-array
form (what a Flower ArrayRecord holds) and the one per-tensor variance."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from meanwise.average import element_variance, member_variance
from meanwise.engine.layout import ParameterLayout, layer_variances


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()


def test_flat_vector_is_torchs_parameters_to_vector():
    model = _net()
    layout = ParameterLayout.of(model)
    params = dict(model.named_parameters())
    flat = layout.flatten(params)
    torch.testing.assert_close(flat, parameters_to_vector(model.parameters()), rtol=0, atol=0)
    assert layout.numel == flat.numel() == 4 * 5 + 5 + 5 * 3
    # and back: views in the parameters' shapes, as vector_to_parameters writes them
    other = _net()
    vector_to_parameters(flat * 2, other.parameters())
    for name, tensor in layout.unflatten(flat * 2).items():
        torch.testing.assert_close(tensor, dict(other.named_parameters())[name], rtol=0, atol=0)


def test_batched_rows_and_the_layout_of_stacked_tensors():
    model = _net()
    layout = ParameterLayout.of(model)
    stacked = {k: torch.stack([v.detach() * s for s in (1.0, -2.0, 0.5)]) for k, v in
               model.named_parameters()}  # fmt: skip
    rows = layout.flatten(stacked, batch_dims=1)
    assert rows.shape == (3, layout.numel)
    for s, scale in enumerate((1.0, -2.0, 0.5)):
        expected = parameters_to_vector(model.parameters()).detach() * scale
        torch.testing.assert_close(rows[s], expected, rtol=0, atol=0)
    # the layout read off the stacked tensors themselves (their first axis is the batch)
    assert ParameterLayout.of_tensors(stacked, batch_dims=1) == layout
    for name, tensor in layout.unflatten(rows).items():
        assert torch.equal(tensor, stacked[name])
    with pytest.raises(ValueError, match=r"share their first 1 \(batch\) axes"):
        ParameterLayout.of_tensors({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, batch_dims=1)
    with pytest.raises(ValueError, match="batch_dims must be an int >= 0"):
        ParameterLayout.of_tensors(stacked, batch_dims=-1)
    assert layout.with_dtype(torch.float32).shapes == layout.shapes
    with pytest.raises(TypeError, match="floating torch.dtype"):
        layout.with_dtype(torch.int64)


def test_bad_input_is_refused_by_name():
    model = _net()
    layout = ParameterLayout.of(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match="do not match the layout"):
        layout.flatten({k: v for k, v in params.items() if k != "0.bias"})
    with pytest.raises(ValueError, match=r"parameter '0.bias' has shape \[4\]; expected \[5\]"):
        layout.flatten({**params, "0.bias": torch.zeros(4, dtype=torch.float64)})
    with pytest.raises(ValueError, match="flat has 7 entries on its last axis; need 40"):
        layout.unflatten(torch.zeros(7))
    with pytest.raises(ValueError, match="share one dtype"):
        ParameterLayout.of(nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2).double()}))
    with pytest.raises(ValueError, match="model has no parameters"):
        ParameterLayout.of(nn.Tanh())


def test_numpy_arrays_round_trip():
    model = _net()
    layout = ParameterLayout.of(model)
    flat = parameters_to_vector(model.parameters()).detach()
    arrays = layout.to_arrays(flat)
    assert list(arrays) == list(layout.names)
    for name, array in arrays.items():
        assert isinstance(array, np.ndarray) and array.dtype == np.float64
        np.testing.assert_array_equal(array, dict(model.named_parameters())[name].detach().numpy())
    arrays["0.weight"][0, 0] = 99.0  # copies: the flat vector is untouched
    assert float(flat[0]) != 99.0
    back = layout.from_arrays(arrays)
    assert float(back[0]) == 99.0 and torch.equal(back[1:], flat[1:])
    with pytest.raises(TypeError, match=r"arrays\['0.bias'\] is list"):
        layout.from_arrays({**arrays, "0.bias": [0.0] * 5})
    with pytest.raises(ValueError, match="one model"):
        layout.to_arrays(flat[None])


def test_one_per_tensor_variance():
    # oracle: statistics.variance (the unbiased sample variance), per tensor and per row
    g = torch.Generator().manual_seed(0)
    layout = ParameterLayout(("w", "b", "s"), ((3, 4), (4,), (1,)), torch.float64)
    rows = torch.randn(2, layout.numel, generator=g, dtype=torch.float64)
    got = layer_variances(rows, layout)
    assert got.shape == (2, 3)
    for r in range(2):
        for j, (_, piece, _) in enumerate(layout.entries()):
            values = rows[r, piece].tolist()
            expected = statistics.variance(values) if len(values) > 1 else 0.0
            assert got[r, j].item() == pytest.approx(expected, rel=1e-12)
    # member_variance (the merge target) is the weighted mean of the same element variances
    w = rows[:, :12].view(2, 3, 4)
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    torch.testing.assert_close(
        member_variance(w, weights),
        0.25 * element_variance(w[0]) + 0.75 * element_variance(w[1]),
    )
    half = rows.half()
    assert element_variance(half[:, :12], batch_dims=1).dtype == torch.float32


def test_a_scalar_parameter_round_trips_unbatched_and_batched():
    # reshape(*(), *()) has no shape argument: a 0-dim parameter must still unflatten
    model = torch.nn.Linear(2, 1)
    model.register_parameter("scale", torch.nn.Parameter(torch.tensor(3.0)))
    layout = ParameterLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters()))
    back = layout.unflatten(flat)
    assert back["scale"].shape == () and back["scale"].item() == 3.0
    rows = torch.stack([flat, 2 * flat])
    assert layout.unflatten(rows)["scale"].tolist() == [3.0, 6.0]
