"""Issue 16 for merging: finite inputs never give a NaN/inf merge (merged right, or refused with
the tensor named and nothing written), bad `meanwise fisher` inputs are named in one line, and a
killed or interrupted merge leaves nothing behind that the next run does not clean up."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from meanwise import cli
from meanwise.merging import fisher_merge, load_state_dict, merge_checkpoints, save_safetensors
from meanwise.merging.checkpoints import atomic_directory, remove_stale_partials

REPO = Path(__file__).resolve().parents[2]


def make_model() -> nn.Module:
    """`meanwise fisher --model tests.merging.test_reliability:make_model`."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _write_merge(tmp_path, params, fishers, weights, method="fisher", extra=""):
    lines = [f"method: {method}", "models:"]
    for i, x in enumerate(params):
        save_safetensors({"w": torch.tensor(x)}, tmp_path / f"m{i}.safetensors")
        entry = f"path: m{i}.safetensors, weight: {weights[i]}"
        if fishers is not None:
            save_safetensors({"w": torch.tensor(fishers[i])}, tmp_path / f"f{i}.safetensors")
            entry += f", fisher: f{i}.safetensors"
        lines.append(f"  - {{{entry}}}")
    (tmp_path / "merge.yaml").write_text("\n".join(lines) + "\n" + extra)
    return tmp_path / "merge.yaml"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".old")))


# --- finite inputs that overflow float32 arithmetic: merged right ---------------------------


def _oracle(params, fishers, weights, floor=1e-6):
    """Σ λ F̃ θ / Σ λ F̃ in float64 with F̃ = max(F, floor) (F ≡ 1 for an average)."""
    x = torch.tensor(params, dtype=torch.float64)
    lam = torch.tensor(weights, dtype=torch.float64).reshape(-1, 1)
    f = torch.ones_like(x) if fishers is None else torch.tensor(fishers, dtype=torch.float64)
    w = lam * (f if fishers is None else f.clamp_min(floor))
    return ((w * x).sum(0) / w.sum(0)).float()


OVERFLOWING = {
    # issue 16 §1: each gave [nan, nan, nan, 0], [inf, -inf, ...] or inf, exit 0
    "two Fishers of 3e38, parameters ±10/±20": (
        [[10.0, -10.0, 10.0, -10.0], [20.0, -20.0, -20.0, 20.0]],
        [[3e38] * 4, [3e38] * 4],
        [1.0, 1.0],
    ),
    "a Fisher of 3e38 against a Fisher of 1": (
        [[10.0, -10.0, 10.0, -10.0], [20.0, -20.0, -20.0, 20.0]],
        [[3e38] * 4, [1.0] * 4],
        [1.0, 1.0],
    ),
    "a Fisher of 3e38 and weight 2 against 1e30": (
        [[1.0, 2.0, 3.0], [-3.0, 3e38, 5.0]],
        [[3e38] * 3, [1e30, 3e38, 0.0]],
        [2.0, 1.0],
    ),
    "plain average of two 3e38 tensors": ([[3e38, 1.0], [3e38, 3.0]], None, [1.0, 1.0]),
    "plain average of 3e38 and -3e38 weighted 3:1": (
        [[3e38, -3e38], [-3e38, 1.0]],
        None,
        [3.0, 1.0],
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(OVERFLOWING))
def test_overflowing_finite_merges_equal_the_float64_oracle(tmp_path, monkeypatch, capsys, case):
    params, fishers, weights = OVERFLOWING[case]
    monkeypatch.chdir(tmp_path)
    method = "average" if fishers is None else "fisher"
    config = _write_merge(tmp_path, params, fishers, weights, method)
    assert cli.main(["merge", str(config), "--out", "out"]) == 0, capsys.readouterr().err
    merged = load_state_dict(tmp_path / "out")["w"]
    expected = _oracle(params, fishers, weights)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=0)
    if fishers is not None:  # the in-memory merge takes the same path
        in_memory = fisher_merge(
            [{"w": torch.tensor(x)} for x in params],
            [{"w": torch.tensor(f)} for f in fishers],
            weights,
        )["w"]
        assert torch.equal(in_memory, merged)


# --- merges that cannot be finite: refused, the tensor named, nothing written ---------------

NAN, INF = float("nan"), float("inf")
REFUSED = {
    "a model with NaN": ([[1.0, 2.0], [NAN, 1.0]], [[1.0, 1.0], [1.0, 1.0]], "fisher", "",
                         "tensor 'w': the merge is not finite: models[1] has NaN or inf"),
    "a model with inf (average)": ([[1.0, INF], [2.0, 1.0]], None, "average", "",
                                   "tensor 'w': the merge is not finite: models[0] has NaN"),
    "a Fisher with NaN": ([[1.0, 2.0], [3.0, 1.0]], [[1.0, NAN], [1.0, 1.0]], "fisher", "",
                          "tensor 'w': fishers[0] has non-finite entries"),
    "output dtype float16 overflows": ([[1e5, 2.0], [3e5, 1.0]], None, "average",
                                       "dtype: float16\n", "tensor 'w': its values (up to 2e+05) "
                                       "overflow the output dtype float16"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_non_finite_merge_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys, case):
    params, fishers, method, extra, message = REFUSED[case]
    monkeypatch.chdir(tmp_path)
    config = _write_merge(tmp_path, params, fishers, [1.0, 1.0], method, extra)
    code = cli.main(["merge", str(config), "--out", "out"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_refusal_after_earlier_tensors_were_written_leaves_no_output(tmp_path):
    """A sharded merge whose last tensor is refused: the shards already written are removed."""
    g = torch.Generator().manual_seed(0)
    states = [{f"t{k}": torch.randn(64, generator=g) for k in range(5)} for _ in range(2)]
    states[1]["t4"][3] = NAN
    for i, state in enumerate(states):
        save_safetensors(state, tmp_path / f"m{i}.safetensors")
    with pytest.raises(ValueError, match="tensor 't4': the merge is not finite: models.1."):
        merge_checkpoints(
            [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"], None, tmp_path / "out",
            max_shard_bytes=300,
        )  # fmt: skip
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# --- `meanwise fisher` on bad inputs: one line naming the argument --------------------------


def _fisher_inputs(tmp_path):
    save_safetensors({"inputs": torch.randn(5, 4)}, tmp_path / "ok.safetensors")
    save_safetensors({"inputs": torch.full((5, 4), NAN)}, tmp_path / "nan.safetensors")
    inf_inputs = torch.randn(5, 4)
    inf_inputs[2, 1] = INF
    save_safetensors({"inputs": inf_inputs}, tmp_path / "inf.safetensors")
    save_safetensors({"inputs": torch.randn(5, 7)}, tmp_path / "wide.safetensors")
    save_safetensors({"inputs": torch.randn(5, 4), "targets": torch.tensor([0, 1, 2, 5, 1])},
                     tmp_path / "labels.safetensors")  # fmt: skip
    save_safetensors({"inputs": torch.full((5, 4), 1e30)}, tmp_path / "huge.safetensors")
    state = {k: v.clone() for k, v in make_model().state_dict().items()}
    state["0.weight"][0, 0] = NAN
    save_safetensors(state, tmp_path / "nan_weights.safetensors")


FISHER_BAD = [
    # (extra arguments, exit code, fragment of the one-line message)
    (["--data", "nan.safetensors"], 1, "--data nan.safetensors: tensor 'inputs' has NaN or inf"),
    (["--data", "inf.safetensors"], 1, "--data inf.safetensors: tensor 'inputs' has NaN or inf"),
    (["--data", "wide.safetensors"], 1,
     "--data wide.safetensors: tensors {'inputs': [5, 7]} do not fit the model, which expects "
     "inputs [N, ..., 4]"),
    (["--data", "labels.safetensors", "--mode", "empirical"], 1,
     "--data labels.safetensors: data batch 0: targets must be class indices in [0, 3)"),
    (["--data", "huge.safetensors"], 1, "the Fisher of '0.weight' has NaN or inf entries"),
    (["--data", "ok.safetensors", "--weights", "nan_weights.safetensors"], 1,
     "--weights nan_weights.safetensors: tensor '0.weight' has NaN or inf"),
    (["--data", "ok.safetensors", "--batch-size", "0"], 2, "--batch-size: must be >= 1"),
    (["--data", "ok.safetensors", "--class-chunk-size", "-1"], 2, "--class-chunk-size"),
    (["--data", "ok.safetensors", "--n-samples", "0", "--mode", "sampled"], 2, "--n-samples"),
    (["--data", "ok.safetensors", "--model-dir", "."], 2, "give exactly one of --model"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "code", "message"), FISHER_BAD, ids=lambda v: str(v)[:40])
def test_fisher_bad_inputs_are_named_in_one_line(tmp_path, monkeypatch, capsys, extra, code,
                                                 message):  # fmt: skip
    _fisher_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    argv = ["fisher", "--model", "tests.merging.test_reliability:make_model",
            "--out", "f.safetensors", *extra]  # fmt: skip
    capsys.readouterr()
    try:
        result = cli.main(argv)
    except SystemExit as stop:  # argparse's usage errors (exit 2) end in SystemExit
        result = stop.code
    assert result == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "f.safetensors").exists()


# --- leftovers of killed merges; Ctrl-C ----------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _two_models(tmp_path, n_tensors=3):
    g = torch.Generator().manual_seed(1)
    states = [{f"t{k}": torch.randn(32, generator=g) for k in range(n_tensors)} for _ in range(2)]
    for i, state in enumerate(states):
        save_safetensors(state, tmp_path / f"m{i}.safetensors")
    (tmp_path / "merge.yaml").write_text(
        "method: average\nmodels:\n  - {path: m0.safetensors}\n  - {path: m1.safetensors}\n"
    )
    return {k: (states[0][k] + states[1][k]) / 2 for k in states[0]}


def test_a_rerun_removes_stale_partials_of_its_own_output_only(tmp_path, monkeypatch, capsys):
    expected = _two_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    dead = _dead_pid()
    stale = [f".out.{dead}.abc123_z.partial", ".out.k2j4h5g6.partial", f".out.{dead}.q1w2e3r4.old"]
    kept = [
        f".out.{os.getpid()}.livelive.partial",  # a live writer's
        f".out.v2.{dead}.abcdefgh.partial",  # the output out.v2's, not out's
        f".other.{dead}.abcdefgh.partial",  # another output's
        f".out.{dead}.abcdefgh.partial.txt",  # not a temporary name
    ]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half a file")
    assert cli.main(["merge", "merge.yaml", "--out", "out"]) == 0, capsys.readouterr().err
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == sorted(kept)
    merged = load_state_dict(tmp_path / "out")
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-7)


def test_an_old_output_set_aside_is_kept_while_out_is_missing(tmp_path):
    dead = _dead_pid()
    old = tmp_path / f".out.{dead}.abcdefgh.old"
    old.mkdir()
    assert remove_stale_partials(tmp_path / "out") == [] and old.is_dir()
    (tmp_path / "out").mkdir()
    assert remove_stale_partials(tmp_path / "out") == [old] and not old.exists()


def test_interrupted_between_the_renames_keeps_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".partial"):
            raise KeyboardInterrupt  # after the old output was set aside
        return real_replace(src, dst)

    monkeypatch.setattr("meanwise.merging.checkpoints.os.replace", replace)
    with pytest.raises(KeyboardInterrupt), atomic_directory(out, overwrite=True) as folder:
        (folder / "model.safetensors").write_text("new")
    assert (out / "model.safetensors").read_text() == "old"
    assert _leftovers(tmp_path) == []


_SLOW_MERGE = """\
import pathlib, sys, time
from meanwise import cli
from meanwise.merging import checkpoints
original = checkpoints.SafetensorsWriter.write
def write(self, key, tensor):
    original(self, key, tensor)
    pathlib.Path("ready").touch()  # a shard is half written
    time.sleep(120)
checkpoints.SafetensorsWriter.write = write
sys.exit(cli.main(["merge", "merge.yaml", "--out", "out"]))
"""


def _start_slow_merge(tmp_path) -> subprocess.Popen:
    (tmp_path / "slow_merge.py").write_text(textwrap.dedent(_SLOW_MERGE))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "slow_merge.py"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the merge did not start: {process.communicate()[1]}")
        time.sleep(0.05)
    return process


def test_kill_9_leaves_a_partial_that_the_next_run_removes(tmp_path, monkeypatch, capsys):
    expected = _two_models(tmp_path)
    process = _start_slow_merge(tmp_path)
    try:
        assert len(_leftovers(tmp_path)) == 1
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert len(_leftovers(tmp_path)) == 1 and not (tmp_path / "out").exists()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["merge", "merge.yaml", "--out", "out"]) == 0, capsys.readouterr().err
    assert _leftovers(tmp_path) == []
    merged = load_state_dict(tmp_path / "out")
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-7)


def test_ctrl_c_leaves_nothing_and_says_so(tmp_path):
    _two_models(tmp_path)
    process = _start_slow_merge(tmp_path)
    try:
        os.kill(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    lines = err.strip().splitlines()
    assert process.returncode == 130 and len(lines) == 1, err
    assert "merge interrupted; no partial output is kept (rerun the same command" in lines[0]
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


MERGE_BAD = [
    # (arguments after "merge", exit code, fragment of the one-line message)
    (["folder", "--out", "out"], 2, "folder: is a folder; expected a file"),
    (["missing.yaml", "--out", "out"], 2, "missing.yaml: no such file"),
    (["merge.yaml", "--out", "a_file"], 2, "a_file: is a file; expected a folder"),
    (["merge.yaml", "--out", "a_file/below"], 2, "is a file, not a folder"),
    (["merge.yaml", "--out", "full"], 2, "--out full exists and is not empty; pass --overwrite"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "code", "message"), MERGE_BAD, ids=lambda v: str(v)[:40])
def test_merge_bad_arguments_are_usage_errors(tmp_path, monkeypatch, capsys, argv, code, message):
    _two_models(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    try:
        result = cli.main(["merge", *argv])
    except SystemExit as stop:  # argparse's usage errors
        result = stop.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert result == code and len(lines) == 1 and message in lines[0], lines
    assert (tmp_path / "full" / "keep.txt").read_text() == "x" and _leftovers(tmp_path) == []
