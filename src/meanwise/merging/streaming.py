"""Merge checkpoints tensor by tensor, in bounded memory.

The writer consumes `meanwise.merging.pipeline.iter_merged` -- the path `fisher_merge` takes in
memory, so the results are bit-identical: model i (and its Fisher) is read into a fresh buffer
only when it is added, multiplied in place and added to one numerator (and one denominator), so
the peak is about four buffers of the largest tensor in the accumulation dtype (numerator,
denominator, the member and the Fisher being added) for a Fisher merge, three for task
arithmetic and two for an average, whatever the number of models; each merged tensor is cast
to the output dtype, appended to the current output shard and dropped. ``normalize`` needs the
global norm of every Fisher before the first merged tensor, so it costs one extra pass over the
Fisher files (one tensor at a time as well).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from meanwise.merging.checkpoints import (
    Checkpoint,
    SafetensorsWriter,
    TensorSpec,
    atomic_directory,
    open_checkpoint,
    plan_shards,
)
from meanwise.merging.methods import FisherWeighted, MergeMethod, PlainAverage
from meanwise.merging.options import MergeOptions
from meanwise.merging.pipeline import is_finite, iter_merged

__all__ = [
    "MergeSummary",
    "merge_checkpoints",
    "resolve_method",
    "copy_model_files",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class MergeSummary:
    """What a streaming merge wrote."""

    out: Path
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    total_bytes: int = 0
    seconds: float = 0.0


# Files of a model folder that hold weights (or training state) and are never copied: the merge
# writes its own weights, and a copied shard index would point at the target's shards.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                    ".onnx", ".npz", ".index.json")  # fmt: skip
# Files that describe the target's training, not the merge.
_SKIPPED_NAMES = {"README.md", "trainer_state.json", "training_args.json"}
_DTYPE_STRINGS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                  torch.float64: "float64"}  # fmt: skip


def _output_float_dtype(specs: dict[str, TensorSpec]) -> torch.dtype | None:
    """The floating dtype holding most bytes of the output (what ``torch_dtype`` should say)."""
    sizes: dict[torch.dtype, int] = {}
    for spec in specs.values():
        if spec.dtype.is_floating_point:
            sizes[spec.dtype] = sizes.get(spec.dtype, 0) + spec.nbytes
    return max(sizes, key=sizes.__getitem__) if sizes else None


def copy_model_files(
    source: Path | str, folder: Path | str, dtype: torch.dtype | None
) -> list[str]:
    """Copy the non-weight top-level files of the model folder `source` into `folder`.

    ``config.json`` is rewritten with ``torch_dtype`` and ``dtype`` (the transformers 5 name)
    set to `dtype`; the other files are copied byte for byte. Returns the copied names.
    """
    source, folder = Path(source), Path(folder)
    copied = []
    for path in sorted(source.iterdir()):
        name = path.name
        if (
            not path.is_file()
            or name.startswith(".")
            or name.endswith(_WEIGHT_SUFFIXES)
            or name in _SKIPPED_NAMES
        ):
            continue
        if name == "config.json":
            try:
                config = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{path}: not a JSON model config ({error})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{path}: a model config must be a JSON object")
            if dtype in _DTYPE_STRINGS:
                config["torch_dtype"] = _DTYPE_STRINGS[dtype]
                config["dtype"] = _DTYPE_STRINGS[dtype]
            (folder / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(path, folder / name)
        copied.append(name)
    return copied


def _finite_in_dtype(key: str, tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """`tensor` cast to the output dtype, refused if the cast overflows (a merge never writes
    inf from finite values; `accumulate_merge` already refused non-finite merges)."""
    cast = tensor.to(dtype)
    if dtype != tensor.dtype and dtype.is_floating_point and not is_finite(cast):
        if is_finite(tensor):
            raise ValueError(
                f"tensor {key!r}: its values (up to {float(tensor.abs().amax()):.3g}) overflow "
                f"the output dtype {_DTYPE_STRINGS.get(dtype, dtype)}; choose a wider dtype"
            )
    return cast


def resolve_method(
    method: MergeMethod | None, options: MergeOptions, fishers: Sequence | None
) -> MergeMethod:
    """`method`, or (None) a Fisher merge with `options` when Fishers are given, else the plain
    average; `options` go with the Fisher merge only."""
    if method is None:
        return PlainAverage() if fishers is None else FisherWeighted(options)
    if options != MergeOptions():
        raise TypeError("options= goes with method=None; pass FisherWeighted(options) instead")
    return method


def _opened(source: Path | str | Checkpoint, stack: contextlib.ExitStack) -> Checkpoint:
    """A Checkpoint as given, or the path opened (and closed when `stack` closes)."""
    if isinstance(source, Checkpoint):
        return source
    checkpoint = open_checkpoint(source)
    stack.callback(checkpoint.close)
    return checkpoint


def merge_checkpoints(
    models: Sequence[Path | str | Checkpoint],
    fishers: Sequence[Path | str | Checkpoint] | None,
    out: Path | str,
    coefficients: Sequence[float] | None = None,
    options: MergeOptions = MergeOptions(),  # noqa: B008 - frozen
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 10**9,
    keep_target: Sequence[str] = (),
    overwrite: bool = False,
    copy_files: bool = True,
    method: MergeMethod | None = None,
) -> MergeSummary:
    """Merge checkpoints into the folder `out`, tensor by tensor, with `iter_merged`.

    `models` and `fishers` are paths (any format `open_checkpoint` reads; opened here and
    closed at the end) or opened `Checkpoint`s. `method`: a registered `MergeMethod`
    (``TaskArithmetic(scale=0.5)``); None: a Fisher merge with `options` when Fishers are
    given, else the plain λ-average (see `resolve_method`).

    The output is a folder: ``model.safetensors``, or shards ``model-0000k-of-0000n.safetensors``
    with ``model.safetensors.index.json`` when it exceeds `max_shard_bytes`; it appears only
    when complete. With `copy_files` and a target (``models[0]``) that is a folder, the
    target's config, tokenizer and generation config are copied in too (`copy_model_files`).
    """
    start = time.perf_counter()
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype; got {dtype}")
    method = resolve_method(method, options, fishers)
    with contextlib.ExitStack() as stack:
        opened = [_opened(m, stack) for m in models]
        opened_fishers = None if fishers is None else [_opened(f, stack) for f in fishers]
        merged = iter_merged(opened, opened_fishers, method, coefficients, keep_target)
        target = opened[0]  # iter_merged has checked there is one
        specs = {key: _out_spec(target.spec(key), dtype) for key in target.keys()}
        shards = plan_shards(specs, max_shard_bytes)
        count = len(shards)
        names = (
            [SINGLE_NAME]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        summary = MergeSummary(Path(out), files=list(names))
        metadata = {"format": "pt", "merged_by": "meanwise", "method": method.name}
        with atomic_directory(out, overwrite) as folder:
            weight_map = {}
            for name, shard in zip(names, shards, strict=True):
                with SafetensorsWriter(folder / name, {k: specs[k] for k in shard}, metadata) as w:
                    # the merge's keys come in the target's order, as the shards were planned
                    for key, tensor in itertools.islice(merged, len(shard)):
                        w.write(key, _finite_in_dtype(key, tensor, specs[key].dtype))
                        summary.tensors += 1
                        summary.total_bytes += specs[key].nbytes
                        weight_map[key] = name
                        del tensor
            if count > 1:
                index = {"metadata": {"total_size": summary.total_bytes}, "weight_map": weight_map}
                (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
                summary.files.append(INDEX_NAME)
            # the folder the target was given as (a one-file folder opens as that file)
            source = target.path if isinstance(models[0], Checkpoint) else Path(models[0])
            if copy_files and source.is_dir():
                summary.files.extend(copy_model_files(source, folder, _output_float_dtype(specs)))
    summary.seconds = time.perf_counter() - start
    return summary


def _out_spec(spec: TensorSpec, dtype: torch.dtype | None) -> TensorSpec:
    """The output's spec: floating tensors in `dtype` when one is set."""
    if dtype is not None and spec.dtype.is_floating_point:
        return TensorSpec(dtype, spec.shape)
    return spec
