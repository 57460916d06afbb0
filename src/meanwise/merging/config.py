"""The YAML config of `meanwise merge`, in the spirit of mergekit's.

    method: fisher                 # or: average, task_arithmetic (merge_method works too)
    models:
      - path: finetuned-a/         # safetensors file, sharded folder or torch state dict
        fisher: fisher-a.safetensors
        weight: 1.0                # λ; only ratios matter (default 1 for every model)
      - path: finetuned-b.safetensors
        fisher: fisher-b.safetensors
        weight: 1.0
    dtype: bfloat16                # output dtype of floating tensors (default: the inputs')
    out_shard_size: 5GB            # bytes or '500MB', '2GiB' (default 5GB)
    keep_target: [classifier]      # keys/prefixes copied from the first model (its head)
    parameters:                    # the method's; fisher's, with their defaults:
      floor: 1.0e-6
      floor_mode: max              # max(F, floor) (authors) or add: F + floor (FusionBench)
      favor_target: false
      normalize: false
      missing: average             # tensors without a Fisher: average, or error
      preset: authors              # optional: floor_mode max, favor_target, normalize
                                   # task_arithmetic's: scale: 1.0

Relative paths are relative to the YAML file. The first model is the target (for
task_arithmetic: the pre-trained base, and the weights are absolute, default 1). The methods and
their parameters are those registered in `meanwise.merging.methods`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meanwise.merging.checkpoints import parse_size
from meanwise.merging.methods import MergeMethod, merge_methods, method_class

__all__ = ["ModelEntry", "MergeConfig", "load_merge_config", "parse_merge_config", "DTYPE_NAMES"]

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_TOP_KEYS = {"method", "merge_method", "models", "dtype", "out_shard_size", "keep_target",
             "parameters"}  # fmt: skip
_MODEL_KEYS = {"path", "model", "fisher", "weight", "parameters"}


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    fisher: Path | None
    weight: float


@dataclass(frozen=True)
class MergeConfig:
    method: str
    models: tuple[ModelEntry, ...]
    dtype: torch.dtype | None
    out_shard_size: int
    keep_target: tuple[str, ...]
    merge_method: MergeMethod


def _unknown(found: Mapping, allowed: set[str], where: str) -> None:
    extra = sorted(set(found) - allowed)
    if extra:
        raise ValueError(f"{where}: unknown keys {extra}; allowed: {sorted(allowed)}")


def _model(entry: Any, i: int, base: Path, kind: type[MergeMethod]) -> ModelEntry:
    where = f"models[{i}]"
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a mapping with path/fisher/weight; got {entry!r}")
    _unknown(entry, _MODEL_KEYS, where)
    path = entry.get("path", entry.get("model"))
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}.path must be a checkpoint path (string)")
    weight = entry.get("weight")
    nested = entry.get("parameters") or {}
    if not isinstance(nested, Mapping):
        raise ValueError(f"{where}.parameters must be a mapping")
    _unknown(nested, {"weight"}, f"{where}.parameters")
    weight = nested.get("weight", weight)  # mergekit's spelling: parameters: {weight: ...}
    weight = 1.0 if weight is None else weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"{where}.weight must be a number >= 0; got {weight!r}")
    fisher = entry.get("fisher")
    if fisher is not None and not isinstance(fisher, str):
        raise ValueError(f"{where}.fisher must be a path (string); got {fisher!r}")
    if kind.uses_fishers and fisher is None:
        raise ValueError(f"{where}.fisher is required with method: {kind.name}")
    return ModelEntry(
        path=base / path,
        fisher=base / fisher if (fisher is not None and kind.uses_fishers) else None,
        weight=float(weight),
    )


def parse_merge_config(data: Any, base_dir: Path | str = ".") -> MergeConfig:
    """Validate a parsed YAML document; every error names the offending key."""
    if not isinstance(data, Mapping):
        raise ValueError("the merge config must be a YAML mapping (method:, models:, ...)")
    _unknown(data, _TOP_KEYS, "merge config")
    base = Path(base_dir)
    method = data.get("method", data.get("merge_method", "fisher"))
    kind = method_class(method)  # "method must be one of ..." for an unknown name
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError("models must be a non-empty list of {path, fisher, weight}")
    entries = tuple(_model(m, i, base, kind) for i, m in enumerate(models))
    if sum(e.weight for e in entries) <= 0:
        raise ValueError("models: the weights must not all be zero")
    dtype_name = data.get("dtype")
    if dtype_name is not None and dtype_name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}; got {dtype_name!r}")
    keep = data.get("keep_target") or []
    if isinstance(keep, str):
        keep = [keep]
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        raise ValueError("keep_target must be a list of tensor names or prefixes")
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ValueError("parameters must be a mapping")
    unknown = sorted(set(parameters) - set(kind.parameter_names()))
    if unknown:
        owners = [
            m for m in merge_methods() if set(unknown) <= set(method_class(m).parameter_names())
        ]
        if owners:
            raise ValueError(f"parameters {unknown} apply to method: {' or '.join(owners)} only")
        raise ValueError(
            f"parameters: unknown keys {unknown}; allowed for method {method}: "
            f"{sorted(kind.parameter_names())}"
        )
    try:
        merge_method = kind.from_parameters(dict(parameters))
    except (TypeError, ValueError) as error:
        raise ValueError(f"parameters: {error}") from None
    try:
        shard = parse_size(data.get("out_shard_size", "5GB"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"out_shard_size: {error}") from None
    return MergeConfig(
        method=method,
        models=entries,
        dtype=None if dtype_name is None else DTYPE_NAMES[dtype_name],
        out_shard_size=shard,
        keep_target=tuple(keep),
        merge_method=merge_method,
    )


def load_merge_config(path: Path | str) -> MergeConfig:
    """Read and validate a merge YAML (safe_load: YAML tags cannot construct objects)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"merge config {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    try:
        return parse_merge_config(data, path.parent)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
