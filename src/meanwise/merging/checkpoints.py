"""Reading and writing checkpoints one tensor at a time, never executing a pickle.

Inputs:
- a ``.safetensors`` file, read by this module's own header parser: each tensor is read with a
  positioned file read into a fresh buffer, so a streaming merge holds one tensor per model in
  memory (a memory map would leave every page it touched resident, and count against RSS);
- a Hugging Face style sharded folder: ``*.index.json`` with a ``weight_map`` from tensor name
  to shard file (``model.safetensors.index.json``), or a folder with one ``*.safetensors`` file;
- a torch state dict (``.pt``/``.pth``/``.bin``) loaded only with ``torch.load(...,
  weights_only=True, mmap=True)``: a file that needs anything but tensors and containers (a
  custom class, a function) is refused, its pickle is never run.

Outputs are safetensors files written by `SafetensorsWriter`: the header is written first (every
shape and dtype is known before the merge starts), tensors are appended as they are computed,
and the file appears under its name only when complete (temporary file, fsync, rename). A folder
of shards appears at once with `atomic_directory`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from meanwise.atomic_io import process_alive

__all__ = [
    "DTYPES",
    "TensorSpec",
    "Checkpoint",
    "SafetensorsFile",
    "ShardedCheckpoint",
    "TorchCheckpoint",
    "InMemoryCheckpoint",
    "open_checkpoint",
    "load_state_dict",
    "SafetensorsWriter",
    "save_safetensors",
    "plan_shards",
    "atomic_directory",
    "remove_stale_partials",
    "parse_size",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_INDEX_SUFFIX = ".index.json"


class TensorSpec(NamedTuple):
    """What a tensor will be, known before reading it: dtype and shape (a tuple: a merge
    makes one per tensor and checkpoint while validating)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Checkpoint:
    """A read-only map from tensor names to tensors, read one tensor at a time."""

    path: Path
    # True when `get` returns a fresh buffer the caller may overwrite (a file read), so a merge
    # can accumulate in it instead of copying; False for tensors held in memory.
    owns_buffers: bool = False

    def keys(self) -> list[str]:
        raise NotImplementedError

    def spec(self, key: str) -> TensorSpec:
        raise NotImplementedError

    def get(self, key: str) -> Tensor:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def _missing(self, key: str) -> KeyError:
        return KeyError(f"{self.path}: no tensor named {key!r}")

    def close(self) -> None:
        """Release file handles (reading again reopens them)."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsFile(Checkpoint):
    """One safetensors file; the header is validated on open, tensors are read on `get`."""

    owns_buffers = True  # every `get` reads into a new buffer

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._file = None
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ValueError(
                    f"{self.path}: not a safetensors file (header length {header_len} exceeds "
                    "the file)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{self.path}: corrupt safetensors header: {error}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[TensorSpec, int, int]] = {}
        for key, entry in header.items():
            self._entries[key] = self._parse_entry(key, entry)
        spans = sorted((begin, end, key) for key, (_, begin, end) in self._entries.items())
        position = 0
        for begin, end, key in spans:
            if begin != position:
                raise ValueError(f"{self.path}: tensor {key!r} does not start where the previous "
                                 "one ends (overlapping or gapped data offsets)")  # fmt: skip
            position = end
        if position != size - self._data_start:
            raise ValueError(
                f"{self.path}: the tensors cover {position} bytes but the file holds "
                f"{size - self._data_start} after the header (truncated or padded file)"
            )

    def _parse_entry(self, key: str, entry: object) -> tuple[TensorSpec, int, int]:
        if not isinstance(entry, dict):
            raise ValueError(f"{self.path}: header entry {key!r} is not an object")
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(
                f"{self.path}: tensor {key!r} has dtype {entry.get('dtype')!r}; "
                f"supported: {sorted(DTYPES)}"
            )
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        valid_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        valid_offsets = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        )
        if not (valid_shape and valid_offsets):
            raise ValueError(f"{self.path}: tensor {key!r} has an invalid shape or data_offsets")
        spec = TensorSpec(dtype, tuple(shape))
        if offsets[1] - offsets[0] != spec.nbytes:
            raise ValueError(
                f"{self.path}: tensor {key!r} has {offsets[1] - offsets[0]} bytes of data but "
                f"shape {shape} and dtype {entry['dtype']} need {spec.nbytes}"
            )
        return spec, offsets[0], offsets[1]

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, key: str) -> TensorSpec:
        try:
            return self._entries[key][0]
        except KeyError:
            raise self._missing(key) from None

    def get(self, key: str) -> Tensor:
        try:
            spec, begin, end = self._entries[key]
        except KeyError:
            raise self._missing(key) from None
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open across reads
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            self._file.seek(self._data_start + begin)
            read = self._file.readinto(memoryview(buffer.numpy()))
            if read != end - begin:
                raise ValueError(f"{self.path}: tensor {key!r} is truncated")
        return buffer.view(spec.dtype).reshape(spec.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ShardedCheckpoint(Checkpoint):
    """A folder of shards with an index (``weight_map``: tensor name -> shard file)."""

    def __init__(self, index_path: Path | str) -> None:
        index_path = Path(index_path)
        self.path = index_path.parent
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{index_path}: not a shard index with a weight_map ({error})"
            ) from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: weight_map must map tensor names to shard files")
        self._shards: dict[str, Checkpoint] = {}
        self._owner: dict[str, Checkpoint] = {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise ValueError(f"{index_path}: tensor {key!r} maps to {shard!r}, not a file name")
            if shard not in self._shards:
                shard_path = self.path / shard
                if not shard_path.is_file():
                    raise ValueError(f"{index_path}: shard {shard!r} (for {key!r}) is missing")
                self._shards[shard] = _open_file(shard_path)
            reader = self._shards[shard]
            if key not in reader:
                raise ValueError(f"{index_path}: tensor {key!r} is not in its shard {shard!r}")
            self._owner[key] = reader
        self.owns_buffers = all(shard.owns_buffers for shard in self._shards.values())

    def keys(self) -> list[str]:
        return list(self._owner)

    def spec(self, key: str) -> TensorSpec:
        if key not in self._owner:
            raise self._missing(key)
        return self._owner[key].spec(key)

    def get(self, key: str) -> Tensor:
        if key not in self._owner:
            raise self._missing(key)
        return self._owner[key].get(key)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


class InMemoryCheckpoint(Checkpoint):
    """A state dict behind the `Checkpoint` interface (torch files, tests)."""

    def __init__(self, state: Mapping[str, Tensor], path: Path | str = "<memory>") -> None:
        self.path = Path(path)
        for key, value in state.items():
            if not isinstance(key, str) or not isinstance(value, Tensor):
                raise TypeError(
                    f"{self.path}: entry {key!r} is {type(value).__name__}; a checkpoint maps "
                    "tensor names (str) to tensors"
                )
        self._state = dict(state)

    def keys(self) -> list[str]:
        return list(self._state)

    def spec(self, key: str) -> TensorSpec:
        try:
            t = self._state[key]
        except KeyError:
            raise self._missing(key) from None
        return TensorSpec(t.dtype, tuple(t.shape))

    def get(self, key: str) -> Tensor:
        try:
            return self._state[key]
        except KeyError:
            raise self._missing(key) from None


class TorchCheckpoint(InMemoryCheckpoint):
    """A torch state dict file, loaded with ``weights_only=True, mmap=True`` (lazy pages)."""

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as error:
            reason = str(error).strip().splitlines()
            detail = next((line for line in reason if "GLOBAL" in line or "global" in line), "")
            raise ValueError(
                f"refusing to load {path}: it is a pickle that needs Python objects other than "
                f"tensors ({detail.strip() or reason[0] if reason else 'unknown'}). meanwise "
                "never runs a checkpoint's pickle code; re-save it as a plain state dict or as "
                "safetensors from code you trust"
            ) from None
        except RuntimeError as error:
            if "mmap" in str(error) or "zip" in str(error).lower():
                raise ValueError(
                    f"refusing to load {path}: it is not a zip-format torch checkpoint, which "
                    "is needed to load it memory-mapped with weights_only=True; re-save it "
                    "with a current torch.save or as safetensors"
                ) from None
            raise ValueError(f"cannot load {path} as a torch checkpoint: {error}") from None
        if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, Mapping):
            raise ValueError(
                f"{path}: a torch checkpoint must hold a state dict (a mapping of tensor names "
                f"to tensors); it holds a {type(loaded).__name__}"
            )
        for key, value in loaded.items():
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; only "
                    "flat state dicts (or {'state_dict': ...}) can be merged"
                )
        super().__init__(loaded, path)


def _open_file(path: Path) -> Checkpoint:
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    return TorchCheckpoint(path)


def open_checkpoint(path: Path | str) -> Checkpoint:
    """A safetensors file, a sharded folder (an ``*.index.json`` or a single ``*.safetensors``
    inside), an index file itself, or a torch state dict file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.is_dir():
        indexes = sorted(path.glob(f"*{_INDEX_SUFFIX}"))
        preferred = [p for p in indexes if p.name.endswith(f".safetensors{_INDEX_SUFFIX}")]
        if preferred or indexes:
            return ShardedCheckpoint((preferred or indexes)[0])
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) == 1:
            return SafetensorsFile(singles[0])
        raise ValueError(
            f"{path} is a folder without a shard index (*{_INDEX_SUFFIX}) and with "
            f"{len(singles)} .safetensors files; expected an index or exactly one file"
        )
    if path.name.endswith(_INDEX_SUFFIX):
        return ShardedCheckpoint(path)
    return _open_file(path)


def load_state_dict(path: Path | str) -> dict[str, Tensor]:
    """Every tensor of a checkpoint (any format `open_checkpoint` reads), in memory."""
    with open_checkpoint(path) as checkpoint:
        return {key: checkpoint.get(key) for key in checkpoint.keys()}


# --- writing ---------------------------------------------------------------------------


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor; it appears at `path` only when complete.

    The header needs every tensor's dtype and shape up front (`specs`, in file order); `write`
    must then be called once per key in that order. Use as a context manager: leaving the block
    normally commits (fsync, rename), an exception discards the temporary file.
    """

    def __init__(
        self,
        path: Path | str,
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._specs = list(specs.items())
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise TypeError("safetensors metadata must map str to str")
            header["__metadata__"] = dict(metadata)
        offset = 0
        for key, spec in self._specs:
            if spec.dtype not in _NAMES:
                raise ValueError(f"tensor {key!r}: dtype {spec.dtype} cannot be stored")
            header[key] = {
                "dtype": _NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors does
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self._file = os.fdopen(fd, "wb")
        try:
            self._file.write(struct.pack("<Q", len(encoded)))
            self._file.write(encoded)
        except BaseException:
            self.abort()
            raise

    def write(self, key: str, tensor: Tensor) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: tensor {key!r} is not expected (all specs written)")
        expected_key, spec = self._specs[self._next]
        if key != expected_key:
            raise ValueError(f"{self.path}: expected tensor {expected_key!r} next; got {key!r}")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{self.path}: tensor {key!r} is {tensor.dtype} {list(tensor.shape)}; the header "
                f"says {spec.dtype} {list(spec.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def commit(self) -> None:
        if self._next != len(self._specs):
            missing = [k for k, _ in self._specs[self._next :]]
            raise ValueError(f"{self.path}: tensors {missing[:5]} were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def save_safetensors(
    state: Mapping[str, Tensor], path: Path | str, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a state dict as one safetensors file, atomically."""
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state[{key!r}] is {type(value).__name__}, not a tensor")
    specs = {key: TensorSpec(t.dtype, tuple(t.shape)) for key, t in state.items()}
    with SafetensorsWriter(path, specs, metadata) as writer:
        for key, tensor in state.items():
            writer.write(key, tensor)


def plan_shards(specs: Mapping[str, TensorSpec], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of keys of at most `max_shard_bytes` each (a larger tensor alone)."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1; got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in specs.items():
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += spec.nbytes
    return shards


@contextlib.contextmanager
def atomic_directory(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to `out`; on success it becomes `out` in one rename.

    `out` must not exist or be empty, unless `overwrite`; then the old folder is replaced only
    once the new one is complete. On failure (an exception, Ctrl-C) the temporary folder is
    removed and `out` is untouched. A writer killed outright (``kill -9``, a power cut) leaves
    its temporary folder ``.OUT.PID.XXXXXXXX.partial`` behind: the next write of the same `out`
    removes those whose writer is gone (`remove_stale_partials`), before it starts and after.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    # the writer's pid in the name tells a killed writer's leftover from a live one's
    prefix = f".{out.name}.{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=out.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and old.is_dir() and not out.exists():
            os.replace(old, out)  # interrupted between the two renames: the old output back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_partials(out)  # now that `out` exists, a killed run's `.old` copy can go too


def _temporary_pattern(name: str) -> re.Pattern:
    """`atomic_directory`'s temporaries of the output `name`, and nothing else: the pid, then
    mkdtemp's 8 characters (no dot, so ``.model.v2.PID.XXXXXXXX.partial`` of an output
    ``model.v2`` never matches ``model``); the pid is absent in folders of older versions."""
    return re.compile(rf"\.{re.escape(name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.(partial|old)")


def remove_stale_partials(out: Path | str) -> list[Path]:
    """Remove the temporary folders of the output folder `out` whose writer is gone.

    Only `atomic_directory`'s own names for this very `out` are considered; a folder whose
    writer (the pid in its name) is alive is left alone, and so is a ``.old`` folder (the
    previous output, set aside during the final renames) while `out` itself is missing.
    Returns what was removed.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = _temporary_pattern(out.name)
    removed = []
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid, kind = match.groups()
        if pid is not None and process_alive(int(pid)):
            continue
        if kind == "old" and not out.is_dir():
            continue  # killed between the two renames: this holds the only copy
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MiB"``, ``"2e9"`` (mergekit style)."""
    if isinstance(value, bool):
        raise TypeError(f"a size must be a number of bytes or a string like '5GB'; got {value!r}")
    if isinstance(value, int):
        result = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if match is None:
            raise ValueError(f"cannot read {value!r} as a size like '5GB'")
        unit = match.group(2).upper()
        if unit not in _UNITS:
            raise ValueError(f"unknown size unit in {value!r}; use B, KB, MB, GB, MiB, GiB")
        result = int(float(match.group(1)) * _UNITS[unit])
    else:
        raise TypeError(f"a size must be a number of bytes or a string like '5GB'; got {value!r}")
    if result < 1:
        raise ValueError(f"a size must be positive; got {value!r}")
    return result
