"""Merge checkpoints tensor by tensor, in bounded memory.

Every key is merged by `merge.accumulate_merge` -- the function `fisher_merge` uses in memory, so
the results are bit-identical: model i (and its Fisher) is read into a fresh buffer only when it
is added, multiplied in place and added to one numerator (and one denominator), so the peak is
about four buffers of the largest tensor in the accumulation dtype (numerator, denominator, the
member and the Fisher being added) for a Fisher merge and two for an average, whatever the
number of models; the result is cast to the output dtype, appended to the current output shard
and dropped. ``normalize`` needs the global norm of
every Fisher before the first merged tensor, so it costs one extra pass over the Fisher files
(one tensor at a time as well).
"""

from __future__ import annotations

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
from meanwise.merging.merge import (
    MergeOptions,
    accumulate_merge,
    fisher_norm,
    is_finite,
    validate_coefficients,
)

__all__ = ["MergeSummary", "merge_checkpoints", "merge_opened", "copy_model_files"]

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


def _is_kept(key: str, keep_target: Sequence[str]) -> bool:
    return any(key == k or key.startswith(k.rstrip(".") + ".") for k in keep_target)


def _validate_models(
    models: Sequence[Checkpoint], keep_target: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(all target keys in order, the merged ones); mismatches name the tensor and the file."""
    target = models[0]
    keys = target.keys()
    merged = [k for k in keys if not _is_kept(k, keep_target)]
    hint = " (a task-specific head? list it under keep_target)"
    for i, model in enumerate(models[1:], start=1):
        theirs = set(model.keys())
        missing = [k for k in merged if k not in theirs]
        if missing:
            raise ValueError(f"models[{i}] ({model.path}) lacks tensors {missing[:5]}{hint}")
        mine = set(keys)
        extra = [k for k in model.keys() if k not in mine and not _is_kept(k, keep_target)]
        if extra:
            raise ValueError(f"models[{i}] ({model.path}) has extra tensors {extra[:5]}{hint}")
        for key in merged:
            a, b = target.spec(key), model.spec(key)
            if a.shape != b.shape:
                raise ValueError(
                    f"tensor {key!r}: models[{i}] ({model.path}) has shape {list(b.shape)}, "
                    f"models[0] has {list(a.shape)}{hint}"
                )
            if a.dtype != b.dtype:
                raise ValueError(
                    f"tensor {key!r}: models[{i}] ({model.path}) has dtype {b.dtype}, models[0] "
                    f"has {a.dtype}; convert one, or set dtype for the output"
                )
    return keys, merged


def _validate_fishers(
    fishers: Sequence[Checkpoint], target: Checkpoint, merged: Sequence[str], missing: str
) -> set[str]:
    merged_set = set(merged)
    covered = set(fishers[0].keys())
    for i, fisher in enumerate(fishers):
        keys = set(fisher.keys())
        unknown = sorted(keys - merged_set)
        if unknown:
            raise ValueError(
                f"fisher of models[{i}] ({fisher.path}) has tensors {unknown[:5]} that are not "
                "merged parameters of models[0]"
            )
        if keys != covered:
            raise ValueError(
                f"the Fishers of models[{i}] and models[0] cover different tensors: "
                f"{sorted(keys ^ covered)[:5]}"
            )
        for key in keys:
            if fisher.spec(key).shape != target.spec(key).shape:
                raise ValueError(
                    f"tensor {key!r}: fisher of models[{i}] ({fisher.path}) has shape "
                    f"{list(fisher.spec(key).shape)}, the parameter {list(target.spec(key).shape)}"
                )
            if not fisher.spec(key).dtype.is_floating_point:
                raise ValueError(f"tensor {key!r}: fisher of models[{i}] is not floating point")
    if missing == "error":
        lacking = [k for k in merged if k not in covered and target.spec(k).dtype.is_floating_point]
        if lacking:
            raise ValueError(f"tensors {lacking[:5]} have no Fisher (missing: error)")
    return covered


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


def merge_opened(
    models: Sequence[Checkpoint],
    fishers: Sequence[Checkpoint] | None,
    out: Path | str,
    coefficients: Sequence[float] | None = None,
    options: MergeOptions = MergeOptions(),  # noqa: B008 - frozen
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 10**9,
    keep_target: Sequence[str] = (),
    overwrite: bool = False,
    copy_files_from: Path | str | None = None,
) -> MergeSummary:
    """Merge opened checkpoints into the folder `out` (fishers None: plain λ-average).

    `copy_files_from`: a model folder whose non-weight files (config, tokenizer) are copied
    into `out` (see `copy_model_files`).
    """
    start = time.perf_counter()
    if not models:
        raise ValueError("need at least one model to merge")
    if fishers is not None and len(fishers) != len(models):
        raise ValueError(f"{len(fishers)} Fishers for {len(models)} models; give one per model")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype; got {dtype}")
    lambdas = validate_coefficients(coefficients, len(models))
    keys, merged = _validate_models(models, keep_target)
    merged_set = set(merged)
    covered: set[str] = set()
    if fishers is not None:
        covered = _validate_fishers(fishers, models[0], merged, options.missing)
    norms = None
    if fishers is not None and options.normalize:
        norms = []
        for i, fisher in enumerate(fishers):
            squares = 0.0
            for key in covered:
                squares += float(fisher.get(key).double().square().sum())
            norms.append(fisher_norm(squares, i))

    def out_spec(key: str) -> TensorSpec:
        spec = models[0].spec(key)
        if dtype is not None and spec.dtype.is_floating_point:
            return TensorSpec(dtype, spec.shape)
        return spec

    specs = {key: out_spec(key) for key in keys}
    shards = plan_shards(specs, max_shard_bytes)
    count = len(shards)
    names = (
        [SINGLE_NAME]
        if count == 1
        else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    summary = MergeSummary(Path(out), files=list(names))
    metadata = {
        "format": "pt",
        "merged_by": "meanwise",
        "method": "fisher" if fishers else "average",
    }
    owned = all(c.owns_buffers for c in [*models, *(fishers or [])])
    with atomic_directory(out, overwrite) as folder:
        weight_map = {}
        for name, shard in zip(names, shards, strict=True):
            with SafetensorsWriter(folder / name, {k: specs[k] for k in shard}, metadata) as w:
                for key in shard:
                    if key in merged_set:
                        # one model (and its Fisher) read at a time, added in place
                        use_fishers = fishers is not None and key in covered
                        try:
                            tensor = accumulate_merge(
                                key,
                                len(models),
                                lambda i, k=key: models[i].get(k),
                                (lambda i, k=key: fishers[i].get(k)) if use_fishers else None,
                                lambdas,
                                options,
                                norms,
                                owned=owned,
                            )
                        except ValueError as error:
                            text = str(error).removeprefix(f"key {key!r}: ")
                            raise ValueError(f"tensor {key!r}: {text}") from None
                    else:
                        tensor = models[0].get(key)
                    w.write(key, _finite_in_dtype(key, tensor, specs[key].dtype))
                    summary.tensors += 1
                    summary.total_bytes += specs[key].nbytes
                    weight_map[key] = name
                    del tensor
        if count > 1:
            index = {"metadata": {"total_size": summary.total_bytes}, "weight_map": weight_map}
            (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
            summary.files.append(INDEX_NAME)
        if copy_files_from is not None:
            summary.files.extend(
                copy_model_files(copy_files_from, folder, _output_float_dtype(specs))
            )
    summary.seconds = time.perf_counter() - start
    return summary


def merge_checkpoints(
    models: Sequence[Path | str],
    fishers: Sequence[Path | str] | None,
    out: Path | str,
    coefficients: Sequence[float] | None = None,
    options: MergeOptions = MergeOptions(),  # noqa: B008 - frozen
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 10**9,
    keep_target: Sequence[str] = (),
    overwrite: bool = False,
    copy_files: bool = True,
) -> MergeSummary:
    """Open the checkpoint paths (any format `open_checkpoint` reads) and `merge_opened` them.

    The output is a folder: ``model.safetensors``, or shards ``model-0000k-of-0000n.safetensors``
    with ``model.safetensors.index.json`` when it exceeds `max_shard_bytes`; it appears only
    when complete. With `copy_files` and a target (``models[0]``) that is a folder, the
    target's config, tokenizer and generation config are copied in too (`copy_model_files`).
    """
    opened: list[Checkpoint] = []
    try:
        for path in models:
            opened.append(open_checkpoint(path))
        opened_fishers = None
        if fishers is not None:
            opened_fishers = []
            for path in fishers:
                opened_fishers.append(open_checkpoint(path))
                opened.append(opened_fishers[-1])
        return merge_opened(
            opened[: len(models)], opened_fishers, out, coefficients, options, dtype,
            max_shard_bytes, keep_target, overwrite,
            Path(models[0]) if copy_files and Path(models[0]).is_dir() else None,
        )  # fmt: skip
    finally:
        for checkpoint in opened:
            checkpoint.close()
