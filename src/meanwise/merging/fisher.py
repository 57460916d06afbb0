"""Diagonal Fisher information of a model, from per-example gradients without a per-example loop.

For every example n the Fisher is a sum of squared gradients Σ_k (J_nᵀ u_nk)², where J_n is the
Jacobian of the model's output for that example with respect to the parameters and u_nk are a
few *output cotangents* that depend on the mode and the likelihood:

=========  ===============================================  =====================================
mode       categorical likelihood (logits [N, C])            Gaussian likelihood, σ² = 1 ([N, D])
=========  ===============================================  =====================================
exact      u_c = √p_c (e_c − p), c = 1..C                    u_d = e_d, d = 1..D
sampled    u_s = (e_{y_s} − p)/√S, y_s ~ p, s = 1..S         u_s = ε_s/√S, ε_s ~ N(0, I)
empirical  u = e_y − p (y the true label)                    u = f − y (y the true target)
=========  ===============================================  =====================================

(e_c − p is the gradient of log p_c with respect to the logits, and Σ_c p_c (e_c − p)(e_c − p)ᵀ
is the softmax's Fisher, so the exact rows reproduce Σ_c p_c (∂ log p_c/∂θ)².)

How the squared per-example gradients are formed without looping over examples:

1. One forward pass records the input ``a`` and output ``z`` of every Linear, Conv1d/Conv2d,
   LayerNorm and (eval-mode) BatchNorm module.
2. One *batched* backward (``autograd.grad(..., is_grads_batched=True)``) pulls all K cotangents
   back to every recorded ``z`` at once: δ [K, N, ...]. The C classes of the exact mode are one
   backward, not C.
3. Each layer turns (δ, a) into the squared per-example gradient in closed form. A Linear used
   once per example has per-example gradient δ_n a_nᵀ, so Σ_n Σ_k (δ_nk a_nᵀ)² = (Σ_k δ²)ᵀ (a²),
   one matmul. With weight sharing (convolutions, a Linear over sequence positions, a module
   called twice) the per-example gradient is formed first (unfold + batched matmul) and squared
   afterwards, in blocks that bound memory.

Parameters of any other module (embeddings, custom ``nn.Parameter``s used in a ``forward``,
weights tied between modules) go through a general fallback: ``torch.func.vjp`` vmapped over
the K cotangents and over examples, in chunks. It gives the same numbers, only slower.

The closed forms assume what holds for standard models in eval mode: one example's output
depends only on that example's input (no batch statistics), and the parameters of the listed
modules are used only through those modules' own ``forward``.

Hugging Face models are taken as they are: a batch may be a dict (``input_ids``,
``attention_mask``, ..., ``labels`` as the targets) passed as ``model(**batch)``, the output may
carry ``.logits``, transformers' ``Conv1D`` (GPT-2) has a closed form, and tied weights are one
parameter under its first name (``transformer.wte.weight``, the name the checkpoint stores). For
a causal LM (logits ``[N, T, V]``) every non-padded token position is one example, as in the
paper's per-token treatment: the Fisher is the mean over those positions of each position's
Σ_v p_v (∂ log p_v/∂θ)², so the exact mode needs T·V cotangents per sequence. They are generated
and pulled back ``class_chunk_size`` at a time, which bounds memory (activations and parameter
gradients times the chunk), not the total count; ``mode="sampled"`` needs T·S.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.merging.pipeline import is_finite

__all__ = ["diagonal_fisher", "select_parameters", "FISHER_MODES", "LIKELIHOODS", "TASKS"]

FISHER_MODES: tuple[str, ...] = ("exact", "sampled", "empirical")
LIKELIHOODS: tuple[str, ...] = ("categorical", "gaussian")
# "classification": one prediction per example ([N, C] logits, sequence classification);
# "causal-lm": one per token position ([N, T, V]); "auto": from the logits' rank.
TASKS: tuple[str, ...] = ("auto", "classification", "causal-lm")
# Label value that marks a position without a target (Hugging Face's convention).
IGNORE_INDEX = -100

# Elements of one block of per-example gradients [rows, *param_shape]: 2**24 float32 = 64 MiB.
_BLOCK_ELEMENTS = 1 << 24


# --- which modules have closed forms -------------------------------------------------------------

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _has_own_forward(module: nn.Module, base: type) -> bool:
    """True if `module` runs `base.forward` unchanged (a subclass may compute something else)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): y = x W + b with W [in, out], a transposed Linear."""
    kind = type(module)
    return (
        kind.__name__ == "Conv1D"
        and kind.__module__.startswith("transformers.")
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.dim() == 2
        and getattr(module, "nf", None) == module.weight.shape[1]
    )


def _closed_form_kind(module: nn.Module) -> str | None:
    if _has_own_forward(module, nn.Linear):
        return "linear"
    if _is_hf_conv1d(module):
        return "linear_t"
    for base in (nn.Conv1d, nn.Conv2d):
        if _has_own_forward(module, base):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                return None  # 'same'/'valid' or circular padding: the fallback handles them
            return "conv"
    if _has_own_forward(module, nn.LayerNorm):
        return "layernorm"
    for base in _BATCHNORMS:
        if _has_own_forward(module, base):
            return "batchnorm"
    return None


# --- per-layer squared per-example gradients -----------------------------------------------------


@dataclass
class _Call:
    inputs: Tensor  # the module's input a [N, ...] (detached)
    output: Tensor  # the module's output z [N, ...] (in the graph)
    delta: Tensor | None = None  # ∂(u·f)/∂z for every cotangent: [K, N, ...]


@dataclass
class _Layer:
    kind: str
    module: nn.Module
    names: dict[str, str]  # "weight"/"bias" -> the parameter's name in the model
    calls: list[_Call] = field(default_factory=list)


def _conv_patches(module: nn.Module, a: Tensor) -> Tensor:
    """im2col of the conv input: [N, C_in * prod(kernel), L]."""
    if isinstance(module, nn.Conv1d):
        return F.unfold(
            a.unsqueeze(2),
            (1, module.kernel_size[0]),
            dilation=(1, module.dilation[0]),
            padding=(0, module.padding[0]),
            stride=(1, module.stride[0]),
        )
    return F.unfold(
        a,
        module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,
        stride=module.stride,
    )


def _per_example_grads(layer: _Layer, call: _Call, rows: slice) -> dict[str, Tensor]:
    """The gradients of examples `rows` for all K cotangents: {"weight": [K, n, *shape], ...}."""
    module, a, delta = layer.module, call.inputs[rows], call.delta[:, rows]
    k, n = delta.shape[0], delta.shape[1]
    out: dict[str, Tensor] = {}
    if layer.kind in ("linear", "linear_t"):
        a3 = a.reshape(n, -1, a.shape[-1])  # [n, T, in]: T positions share the weight
        d4 = delta.reshape(k, n, -1, delta.shape[-1])  # [K, n, T, out]
        if "weight" in layer.names:
            pattern = "knto,nti->knoi" if layer.kind == "linear" else "knto,nti->knio"
            out["weight"] = torch.einsum(pattern, d4, a3)
        if "bias" in layer.names:
            out["bias"] = d4.sum(2)
    elif layer.kind == "conv":
        groups = module.groups
        patches = _conv_patches(module, a)  # [n, C_in*kk, L]
        patches = patches.reshape(n, groups, -1, patches.shape[-1])  # [n, g, C_in/g*kk, L]
        d = delta.reshape(k, n, groups, module.out_channels // groups, -1)  # [K, n, g, o/g, L]
        if "weight" in layer.names:
            g = torch.einsum("kngol,ngil->kngoi", d, patches)
            out["weight"] = g.reshape(k, n, *module.weight.shape)
        if "bias" in layer.names:
            out["bias"] = d.sum(-1).reshape(k, n, -1)
    elif layer.kind == "layernorm":
        shape = module.normalized_shape
        normalized = F.layer_norm(a, shape, None, None, module.eps)
        lead = tuple(range(2, delta.dim() - len(shape)))  # positions sharing the affine params
        if "weight" in layer.names:
            out["weight"] = (delta * normalized).sum(lead) if lead else delta * normalized
        if "bias" in layer.names:
            out["bias"] = delta.sum(lead) if lead else delta
    elif layer.kind == "batchnorm":
        view = (1, -1) + (1,) * (a.dim() - 2)
        mean = module.running_mean.reshape(view)
        inv_std = torch.rsqrt(module.running_var.reshape(view) + module.eps)
        normalized = (a - mean) * inv_std
        spatial = tuple(range(3, delta.dim()))
        if "weight" in layer.names:
            prod = delta * normalized
            out["weight"] = prod.sum(spatial) if spatial else prod
        if "bias" in layer.names:
            out["bias"] = delta.sum(spatial) if spatial else delta
    return out


def _accumulate_layer(layer: _Layer, fisher: dict[str, Tensor]) -> None:
    calls = [c for c in layer.calls if c.delta is not None]
    if not calls:
        return
    if layer.kind in ("linear", "linear_t") and len(calls) == 1 and calls[0].inputs.dim() == 2:
        # used once per example: Σ_n Σ_k (δ_nk a_nᵀ)² = (Σ_k δ²)ᵀ a², one matmul
        call = calls[0]
        squared_delta = call.delta.square().sum(0)  # [N, out]
        if "weight" in layer.names:
            name = layer.names["weight"]
            value = squared_delta.T @ call.inputs.square()
            if layer.kind == "linear_t":
                value = value.T
            fisher[name] += value.to(fisher[name].dtype)
        if "bias" in layer.names:
            name = layer.names["bias"]
            fisher[name] += squared_delta.sum(0).to(fisher[name].dtype)
        return
    # Weight sharing: form each example's gradient (summed over positions and calls) first,
    # then square; in blocks of examples so that [K, block, *param] stays bounded.
    k, n = calls[0].delta.shape[0], calls[0].delta.shape[1]
    largest = max(p.numel() for p in layer.module.parameters(recurse=False))
    block = max(1, _BLOCK_ELEMENTS // max(1, k * largest))
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        total: dict[str, Tensor] = {}
        for call in calls:
            for key, grad in _per_example_grads(layer, call, rows).items():
                total[key] = grad if key not in total else total[key] + grad
        for key, grad in total.items():
            name = layer.names[key]
            fisher[name] += grad.square().sum((0, 1)).to(fisher[name].dtype)


# --- output cotangents ---------------------------------------------------------------------------


class _Rows:
    """The K output cotangents u [K, N, *output] whose pulled-back squares sum to the Fisher,
    produced `rows(start, stop)` at a time so that the K = T·V rows of an exact per-token Fisher
    never exist at once. `units` is the number of examples (or token positions) they cover."""

    count: int
    units: float

    def rows(self, start: int, stop: int) -> Tensor:
        raise NotImplementedError


class _Materialized(_Rows):
    def __init__(self, cotangents: Tensor, units: float) -> None:
        self.cotangents, self.count, self.units = cotangents, cotangents.shape[0], units

    def rows(self, start: int, stop: int) -> Tensor:
        return self.cotangents[start:stop]


class _Categorical(_Rows):
    """Row r = (position t = r // J, j = r % J); j is the class (exact), the draw (sampled) or
    the true label (empirical, J = 1). The row is w_nt (e_y − p_nt) at position t, zero at every
    other position (each position is its own example), with y = j and w = √p_ntj (exact),
    y ~ p_nt and w = 1/√S (sampled), y the label and w = 1 (empirical); w_nt is 0 at padding."""

    def __init__(
        self,
        logits: Tensor,
        mask: Tensor,
        mode: str,
        labels: Tensor | None,
        n_samples: int,
        generator: torch.Generator | None,
    ) -> None:
        self.shape = logits.shape  # [N, C] or [N, T, V]
        logits3 = logits.detach().reshape(logits.shape[0], -1, logits.shape[-1])
        self.probs = torch.softmax(logits3, dim=-1)
        n, t, v = self.probs.shape
        self.mask = mask.to(self.probs.dtype).reshape(n, t)
        self.mode = mode
        if mode == "exact":
            self.per_position = v
        elif mode == "sampled":
            self.per_position = n_samples
            draws = torch.multinomial(
                self.probs.reshape(n * t, v).float(), n_samples, replacement=True,
                generator=generator,
            )  # fmt: skip
            self.labels = draws.reshape(n, t, n_samples)
            self.scale = 1 / math.sqrt(n_samples)
        else:
            self.per_position = 1
            self.labels = labels.reshape(n, t, 1)
        self.count = t * self.per_position
        self.units = float(self.mask.sum())

    def rows(self, start: int, stop: int) -> Tensor:
        index = torch.arange(start, stop, device=self.probs.device)
        position, j = index // self.per_position, index % self.per_position
        probs = self.probs[:, position].transpose(0, 1)  # [k, N, V]
        weight = self.mask[:, position].T.unsqueeze(-1)  # [k, N, 1]
        if self.mode == "exact":
            label = j.unsqueeze(1).expand(probs.shape[:2]).unsqueeze(-1)  # [k, N, 1]
            weight = weight * probs.gather(-1, label).sqrt()
        else:
            label = self.labels[:, position, j].T.unsqueeze(-1)  # [k, N, 1]
            if self.mode == "sampled":
                weight = weight * self.scale
        values = (-probs).scatter_add_(-1, label, torch.ones_like(label, dtype=probs.dtype))
        values.mul_(weight)
        n, t, v = self.probs.shape
        out = values.new_zeros(stop - start, n, t, v)
        out[torch.arange(stop - start), :, position, :] = values
        return out.reshape(stop - start, *self.shape)


def _gaussian_cotangents(
    outputs: Tensor,
    targets: Tensor | None,
    mode: str,
    n_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Gaussian likelihood with unit variance: ∂ log N(y; f, I)/∂f = y − f."""
    outputs = outputs.detach()
    n, d = outputs.shape
    if mode == "exact":
        eye = torch.eye(d, dtype=outputs.dtype, device=outputs.device)
        return eye.unsqueeze(1).expand(d, n, d)
    if mode == "sampled":
        noise = torch.randn(
            (n_samples, n, d), generator=generator, dtype=outputs.dtype, device=outputs.device
        )
        return noise / math.sqrt(n_samples)
    return (outputs - targets.reshape(n, d).to(outputs.dtype)).unsqueeze(0)


# --- the general fallback (torch.func) -----------------------------------------------------------


def _fallback_accumulate(
    model: nn.Module,
    names: list[str],
    inputs: Tensor,
    cotangents: Tensor,
    fisher: dict[str, Tensor],
    chunk_size: int,
) -> None:
    """Σ_n Σ_k (J_nᵀ u_nk)² for parameters without a closed form, via vmap(vjp)."""
    from torch.func import functional_call, vjp, vmap

    params = dict(model.named_parameters(remove_duplicate=False))
    primals = {name: params[name].detach() for name in names}

    def one_example(x: Tensor, u: Tensor) -> dict[str, Tensor]:
        def output(p: dict[str, Tensor]) -> Tensor:
            return functional_call(model, p, (x.unsqueeze(0),)).reshape(-1)

        _, pull_back = vjp(output, primals)
        (grads,) = vmap(pull_back)(u.reshape(u.shape[0], -1))  # {name: [K, *shape]}
        return {name: g.square().sum(0) for name, g in grads.items()}

    per_example = vmap(one_example, chunk_size=chunk_size, randomness="different")(
        inputs, cotangents.transpose(0, 1)
    )
    for name, value in per_example.items():
        fisher[name] += value.sum(0).to(fisher[name].dtype)


# --- validation and the driver -------------------------------------------------------------------

Inputs = Tensor | dict[str, Tensor]


def _as_inputs(value: object, batch: int) -> Inputs:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        bad = [k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
        if bad or not value:
            raise TypeError(
                f"data batch {batch}: a dict batch must map argument names (input_ids, "
                f"attention_mask, ...) to tensors; {bad[:3] or 'it is empty'}"
            )
        rows = {v.shape[0] if v.dim() else None for v in value.values()}
        if len(rows) != 1 or None in rows:
            raise ValueError(
                f"data batch {batch}: the tensors of a dict batch must share their first "
                f"(example) dimension; got {sorted(str(r) for r in rows)}"
            )
        return dict(value)
    raise TypeError(f"data batch {batch}: inputs must be a tensor or a dict of tensors; got "
                    f"{type(value).__name__}")  # fmt: skip


def _batches(data: Iterable) -> Iterator[tuple[Inputs, Tensor | None]]:
    for i, batch in enumerate(data):
        if isinstance(batch, Tensor):
            yield batch, None
        elif isinstance(batch, Mapping):
            # a Hugging Face batch: `labels` are the targets, the rest are forward's arguments
            targets = batch.get("labels")
            if targets is not None and not isinstance(targets, Tensor):
                raise TypeError(f"data batch {i}: labels must be a tensor")
            yield _as_inputs({k: v for k, v in batch.items() if k != "labels"}, i), targets
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, targets = batch
            if targets is not None and not isinstance(targets, Tensor):
                raise TypeError(f"data batch {i}: targets must be a tensor or None")
            yield _as_inputs(inputs, i), targets
        else:
            raise TypeError(
                f"data must yield (inputs, targets) pairs, input tensors or dicts of tensors; "
                f"batch {i} is {type(batch).__name__}"
            )


def _num_rows(inputs: Inputs) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    return next(iter(inputs.values())).shape[0]


def _slice(inputs: Inputs, rows: slice, device: torch.device | None = None) -> Inputs:
    if isinstance(inputs, Tensor):
        part = inputs[rows]
        return part if device is None else part.to(device)
    return {k: (v[rows] if device is None else v[rows].to(device)) for k, v in inputs.items()}


def _call(model: nn.Module, inputs: Inputs) -> object:
    return model(inputs) if isinstance(inputs, Tensor) else model(**inputs)


def _logits_of(outputs: object) -> Tensor:
    """The prediction tensor: the output itself, or its ``logits`` (Hugging Face outputs)."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if not isinstance(logits, Tensor):
        raise TypeError(
            "the model must return a tensor or an output with a .logits tensor; got "
            f"{type(outputs).__name__}"
        )
    return logits


def _matches(name: str, pattern: str) -> bool:
    """A parameter name matches its own name, a module prefix (``classifier``) or a glob."""
    return (
        name == pattern
        or name.startswith(pattern.rstrip(".") + ".")
        or fnmatch.fnmatchcase(name, pattern)
    )


def select_parameters(
    model: nn.Module,
    params: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> list[str]:
    """Names of the parameters a Fisher is computed for, in the model's order.

    `params`: names, module prefixes (``"bert.encoder"``) or glob patterns (``"*.attention.*"``);
    default every parameter that requires grad. `exclude`: the same kinds of patterns, removed
    afterwards (e.g. ``["classifier"]`` to leave the head out). Tied weights appear once, under
    their first name, the one a checkpoint stores.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = [name for name, p in named.items() if p.requires_grad] or list(named)
    else:
        if isinstance(params, str):
            raise TypeError("params must be an iterable of parameter names, not one string")
        patterns = list(dict.fromkeys(params))
        unknown = [p for p in patterns if not any(_matches(name, p) for name in named)]
        if unknown:
            raise ValueError(
                f"params names {unknown[:5]} are not parameters of the model; "
                f"known names start with {list(named)[:5]}"
            )
        chosen = [name for name in named if any(_matches(name, p) for p in patterns)]
    if exclude is not None:
        if isinstance(exclude, str):
            raise TypeError("exclude must be an iterable of names or patterns, not one string")
        patterns = list(exclude)
        chosen = [name for name in chosen if not any(_matches(name, p) for p in patterns)]
    if not chosen:
        raise ValueError("no parameters left to compute a Fisher for (check params / exclude)")
    return chosen


def _plan(model: nn.Module, chosen: list[str]) -> tuple[list[_Layer], list[str]]:
    """Split the chosen parameters into closed-form layers and fallback names."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    wanted = set(chosen)
    named = dict(model.named_parameters())
    layers: list[_Layer] = []
    closed: set[str] = set()
    for prefix, module in model.named_modules():
        kind = _closed_form_kind(module)
        if kind is None:
            continue
        names = {}
        for local, p in module.named_parameters(recurse=False):
            full = f"{prefix}.{local}" if prefix else local
            # a parameter shared with another module (tied weights) needs the general path
            if full in wanted and named.get(full) is p and owners[id(p)] == 1:
                names[local] = full
        if names:
            if kind == "batchnorm" and module.running_mean is None:
                continue  # no running statistics: batch statistics in every mode, fallback
            layers.append(_Layer(kind, module, names))
            closed.update(names.values())
    fallback = [name for name in chosen if name not in closed]
    return layers, fallback


def _check_batch_statistics(model: nn.Module) -> None:
    for name, module in model.named_modules():
        uses_batch_stats = isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        )
        if uses_batch_stats:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) normalises with batch statistics, "
                "which mixes examples, so per-example gradients are undefined; use eval mode "
                "(eval_mode=True) and a BatchNorm with running statistics"
            )


def _validate_targets(
    outputs: Tensor, targets: Tensor | None, mode: str, likelihood: str, batch: int
) -> None:
    if mode != "empirical":
        return
    if targets is None:
        raise ValueError(f"data batch {batch}: mode='empirical' needs targets; got none")
    n, d = outputs.shape
    if likelihood == "categorical":
        if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(
                f"data batch {batch}: categorical targets must be integer class indices; "
                f"got dtype {targets.dtype}"
            )
        if tuple(targets.shape) != (n,):
            raise ValueError(
                f"data batch {batch}: targets must have shape [{n}]; got {list(targets.shape)}"
            )
        if n and (targets.min() < 0 or targets.max() >= d):
            raise ValueError(f"data batch {batch}: targets must be class indices in [0, {d})")
    elif targets.numel() != n * d:
        raise ValueError(
            f"data batch {batch}: Gaussian targets must match the outputs [{n}, {d}]; "
            f"got {list(targets.shape)}"
        )


def _outputs_2d(outputs: Tensor, n: int, likelihood: str) -> Tensor:
    if not isinstance(outputs, Tensor):
        raise TypeError(f"the model must return a tensor; got {type(outputs).__name__}")
    if likelihood == "gaussian" and outputs.dim() == 1 and outputs.shape[0] == n:
        return outputs.unsqueeze(1)
    if outputs.dim() != 2 or outputs.shape[0] != n:
        raise ValueError(
            f"the model's output must be [N, {'C' if likelihood == 'categorical' else 'D'}] "
            f"for a batch of N={n}; got {list(outputs.shape)}"
        )
    if likelihood == "categorical" and outputs.shape[1] < 2:
        raise ValueError("categorical outputs need at least 2 classes (logits [N, C >= 2])")
    return outputs


def diagonal_fisher(
    model: nn.Module,
    data: Iterable,
    mode: str = "exact",
    n_samples: int = 1,
    max_examples: int | None = None,
    params: Iterable[str] | None = None,
    *,
    likelihood: str = "categorical",
    eval_mode: bool = True,
    chunk_size: int = 256,
    generator: torch.Generator | None = None,
    exclude: Iterable[str] | None = None,
    task: str = "auto",
    class_chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """The diagonal Fisher: the mean over examples of squared per-example log-likelihood gradients.

    Args:
        model: maps a batch of inputs to logits ``[N, C]`` (categorical) or outputs ``[N, D]``
            or ``[N]`` (Gaussian); or a Hugging Face model: an output with ``.logits``
            (``[N, C]`` for sequence classification, ``[N, T, V]`` for a causal LM).
        data: yields ``(inputs, targets)`` batches, bare input tensors, or dicts of tensors
            passed as ``model(**batch)`` (``labels``, if present, are the targets); the targets
            are used only by ``mode="empirical"``. A causal LM's empirical targets are its
            ``labels`` (or its ``input_ids``) shifted by one, ``-100`` and padding ignored.
        mode: ``"exact"`` (Σ_c p_c (∂ log p_c/∂θ)², the authors' choice), ``"sampled"``
            (labels drawn from the model, ``n_samples`` per example) or ``"empirical"`` (the
            true labels).
        n_samples: draws per example (per token position) for ``"sampled"``.
        max_examples: stop after this many examples (sequences; the last batch is truncated).
        params: names, module prefixes or glob patterns of the parameters to compute (default:
            those that require grad); see `select_parameters`.
        likelihood: ``"categorical"`` (softmax over logits) or ``"gaussian"`` (unit variance:
            exact Σ_d (∂f_d/∂θ)², empirical ((f − y)·∂f/∂θ)²).
        eval_mode: put the model in eval mode while estimating (dropout off, BatchNorm running
            statistics); the previous mode is restored afterwards.
        chunk_size: examples per forward/backward; bounds memory (K·chunk·activations).
        generator: random source of ``"sampled"``.
        exclude: patterns of parameters to leave out (e.g. ``["classifier"]``, the head).
        task: ``"classification"`` (one prediction per example), ``"causal-lm"`` (one per
            non-padded token position, ``attention_mask`` marks them; the Fisher is the mean
            over positions) or ``"auto"`` (causal-lm for ``[N, T, V]`` logits).
        class_chunk_size: output cotangents (classes, or positions × classes for a causal LM)
            pulled back per backward pass. Memory grows linearly with it: every recorded
            activation and every fallback parameter gradient is held this many times. Default:
            all at once when they fit in 2**24 elements (64 MiB float32), else fewer.

    Returns:
        ``{name: tensor}`` shaped like each parameter, float32 for half-precision parameters.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"mode must be one of {FISHER_MODES}; got {mode!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}; got {likelihood!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    if task == "causal-lm" and likelihood != "categorical":
        raise ValueError("task='causal-lm' needs likelihood='categorical' (a softmax per token)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1; got {n_samples!r}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None; got {max_examples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if class_chunk_size is not None and (
        isinstance(class_chunk_size, bool) or not isinstance(class_chunk_size, int)
        or class_chunk_size < 1
    ):  # fmt: skip
        raise ValueError(
            f"class_chunk_size must be an integer >= 1 or None; got {class_chunk_size!r}"
        )

    chosen = select_parameters(model, params, exclude)
    named = dict(model.named_parameters())
    fisher = {
        name: torch.zeros_like(
            named[name], dtype=torch.float32 if named[name].dtype in (torch.float16, torch.bfloat16)
            else named[name].dtype, memory_format=torch.contiguous_format,
        ).detach()
        for name in chosen
    }  # fmt: skip
    layers, fallback = _plan(model, chosen)
    training = {m: m.training for m in model.modules()}
    requires = {name: p.requires_grad for name, p in named.items()}
    device = next(iter(named.values())).device
    settings = _Settings(mode, likelihood, task, n_samples, generator, chunk_size, class_chunk_size)
    seen = 0
    units = 0.0
    try:
        if eval_mode:
            model.eval()
        _check_batch_statistics(model)
        for name in chosen:
            named[name].requires_grad_(True)
        with torch.enable_grad():
            for b, (inputs, targets) in enumerate(_batches(data)):
                rows = _num_rows(inputs)
                if max_examples is not None:
                    rows = min(rows, max_examples - seen)
                if targets is not None and targets.shape[0] < rows:
                    raise ValueError(
                        f"data batch {b}: {targets.shape[0]} targets for {rows} examples"
                    )
                for start in range(0, rows, chunk_size):
                    part = slice(start, min(rows, start + chunk_size))
                    x = _slice(inputs, part, device)
                    y = None if targets is None else targets[part].to(device)
                    units += _accumulate_chunk(model, layers, fallback, x, y, settings, fisher, b)
                seen += rows
                if max_examples is not None and seen >= max_examples:
                    break
    finally:
        for module, flag in training.items():
            module.train(flag)
        for name, flag in requires.items():
            named[name].requires_grad_(flag)
    if seen == 0:
        raise ValueError("data yielded no examples; the Fisher is a mean over at least one")
    if units == 0:
        raise ValueError("the data has no token positions to average over (all padding?)")
    for name, value in fisher.items():
        value.div_(units)
        # a NaN/inf Fisher would poison every merge that uses it: refuse it here, named
        if not is_finite(value):
            raise ValueError(
                f"the Fisher of {name!r} has NaN or inf entries: the model's weights or outputs "
                "are not finite on this data, or its squared gradients overflow "
                f"{value.dtype} (check the inputs' scale)"
            )
    return fisher


@dataclass(frozen=True)
class _Settings:
    mode: str
    likelihood: str
    task: str
    n_samples: int
    generator: torch.Generator | None
    chunk_size: int
    class_chunk_size: int | None


def _token_labels(inputs: Inputs, targets: Tensor | None, mask: Tensor, batch: int) -> Tensor:
    """The next-token label of every position ([N, T], -100 where there is none)."""
    if targets is None:
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise ValueError(
                f"data batch {batch}: mode='empirical' for a causal LM needs labels or input_ids"
            )
        targets = inputs["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
    if targets.dim() != 2 or targets.shape != mask.shape:
        raise ValueError(
            f"data batch {batch}: causal-LM labels must be [N, T]={list(mask.shape)}; got "
            f"{list(targets.shape)}"
        )
    if targets.is_floating_point():
        raise TypeError(f"data batch {batch}: labels must be integer token ids")
    shifted = torch.full_like(targets, IGNORE_INDEX)
    shifted[:, :-1] = targets[:, 1:]  # logits at t predict the token at t + 1
    return shifted


def _rows_for(
    logits: Tensor, inputs: Inputs, targets: Tensor | None, s: _Settings, batch: int
) -> _Rows:
    n = logits.shape[0]
    causal = s.task == "causal-lm" or (
        s.task == "auto" and s.likelihood == "categorical" and logits.dim() == 3
    )
    if not causal:
        outputs = _outputs_2d(logits, n, s.likelihood)
        _validate_targets(outputs, targets, s.mode, s.likelihood, batch)
        if s.likelihood == "gaussian":
            cotangents = _gaussian_cotangents(outputs, targets, s.mode, s.n_samples, s.generator)
            return _Materialized(cotangents, float(n))
        return _Categorical(
            outputs, logits.new_ones(n, 1), s.mode, targets, s.n_samples, s.generator
        )
    if logits.dim() != 3 or logits.shape[0] != n:
        raise ValueError(f"a causal LM's logits must be [N, T, V]; got {list(logits.shape)}")
    n, t, v = logits.shape
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    mask = torch.ones(n, t, device=logits.device) if mask is None else mask.to(logits.device)
    if mask.shape != (n, t):
        raise ValueError(f"data batch {batch}: attention_mask must be [N, T]={[n, t]}")
    labels = None
    if s.mode == "empirical":
        labels = _token_labels(inputs, targets, mask, batch)
        valid = labels != IGNORE_INDEX
        if valid.any() and (labels[valid].min() < 0 or labels[valid].max() >= v):
            raise ValueError(f"data batch {batch}: labels must be token ids in [0, {v}) or -100")
        mask = mask * valid
        labels = labels.masked_fill(~valid, 0)
    return _Categorical(logits, mask, s.mode, labels, s.n_samples, s.generator)


def _accumulate_chunk(
    model: nn.Module,
    layers: Sequence[_Layer],
    fallback: list[str],
    inputs: Inputs,
    targets: Tensor | None,
    s: _Settings,
    fisher: dict[str, Tensor],
    batch: int,
) -> float:
    """Add this chunk's squared gradients to `fisher`; returns the examples / positions covered."""
    n = _num_rows(inputs)
    if n == 0:
        return 0.0

    def record(layer: _Layer):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            layer.calls.append(_Call(args[0].detach(), output))
            # downstream in-place ops (ReLU(inplace=True)) must not modify the recorded output
            return output.clone()

        return hook

    handles = [layer.module.register_forward_hook(record(layer)) for layer in layers]
    try:
        logits = _logits_of(_call(model, inputs))
    finally:
        for handle in handles:
            handle.remove()
    try:
        rows = _rows_for(logits, inputs, targets, s, batch)
        outputs = logits.unsqueeze(1) if logits.dim() == 1 else logits
        per_row = n * math.prod(outputs.shape[1:])
        step = s.class_chunk_size or max(1, _BLOCK_ELEMENTS // max(1, per_row))
        step = min(step, rows.count)
        in_graph = [call for layer in layers for call in layer.calls if call.output.requires_grad]
        # A dict batch (a Hugging Face model) cannot go through torch.func's vmap reliably
        # (data-dependent mask code): its fallback parameters get one forward per example,
        # kept for all cotangent chunks, and batched backwards to the parameters.
        examples = None
        if fallback and not isinstance(inputs, Tensor):
            params = dict(model.named_parameters())
            examples = [_logits_of(_call(model, _slice(inputs, slice(i, i + 1)))) for i in range(n)]
            examples = [e.unsqueeze(1) if e.dim() == 1 else e for e in examples]
        for start in range(0, rows.count, step):
            stop = min(rows.count, start + step)
            last = stop == rows.count
            u = rows.rows(start, stop).to(outputs.dtype)
            if in_graph:
                deltas = torch.autograd.grad(
                    outputs,
                    [call.output for call in in_graph],
                    grad_outputs=u,
                    is_grads_batched=True,
                    retain_graph=not last,
                    allow_unused=True,
                    materialize_grads=True,
                )
                for call, delta in zip(in_graph, deltas, strict=True):
                    call.delta = delta.detach()
                for layer in layers:
                    _accumulate_layer(layer, fisher)
                for call in in_graph:
                    call.delta = None
            if not fallback:
                continue
            if examples is None:
                _fallback_accumulate(model, fallback, inputs, u, fisher, s.chunk_size)
                continue
            for i, example in enumerate(examples):
                grads = torch.autograd.grad(
                    example,
                    [params[name] for name in fallback],
                    grad_outputs=u[:, i : i + 1],
                    is_grads_batched=True,
                    retain_graph=not last,
                    allow_unused=True,
                    materialize_grads=True,
                )
                for name, grad in zip(fallback, grads, strict=True):
                    fisher[name] += grad.square().sum(0).to(fisher[name].dtype)
        return rows.units
    finally:
        for layer in layers:
            layer.calls.clear()
