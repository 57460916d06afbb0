"""`meanwise fisher` (compute and store a diagonal Fisher) and `meanwise merge` (merge
checkpoints from a YAML config, streaming). Registered through `meanwise.cli`'s command modules.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from meanwise.cli_args import UsageError, input_file, output_dir, output_file, positive_int

__all__ = ["add_commands", "run_fisher", "run_merge"]

_MERGE_HELP = """\
Merges checkpoints as the YAML config says, one tensor at a time, into the folder DIR
(model.safetensors, or shards with model.safetensors.index.json). DIR appears only when
complete: an interrupted merge keeps nothing (rerun it to start again), and the hidden
.DIR.*.partial folder a killed one leaves is removed by the next merge into DIR. A merge whose
result would be NaN or inf fails naming the tensor. Example config:

  method: fisher          # or average, task_arithmetic (models[0] is the base; no fisher:)
  models:
    - {path: a/, fisher: fisher-a.safetensors, weight: 1.0}
    - {path: b.safetensors, fisher: fisher-b.safetensors, weight: 1.0}
  dtype: bfloat16         # optional
  out_shard_size: 2GB     # optional
  keep_target: [classifier]
  parameters: {preset: authors}   # task_arithmetic: {scale: 0.5}
"""

_FISHER_HELP = """\
Computes the diagonal Fisher of a model on data and stores it as safetensors (parameter name ->
Fisher). The model is either --model 'package.module:factory', a callable returning the
nn.Module (imported from the current folder or sys.path), with --weights loading a checkpoint
into it (safetensors or a torch state dict, never a pickle); or --model-dir DIR, a Hugging Face
model folder (safetensors weights only) loaded as --task sequence-classification or causal-lm.
DATA is a safetensors or torch file with tensors 'inputs' (and 'targets' for --mode empirical),
or with 'input_ids' (and 'attention_mask', 'token_type_ids', 'labels', ...: every tensor is a
keyword argument of the model, 'labels' the targets), or 'package.module:callable' returning an
iterable of batches. --params / --exclude take names, module prefixes or glob patterns, e.g.
--exclude classifier to leave the head out (then keep_target: [classifier] in the merge).
A causal LM's Fisher is over every non-padded token position; --class-chunk-size bounds memory.
"""

HF_TASKS = {"sequence-classification": "classification", "causal-lm": "causal-lm"}


def _import_callable(spec: str, what: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} must be 'package.module:callable'; got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what}: cannot import {module_name!r}: {error}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{what}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{what}: {spec!r} is not callable")
    return target


def _tensor_batches(inputs: Tensor, targets: Tensor | None, size: int) -> Iterator:
    for start in range(0, inputs.shape[0], size):
        stop = start + size
        yield inputs[start:stop], None if targets is None else targets[start:stop]


def _check_finite_tensors(tensors: dict[str, Tensor], what: str) -> None:
    """Refuse NaN/inf in a file's floating tensors: they would make the whole Fisher NaN."""
    from meanwise.merging.pipeline import is_finite

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not is_finite(tensor):
            raise ValueError(f"{what}: tensor {key!r} has NaN or inf entries")


def _expected_input(model: nn.Module) -> str:
    """What the model's first parameterised layer takes, for the --data error message."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return f"inputs [N, ..., {module.in_features}] (its first layer {name!r} is {module})"
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            dims = ", ".join(["N", str(module.in_channels)] + ["..."] * (module.weight.dim() - 2))
            return f"inputs [{dims}] (its first layer {name!r} is {module})"
        if isinstance(module, nn.Embedding):
            return f"integer ids in [0, {module.num_embeddings}) (its first layer {name!r})"
    return "inputs of another shape"


def _check_data_fits(model: nn.Module, spec: str, tensors: dict[str, Tensor]) -> None:
    """One forward on the first example: a file that does not fit the model fails here, named,
    instead of with torch's matmul error inside the Fisher."""
    first = {k: t[:1] for k, t in tensors.items() if k not in ("targets", "labels")}
    inputs = first["inputs"] if "inputs" in first else first
    shapes = {k: list(t.shape) for k, t in tensors.items() if k not in ("targets", "labels")}
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids = tensors.get("input_ids")
    if isinstance(vocab, int) and ids is not None and ids.numel():
        if ids.is_floating_point() or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(
                f"--data {spec}: 'input_ids' must be integer token ids in [0, {vocab}) for "
                f"this model; got {ids.dtype} values in [{ids.min()}, {ids.max()}]"
            )
    training = {m: m.training for m in model.modules()}
    model.eval()  # as diagonal_fisher runs it (one example in train mode upsets BatchNorm)
    try:
        with torch.no_grad():
            model(inputs) if isinstance(inputs, Tensor) else model(**inputs)
    except (RuntimeError, IndexError, TypeError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(
            f"--data {spec}: tensors {shapes} do not fit the model, which expects "
            f"{_expected_input(model)} ({reason})"
        ) from None
    finally:
        for module, flag in training.items():
            module.train(flag)


def _load_data(spec: str, batch_size: int, model: nn.Module) -> Iterable:
    from meanwise.merging.checkpoints import load_state_dict

    if ":" in spec and not Path(spec).exists():
        return _import_callable(spec, "--data")()
    tensors = load_state_dict(spec)
    _check_finite_tensors(tensors, f"--data {spec}")
    if "inputs" not in tensors and "input_ids" not in tensors:
        raise ValueError(
            f"--data {spec}: expected a tensor named 'inputs' or 'input_ids'; found {list(tensors)}"
        )
    if "input_ids" in tensors:
        batches = _dict_batches(spec, tensors, batch_size)
        if batches:
            _check_data_fits(model, spec, tensors)
        return batches
    inputs, targets = tensors["inputs"], tensors.get("targets")
    if targets is not None and targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"--data {spec}: 'targets' has {targets.shape[0]} rows, 'inputs' {inputs.shape[0]}"
        )
    if inputs.dim() and inputs.shape[0]:
        _check_data_fits(model, spec, {"inputs": inputs})
    return _tensor_batches(inputs, targets, batch_size)


def _dict_batches(spec: str, tensors: dict[str, Tensor], size: int) -> list[dict[str, Tensor]]:
    rows = {key: t.shape[0] if t.dim() else 0 for key, t in tensors.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"--data {spec}: the tensors must share their first dimension; got {rows}")
    count = next(iter(rows.values()))
    return [
        {key: t[start : start + size] for key, t in tensors.items()}
        for start in range(0, count, size)
    ]


def _load_hf_model(folder: str, task: str | None) -> nn.Module:
    if task is None:
        raise UsageError(f"--model-dir needs --task, one of {sorted(HF_TASKS)}")
    if not Path(folder).is_dir():
        raise UsageError(f"--model-dir {folder} is not a folder")
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "--model-dir needs the transformers package (pip install transformers)"
        ) from None
    auto = (
        transformers.AutoModelForSequenceClassification
        if task == "sequence-classification"
        else transformers.AutoModelForCausalLM
    )
    # the command's output stays one line: transformers' progress bars and load report are
    # silenced while loading, then restored
    hf_logging = transformers.utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # safetensors only: a pytorch_model.bin is a pickle, never loaded
        model, info = auto.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--model-dir {folder}: cannot load it as {task}: {reason}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        # from_pretrained would initialise them at random: a Fisher of a model that is not
        # the checkpoint's
        raise ValueError(
            f"--model-dir {folder} as --task {task} lacks weights {missing[:3]} (they would be "
            "random); is --task right?"
        )
    return model


def run_fisher(args: argparse.Namespace) -> int:
    try:
        return _run_fisher(args)
    except TypeError as error:  # one line, like every other CLI error (meanwise.cli shows these)
        raise ValueError(str(error)) from None


def _run_fisher(args: argparse.Namespace) -> int:
    from meanwise.merging.checkpoints import load_state_dict, save_safetensors
    from meanwise.merging.fisher import diagonal_fisher

    if (args.model is None) == (args.model_dir is None):
        raise UsageError("give exactly one of --model MODULE:FACTORY and --model-dir DIR")
    if args.model_dir is not None:
        if args.weights:
            raise UsageError("--weights goes with --model; --model-dir loads its own weights")
        model = _load_hf_model(args.model_dir, args.task)
        task = HF_TASKS[args.task]
    else:
        model = _import_callable(args.model, "--model")()
        task = "auto" if args.task is None else HF_TASKS[args.task]
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {args.model} returned {type(model).__name__}, not an nn.Module")
    if args.weights:
        state = load_state_dict(args.weights)
        _check_finite_tensors(state, f"--weights {args.weights}")
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"--weights {args.weights} does not fit the model: {error}") from None
    else:
        source = f"--model-dir {args.model_dir}" if args.model_dir else f"--model {args.model}"
        _check_finite_tensors(dict(model.named_parameters()), f"{source}: the model's weights")
    generator = torch.Generator().manual_seed(args.seed)
    try:
        fisher = diagonal_fisher(
            model,
            _load_data(args.data, args.batch_size, model),
            mode=args.mode,
            n_samples=args.n_samples,
            max_examples=args.max_examples,
            likelihood=args.likelihood,
            generator=generator,
            params=args.params,
            exclude=args.exclude,
            task=task,
            class_chunk_size=args.class_chunk_size,
        )
    except (ValueError, TypeError) as error:
        if str(error).startswith("data "):  # "data batch 3: ...": name the file it came from
            raise ValueError(f"--data {args.data}: {error}") from None
        raise
    source = args.model if args.model is not None else str(args.model_dir)
    metadata = {"mode": args.mode, "likelihood": args.likelihood, "model": source, "task": task,
                "n_samples": str(args.n_samples), "created_by": "meanwise fisher"}  # fmt: skip
    save_safetensors({k: v.contiguous() for k, v in fisher.items()}, args.out, metadata)
    print(f"meanwise: wrote the {args.mode} Fisher of {len(fisher)} tensors to {args.out}",
          file=sys.stderr)  # fmt: skip
    return 0


def run_merge(args: argparse.Namespace) -> int:
    try:
        return _run_merge(args)
    except TypeError as error:  # one line, like every other CLI error
        raise ValueError(str(error)) from None
    except KeyboardInterrupt:
        # the output appears only when complete and a merge does not resume: say so
        print(
            "meanwise: merge interrupted; no partial output is kept (rerun the same command "
            "to start again)",
            file=sys.stderr,
        )
        return 130


def _run_merge(args: argparse.Namespace) -> int:
    from meanwise.merging.config import load_merge_config
    from meanwise.merging.streaming import merge_checkpoints

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    config = load_merge_config(args.config)
    summary = merge_checkpoints(
        [m.path for m in config.models],
        [m.fisher for m in config.models] if config.merge_method.uses_fishers else None,
        args.out,
        coefficients=[m.weight for m in config.models],
        dtype=config.dtype,
        max_shard_bytes=config.out_shard_size,
        keep_target=config.keep_target,
        overwrite=args.overwrite,
        method=config.merge_method,
    )
    print(
        f"meanwise: merged {summary.tensors} tensors ({summary.total_bytes / 1e6:.1f} MB, "
        f"{config.method}) into {summary.out}/ ({', '.join(summary.files)}) in "
        f"{summary.seconds:.1f}s",
        file=sys.stderr,
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `fisher` and `merge` to the `meanwise` command."""
    from meanwise.merging.fisher import FISHER_MODES, LIKELIHOODS

    fisher = subparsers.add_parser(
        "fisher",
        help="compute a model's diagonal Fisher and store it as safetensors",
        description=_FISHER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fisher.add_argument("--model", metavar="MODULE:FACTORY")
    fisher.add_argument("--model-dir", metavar="DIR", help="a Hugging Face model folder")
    fisher.add_argument("--task", choices=sorted(HF_TASKS), help="what --model-dir predicts")
    fisher.add_argument("--params", nargs="+", metavar="PATTERN", help="parameters to include")
    fisher.add_argument("--exclude", nargs="+", metavar="PATTERN", help="parameters to leave out")
    fisher.add_argument("--class-chunk-size", type=positive_int, default=None, metavar="K",
                        help="output cotangents per backward pass (bounds memory)")  # fmt: skip
    fisher.add_argument("--weights", metavar="CHECKPOINT", help="weights to load into the model")
    fisher.add_argument("--data", required=True, metavar="FILE|MODULE:CALLABLE")
    fisher.add_argument("--out", required=True, type=output_file, metavar="FISHER.safetensors")
    fisher.add_argument("--mode", choices=FISHER_MODES, default="exact")
    fisher.add_argument("--likelihood", choices=LIKELIHOODS, default="categorical")
    fisher.add_argument("--n-samples", type=positive_int, default=1,
                        help="draws per example (sampled)")  # fmt: skip
    fisher.add_argument("--max-examples", type=positive_int, default=None)
    fisher.add_argument("--batch-size", type=positive_int, default=256,
                        help="for tensor --data files")  # fmt: skip
    fisher.add_argument("--seed", type=int, default=0, help="seed of --mode sampled")
    fisher.set_defaults(handler=run_fisher)

    merge = subparsers.add_parser(
        "merge",
        help="merge checkpoints (Fisher-weighted or plain) from a YAML config, streaming",
        description=_MERGE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("config", type=input_file, metavar="CONFIG.yaml")
    merge.add_argument("--out", required=True, type=output_dir, metavar="DIR")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    merge.set_defaults(handler=run_merge)
