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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["diagonal_fisher", "FISHER_MODES", "LIKELIHOODS"]

FISHER_MODES: tuple[str, ...] = ("exact", "sampled", "empirical")
LIKELIHOODS: tuple[str, ...] = ("categorical", "gaussian")

# Elements of one block of per-example gradients [rows, *param_shape]: 2**24 float32 = 64 MiB.
_BLOCK_ELEMENTS = 1 << 24


# --- which modules have closed forms -------------------------------------------------------------

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _has_own_forward(module: nn.Module, base: type) -> bool:
    """True if `module` runs `base.forward` unchanged (a subclass may compute something else)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _closed_form_kind(module: nn.Module) -> str | None:
    if _has_own_forward(module, nn.Linear):
        return "linear"
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
    if layer.kind == "linear":
        a3 = a.reshape(n, -1, a.shape[-1])  # [n, T, in]: T positions share the weight
        d4 = delta.reshape(k, n, -1, delta.shape[-1])  # [K, n, T, out]
        if "weight" in layer.names:
            out["weight"] = torch.einsum("knto,nti->knoi", d4, a3)
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
    if layer.kind == "linear" and len(calls) == 1 and calls[0].inputs.dim() == 2:
        # used once per example: Σ_n Σ_k (δ_nk a_nᵀ)² = (Σ_k δ²)ᵀ a², one matmul
        call = calls[0]
        squared_delta = call.delta.square().sum(0)  # [N, out]
        if "weight" in layer.names:
            name = layer.names["weight"]
            fisher[name] += (squared_delta.T @ call.inputs.square()).to(fisher[name].dtype)
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


def _cotangents(
    outputs: Tensor,
    targets: Tensor | None,
    mode: str,
    likelihood: str,
    n_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    """The K output cotangents u [K, N, D] whose pulled-back squares sum to the Fisher."""
    outputs = outputs.detach()
    n, d = outputs.shape
    if likelihood == "categorical":
        probs = torch.softmax(outputs, dim=-1)
        if mode == "exact":
            eye = torch.eye(d, dtype=outputs.dtype, device=outputs.device)
            # [C, N, C]: row c of example n is √p_nc (e_c − p_n)
            return probs.T.sqrt().unsqueeze(-1) * (eye.unsqueeze(1) - probs.unsqueeze(0))
        if mode == "sampled":
            labels = torch.multinomial(
                probs.float(), n_samples, replacement=True, generator=generator
            )
            onehot = F.one_hot(labels.T, d).to(outputs.dtype)  # [S, N, C]
            return (onehot - probs.unsqueeze(0)) / math.sqrt(n_samples)
        onehot = F.one_hot(targets, d).to(outputs.dtype)
        return (onehot - probs).unsqueeze(0)
    # Gaussian likelihood with unit variance: ∂ log N(y; f, I)/∂f = y − f
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


def _batches(data: Iterable) -> Iterator[tuple[Tensor, Tensor | None]]:
    for i, batch in enumerate(data):
        if isinstance(batch, Tensor):
            yield batch, None
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, targets = batch
            if not isinstance(inputs, Tensor):
                raise TypeError(f"data batch {i}: inputs must be a tensor; got {type(inputs)}")
            if targets is not None and not isinstance(targets, Tensor):
                raise TypeError(f"data batch {i}: targets must be a tensor or None")
            yield inputs, targets
        else:
            raise TypeError(
                f"data must yield (inputs, targets) pairs or input tensors; batch {i} is "
                f"{type(batch).__name__}"
            )


def _selected_names(model: nn.Module, params: Iterable[str] | None) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        chosen = [name for name, p in named.items() if p.requires_grad] or list(named)
    else:
        if isinstance(params, str):
            raise TypeError("params must be an iterable of parameter names, not one string")
        chosen = list(dict.fromkeys(params))
        unknown = [name for name in chosen if name not in named]
        if unknown:
            raise ValueError(
                f"params names {unknown[:5]} are not parameters of the model; "
                f"known names start with {list(named)[:5]}"
            )
    if not chosen:
        raise ValueError("the model has no parameters to compute a Fisher for")
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
) -> dict[str, Tensor]:
    """The diagonal Fisher: the mean over examples of squared per-example log-likelihood gradients.

    Args:
        model: maps a batch of inputs to logits ``[N, C]`` (categorical) or outputs ``[N, D]``
            or ``[N]`` (Gaussian).
        data: yields ``(inputs, targets)`` batches (or bare input tensors); the targets are used
            only by ``mode="empirical"``.
        mode: ``"exact"`` (Σ_c p_c (∂ log p_c/∂θ)², the authors' choice), ``"sampled"``
            (labels drawn from the model, ``n_samples`` per example) or ``"empirical"`` (the
            true labels).
        n_samples: draws per example for ``"sampled"``.
        max_examples: stop after this many examples (the last batch is truncated).
        params: names of the parameters to compute (default: those that require grad).
        likelihood: ``"categorical"`` (softmax over logits) or ``"gaussian"`` (unit variance:
            exact Σ_d (∂f_d/∂θ)², empirical ((f − y)·∂f/∂θ)²).
        eval_mode: put the model in eval mode while estimating (dropout off, BatchNorm running
            statistics); the previous mode is restored afterwards.
        chunk_size: examples per forward/backward; bounds memory (K·chunk·activations).
        generator: random source of ``"sampled"``.

    Returns:
        ``{name: tensor}`` shaped like each parameter, float32 for half-precision parameters.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"mode must be one of {FISHER_MODES}; got {mode!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}; got {likelihood!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1; got {n_samples!r}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None; got {max_examples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")

    chosen = _selected_names(model, params)
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
    seen = 0
    try:
        if eval_mode:
            model.eval()
        _check_batch_statistics(model)
        for name in chosen:
            named[name].requires_grad_(True)
        with torch.enable_grad():
            for b, (inputs, targets) in enumerate(_batches(data)):
                if max_examples is not None:
                    inputs = inputs[: max_examples - seen]
                    targets = None if targets is None else targets[: max_examples - seen]
                for start in range(0, inputs.shape[0], chunk_size):
                    x = inputs[start : start + chunk_size].to(device)
                    y = None if targets is None else targets[start : start + chunk_size].to(device)
                    _accumulate_chunk(
                        model, layers, fallback, x, y, mode, likelihood, n_samples, generator,
                        fisher, chunk_size, b,
                    )  # fmt: skip
                seen += inputs.shape[0]
                if max_examples is not None and seen >= max_examples:
                    break
    finally:
        for module, flag in training.items():
            module.train(flag)
        for name, flag in requires.items():
            named[name].requires_grad_(flag)
    if seen == 0:
        raise ValueError("data yielded no examples; the Fisher is a mean over at least one")
    return {name: value.div_(seen) for name, value in fisher.items()}


def _accumulate_chunk(
    model: nn.Module,
    layers: Sequence[_Layer],
    fallback: list[str],
    inputs: Tensor,
    targets: Tensor | None,
    mode: str,
    likelihood: str,
    n_samples: int,
    generator: torch.Generator | None,
    fisher: dict[str, Tensor],
    chunk_size: int,
    batch: int,
) -> None:
    n = inputs.shape[0]
    if n == 0:
        return

    def record(layer: _Layer):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            layer.calls.append(_Call(args[0].detach(), output))
            # downstream in-place ops (ReLU(inplace=True)) must not modify the recorded output
            return output.clone()

        return hook

    handles = [layer.module.register_forward_hook(record(layer)) for layer in layers]
    try:
        outputs = _outputs_2d(model(inputs), n, likelihood)
    finally:
        for handle in handles:
            handle.remove()
    try:
        _validate_targets(outputs, targets, mode, likelihood, batch)
        cotangents = _cotangents(outputs, targets, mode, likelihood, n_samples, generator)
        calls = [call for layer in layers for call in layer.calls]
        in_graph = [call for call in calls if call.output.requires_grad]
        if in_graph:
            deltas = torch.autograd.grad(
                outputs,
                [call.output for call in in_graph],
                grad_outputs=cotangents.to(outputs.dtype),
                is_grads_batched=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for call, delta in zip(in_graph, deltas, strict=True):
                call.delta = delta.detach()
        for layer in layers:
            _accumulate_layer(layer, fisher)
    finally:
        for layer in layers:
            layer.calls.clear()
    if fallback:
        _fallback_accumulate(model, fallback, inputs, cotangents, fisher, chunk_size)
