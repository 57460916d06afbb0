"""Checkpoint I/O: safetensors round trips against the safetensors library itself, sharded
folders, torch files only with weights_only (a pickle is never run), atomic writes."""

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from meanwise.merging.checkpoints import (
    SafetensorsWriter,
    TensorSpec,
    atomic_directory,
    load_state_dict,
    open_checkpoint,
    parse_size,
    plan_shards,
    save_safetensors,
)

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
              torch.int32, torch.int8, torch.uint8, torch.bool]  # fmt: skip


def _state():
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, dtype in enumerate(ALL_DTYPES):
        values = torch.randn(3, 5, generator=g) * 50
        state[f"t{i}.{str(dtype)[6:]}"] = values.to(dtype)
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.zeros(0, 4)
    state["big"] = torch.randn(64, 33, generator=g)
    return state


def _equal(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def test_our_writer_is_read_by_the_safetensors_library(tmp_path):
    state = _state()
    path = tmp_path / "a.safetensors"
    save_safetensors(state, path, metadata={"note": "hi"})
    with safe_open(str(path), framework="pt") as f:
        theirs = {key: f.get_tensor(key) for key in f.keys()}
        assert f.metadata() == {"note": "hi"}
    _equal(state, theirs)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_our_reader_reads_the_safetensors_library(tmp_path):
    state = _state()
    path = tmp_path / "b.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    checkpoint = open_checkpoint(path)
    assert checkpoint.metadata == {"format": "pt"}
    assert checkpoint.spec("big") == TensorSpec(torch.float32, (64, 33))
    _equal(state, load_state_dict(path))


def test_corrupt_safetensors_are_rejected_with_the_reason(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({"x": torch.ones(4)}, str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated or padded"):
        open_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="shorter than 8 bytes"):
        open_checkpoint(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length"):
        open_checkpoint(tmp_path / "huge.safetensors")
    header = json.dumps({"x": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"0" * 16
    )
    with pytest.raises(ValueError, match="'x' has 16 bytes of data but shape \\[5\\]"):
        open_checkpoint(tmp_path / "bad.safetensors")


def test_sharded_folder_round_trip(tmp_path):
    state = _state()
    keys = list(state)
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[:4], keys[4:8], keys[8:])):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _equal(state, load_state_dict(folder))
    _equal(state, load_state_dict(folder / "model.safetensors.index.json"))
    os.unlink(folder / "model-00002-of-00003.safetensors")
    with pytest.raises(ValueError, match="shard 'model-00002-of-00003.safetensors'.*missing"):
        open_checkpoint(folder)


def test_plan_shards_respects_the_limit():
    specs = {f"k{i}": TensorSpec(torch.float32, (n,)) for i, n in enumerate([10, 10, 30, 5, 1])}
    assert plan_shards(specs, 80) == [["k0", "k1"], ["k2"], ["k3", "k4"]]
    assert plan_shards(specs, 10**6) == [list(specs)]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="unit"):
        parse_size("5 parsecs")


def test_torch_state_dict_loads_with_weights_only(tmp_path):
    state = {"a": torch.randn(3, 2), "n": torch.tensor(4)}
    torch.save(state, tmp_path / "plain.pt")
    _equal(state, load_state_dict(tmp_path / "plain.pt"))
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pt")
    _equal(state, load_state_dict(tmp_path / "wrapped.pt"))
    torch.save({"a": torch.ones(1), "note": "text"}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="entry 'note' is a str, not a tensor"):
        load_state_dict(tmp_path / "mixed.pt")


class Payload:
    """Unpickling this would run os.system-like code: here it writes a marker file."""

    marker = None

    def __reduce__(self):
        return (open, (str(Payload.marker), "w"))


def test_a_pickle_with_custom_objects_is_refused_and_never_run(tmp_path):
    Payload.marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "evil": Payload()}, tmp_path / "evil.pt")
    assert not Payload.marker.exists()
    with pytest.raises(ValueError, match="refusing to load .*evil.pt.*never runs"):
        load_state_dict(tmp_path / "evil.pt")
    assert not Payload.marker.exists()
    # a raw pickle (not a torch zip file) is refused as well
    with open(tmp_path / "raw.bin", "wb") as f:
        pickle.dump({"evil": Payload()}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        load_state_dict(tmp_path / "raw.bin")
    assert not Payload.marker.exists()


def test_legacy_torch_format_is_refused(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="refusing to load .*not a zip-format"):
        load_state_dict(tmp_path / "old.pt")


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "out.safetensors"
    save_safetensors({"x": torch.zeros(3)}, path)
    before = path.read_bytes()
    specs = {"x": TensorSpec(torch.float32, (3,)), "y": TensorSpec(torch.float32, (2,))}
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, specs) as writer:
            writer.write("x", torch.ones(3))
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="\\['y'\\] were never written"):
        with SafetensorsWriter(path, specs) as writer:
            writer.write("x", torch.ones(3))
    with pytest.raises(ValueError, match="'y' is torch.float64"):
        with SafetensorsWriter(path, specs) as writer:
            writer.write("x", torch.ones(3))
            writer.write("y", torch.ones(2, dtype=torch.float64))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_atomic_directory(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as folder:
            (folder / "part").write_text("half")
            raise RuntimeError("fail")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(out) as folder:
        (folder / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(ValueError, match="not empty"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, overwrite=True) as folder:
        (folder / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
