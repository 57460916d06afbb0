"""The streaming checkpoint merge equals the in-memory merge; `meanwise merge` and `meanwise
fisher` end to end; mismatches name the tensor; a failed merge leaves no output folder."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from meanwise import cli
from meanwise.merging import (
    MergeOptions,
    average_merge,
    diagonal_fisher,
    fisher_merge,
    load_state_dict,
    merge_checkpoints,
    save_safetensors,
)
from meanwise.merging.config import parse_merge_config


def make_model() -> nn.Module:
    """The model factory `meanwise fisher --model tests.merging.test_streaming_and_cli:make_model`
    imports."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


class Custom:
    """Any class other than tensors and containers makes weights_only loading fail."""


def _checkpoints(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (8, 5), "a.bias": (8,), "b.weight": (3, 8), "b.bias": (3,)}
    states, fishers = [], []
    for _ in range(n):
        states.append({k: torch.randn(s, generator=g) for k, s in shapes.items()})
        states[-1]["count"] = torch.tensor(7)
        fishers.append({k: torch.rand(s, generator=g) ** 4 for k, s in shapes.items()})
    return states, fishers


def _write_sharded(state, folder):
    """An HF-style folder: two shards and model.safetensors.index.json."""
    folder.mkdir()
    keys = list(state)
    weight_map = {}
    for i, part in enumerate((keys[:2], keys[2:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("normalize", [False, True])
def test_streaming_merge_is_bit_identical_to_fisher_merge(tmp_path, normalize):
    states, fishers = _checkpoints()
    _write_sharded(states[0], tmp_path / "m0")
    save_safetensors(states[1], tmp_path / "m1.safetensors")
    torch.save(states[2], tmp_path / "m2.pt")
    for i, f in enumerate(fishers):
        save_safetensors(f, tmp_path / f"f{i}.safetensors")
    lambdas = [0.5, 0.3, 0.2]
    options = MergeOptions(floor=1e-3, favor_target=True, normalize=normalize)
    summary = merge_checkpoints(
        [tmp_path / "m0", tmp_path / "m1.safetensors", tmp_path / "m2.pt"],
        [tmp_path / f"f{i}.safetensors" for i in range(3)],
        tmp_path / "out",
        coefficients=lambdas,
        options=options,
        max_shard_bytes=200,  # forces several shards and an index
    )
    assert len(summary.files) > 2 and summary.files[-1] == "model.safetensors.index.json"
    merged = load_state_dict(tmp_path / "out")
    expected = fisher_merge(states, fishers, lambdas, options=options)
    assert list(merged) == list(expected)
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key


def test_average_method_and_output_dtype(tmp_path):
    states, _ = _checkpoints(2)
    for i, s in enumerate(states):
        save_safetensors(s, tmp_path / f"m{i}.safetensors")
    merge_checkpoints(
        [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"],
        None,
        tmp_path / "out",
        coefficients=[1.0, 3.0],
        dtype=torch.bfloat16,
    )
    merged = load_state_dict(tmp_path / "out/model.safetensors")
    expected = average_merge(states, [0.25, 0.75])
    assert merged["a.weight"].dtype == torch.bfloat16 and merged["count"].dtype == torch.int64
    assert torch.equal(merged["a.weight"], expected["a.weight"].to(torch.bfloat16))


def test_mismatches_name_the_tensor_and_no_output_is_left(tmp_path):
    states, fishers = _checkpoints(2)
    save_safetensors(states[0], tmp_path / "m0.safetensors")
    wrong = dict(states[1], **{"b.weight": torch.zeros(4, 8)})
    save_safetensors(wrong, tmp_path / "wrong_shape.safetensors")
    paths = [tmp_path / "m0.safetensors", tmp_path / "wrong_shape.safetensors"]
    with pytest.raises(ValueError, match="'b.weight'.*shape \\[4, 8\\].*keep_target"):
        merge_checkpoints(paths, None, tmp_path / "out")
    save_safetensors(dict(states[1], **{"a.bias": states[1]["a.bias"].double()}),
                     tmp_path / "wrong_dtype.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match="'a.bias'.*dtype torch.float64"):
        merge_checkpoints([paths[0], tmp_path / "wrong_dtype.safetensors"], None, tmp_path / "o")
    save_safetensors(states[1], tmp_path / "m1.safetensors")
    paths[1] = tmp_path / "m1.safetensors"
    # a Fisher that turns out bad only at its last tensor: the merge fails midway
    bad = dict(fishers[1])
    bad["b.bias"] = torch.tensor([1.0, float("nan"), 1.0])
    save_safetensors(fishers[0], tmp_path / "f0.safetensors")
    save_safetensors(bad, tmp_path / "f1.safetensors")
    with pytest.raises(ValueError, match="'b.bias'.*non-finite"):
        merge_checkpoints(
            paths, [tmp_path / "f0.safetensors", tmp_path / "f1.safetensors"], tmp_path / "out",
            max_shard_bytes=100,
        )  # fmt: skip
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out", "o"))]
    assert leftovers == []


def test_keep_target_keeps_the_head_when_heads_differ(tmp_path):
    states, fishers = _checkpoints(2)
    states[1]["b.weight"] = torch.randn(5, 8)
    states[1]["b.bias"] = torch.randn(5)
    for i in range(2):
        save_safetensors(states[i], tmp_path / f"m{i}.safetensors")
        body = {k: v for k, v in fishers[i].items() if k.startswith("a.")}
        save_safetensors(body, tmp_path / f"f{i}.safetensors")
    merge_checkpoints(
        [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"],
        [tmp_path / "f0.safetensors", tmp_path / "f1.safetensors"],
        tmp_path / "out",
        keep_target=["b"],
    )
    merged = load_state_dict(tmp_path / "out")
    assert torch.equal(merged["b.weight"], states[0]["b.weight"])
    body_fishers = [{k: v for k, v in f.items() if k.startswith("a.")} for f in fishers]
    expected = fisher_merge(states, body_fishers, keep_target=["b"])
    assert torch.equal(merged["a.weight"], expected["a.weight"])


def test_cli_fisher_then_merge_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = make_model()
    g = torch.Generator().manual_seed(1)
    data = {"inputs": torch.randn(40, 4, generator=g), "targets": torch.randint(0, 3, (40,))}
    save_safetensors(data, tmp_path / "data.safetensors")
    weights = []
    for i in range(2):
        state = {k: v + 0.1 * (i + 1) * torch.randn_like(v) for k, v in model.state_dict().items()}
        save_safetensors(state, tmp_path / f"m{i}.safetensors")
        weights.append(state)
        code = cli.main([
            "fisher", "--model", "tests.merging.test_streaming_and_cli:make_model",
            "--weights", f"m{i}.safetensors", "--data", "data.safetensors",
            "--out", f"f{i}.safetensors", "--batch-size", "16", "--mode", "empirical",
        ])  # fmt: skip
        assert code == 0
    # the stored Fisher is diagonal_fisher's on the same data
    reference = make_model()
    reference.load_state_dict(weights[0])
    expected = diagonal_fisher(reference, [(data["inputs"], data["targets"])], mode="empirical")
    stored = load_state_dict(tmp_path / "f0.safetensors")
    for key in expected:
        torch.testing.assert_close(stored[key], expected[key], rtol=1e-5, atol=1e-9)

    (tmp_path / "merge.yaml").write_text(
        "method: fisher\n"
        "models:\n"
        "  - {path: m0.safetensors, fisher: f0.safetensors, weight: 2}\n"
        "  - {path: m1.safetensors, fisher: f1.safetensors, weight: 1}\n"
        "parameters: {preset: authors}\n"
    )
    assert cli.main(["merge", "merge.yaml", "--out", "merged"]) == 0
    merged = load_state_dict(tmp_path / "merged")
    fishers = [load_state_dict(tmp_path / f"f{i}.safetensors") for i in range(2)]
    authors = MergeOptions.from_preset("authors")
    expected_merge = fisher_merge(weights, fishers, [2 / 3, 1 / 3], options=authors)
    for key in expected_merge:
        torch.testing.assert_close(merged[key], expected_merge[key], rtol=1e-6, atol=1e-7)
    assert "merged 4 tensors" in capsys.readouterr().err
    # a second run into the same folder is refused (a usage error, the message names --out)
    assert cli.main(["merge", "merge.yaml", "--out", "merged"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_refuses_a_pickle_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"0.weight": torch.ones(6, 4), "extra": Custom()}, tmp_path / "m.pt")
    save_safetensors({"inputs": torch.randn(4, 4)}, tmp_path / "d.safetensors")
    code = cli.main([
        "fisher", "--model", "tests.merging.test_streaming_and_cli:make_model",
        "--weights", "m.pt", "--data", "d.safetensors", "--out", "f.safetensors",
    ])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "refusing to load" in err and "m.pt" in err and "Custom" in err
    assert not (tmp_path / "f.safetensors").exists()


def test_config_validation_names_the_key(tmp_path):
    ok = {"models": [{"path": "a", "fisher": "fa"}, {"model": "b", "fisher": "fb",
                                                     "parameters": {"weight": 2}}]}  # fmt: skip
    config = parse_merge_config(ok, tmp_path)
    assert config.method == "fisher" and [m.weight for m in config.models] == [1.0, 2.0]
    assert config.models[1].path == tmp_path / "b" and config.out_shard_size == 5 * 10**9
    cases = [
        ({"models": []}, "models must be a non-empty list"),
        ({"models": ["a"], "method": "ties"}, "method must be one of"),
        ({"models": [{"path": "a"}]}, r"models\[0\].fisher is required"),
        ({"models": [{"path": "a", "fisher": "f", "weight": -1}]}, r"models\[0\].weight"),
        ({"models": [{"path": "a", "fisher": "f", "colour": 1}]}, r"models\[0\]: unknown keys"),
        ({"models": ["a"], "method": "average", "dtype": "int8"}, "dtype must be one of"),
        ({"models": ["a"], "method": "average", "out_shard_size": "lots"}, "out_shard_size"),
        ({"models": [{"path": "a", "fisher": "f"}], "parameters": {"floor_mode": "x"}},
         "parameters: floor_mode"),
        ({"models": ["a"], "method": "average", "parameters": {"floor": 0}}, "fisher only"),
        ({"models": ["a"], "typo": 1}, "merge config: unknown keys \\['typo'\\]"),
    ]  # fmt: skip
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_merge_config(data, tmp_path)
