"""The one weighted-averaging kernel.

Every method in meanwise ends in an average: FedAvg/FedAU/AFA aggregate client updates, gossip
nodes merge their neighbours' models, Fisher merging weights checkpoints elementwise. They all
call the two functions here, so the validation, the dtype policy and the empty-round rule are
written once.

Dtype policy: the result has the promoted floating dtype of the members (and of the weights, if
those are wider); half-precision members (float16/bfloat16) are accumulated in float32 and cast
back, so averaging many half-precision models does not lose precision in the sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "AverageOverflowError",
    "RunningWeightedSum",
    "accumulation_dtypes",
    "weighted_average",
    "average_state_dicts",
    "element_variance",
    "member_variance",
    "rescale_to_variance",
]


class AverageOverflowError(ValueError):
    """The average of finite members lies outside the result dtype's range."""


_HALF = (torch.float16, torch.bfloat16)


def _stack(stacked: Tensor | Sequence[Tensor], name: str) -> Tensor:
    if isinstance(stacked, Tensor):
        if stacked.dim() == 0:
            raise ValueError(f"{name} must have a leading member axis [n, ...]; got a 0-dim tensor")
        return stacked
    if isinstance(stacked, (str, bytes)) or not isinstance(stacked, Sequence):
        raise TypeError(
            f"{name} must be a tensor [n, ...] or a sequence of same-shape tensors; "
            f"got {type(stacked).__name__}"
        )
    if len(stacked) == 0:
        raise ValueError(
            f"{name} is empty; pass a tensor of shape [0, ...] (with denominator=) "
            "to get a zero average for a round without members"
        )
    shapes = {tuple(t.shape) for t in stacked}
    if len(shapes) != 1:
        raise ValueError(f"{name} members must share one shape; got shapes {sorted(shapes)}")
    return torch.stack(list(stacked))


def accumulation_dtypes(*dtypes: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(dtype to accumulate in, dtype to return) for members (and weights) of these dtypes:
    the promoted floating dtype, accumulated in float32 when that is float16/bfloat16."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    if not out.is_floating_point:
        out = torch.get_default_dtype()
    acc = torch.float32 if out in _HALF else out
    return acc, out


def weighted_average(
    stacked: Tensor | Sequence[Tensor],
    weights: Tensor | Sequence[float] | None = None,
    *,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Return Σ_i w_i x_i / Σ_i w_i over the leading (member) axis.

    Args:
        stacked: a tensor ``[n, ...]`` or a sequence of ``n`` same-shape tensors.
        weights: ``None`` (uniform), ``[n]`` (one scalar per member) or ``[n, ...]`` matching
            ``stacked`` (elementwise, e.g. Fisher information).
        denominator: divide by this instead of Σ w. The federated rules that divide by the
            number of clients N rather than by the participants' weight (FedAvg over all
            clients, FedAU) pass ``denominator=N``. With an explicit denominator an empty
            member axis (``[0, ...]``) averages to zeros: a round without participants is a
            no-op, not an error.

    Raises:
        ValueError: shapes that do not match, weights that are not finite, or weights whose sum
            is zero (somewhere, for elementwise weights) without an explicit denominator.
    """
    x = _stack(stacked, "stacked")
    n = x.shape[0]
    if weights is None:
        w = torch.ones(n, dtype=x.dtype if x.is_floating_point() else None, device=x.device)
    else:
        w = torch.as_tensor(weights, device=x.device)
    if not (w.is_floating_point() or w.dtype in (torch.int32, torch.int64, torch.bool)):
        raise TypeError(f"weights must be real numbers; got dtype {w.dtype}")
    if w.dim() == 1:
        if w.shape[0] != n:
            raise ValueError(f"weights has {w.shape[0]} entries but stacked has {n} members")
    elif tuple(w.shape) != tuple(x.shape):
        raise ValueError(
            f"weights must be [n]={[n]} (scalar per member) or match stacked's shape "
            f"{list(x.shape)} (elementwise); got {list(w.shape)}"
        )
    acc, out = accumulation_dtypes(x.dtype, w.dtype if w.is_floating_point() else x.dtype)
    x = x.to(acc)
    w = w.to(acc)
    if not torch.isfinite(w).all():
        raise ValueError("weights must be finite")

    if w.dim() == 1 and x.dim() >= 1:
        # one fused reduction: Σ_i w_i x_i as a contraction over the member axis
        numerator = torch.tensordot(w, x, dims=1) if n > 0 else x.new_zeros(x.shape[1:])
        total = w.sum()
    else:
        numerator = (w * x).sum(0)
        total = w.sum(0)

    if denominator is not None:
        d = torch.as_tensor(denominator, dtype=acc, device=x.device)
        if not torch.isfinite(d).all() or (d == 0).any():
            raise ValueError(f"denominator must be finite and non-zero; got {denominator}")
    elif n == 0:
        raise ValueError(
            "stacked has no members and no denominator= was given; pass denominator= "
            "to get a zero average for an empty round"
        )
    elif (total == 0).any():
        raise ValueError(
            "weights sum to zero"
            + (" at some elements" if w.dim() > 1 else "")
            + "; pass denominator= explicitly or give positive weight to some member"
        )
    result = (numerator / (total if denominator is None else d)).to(out)
    if n > 0 and not bool(torch.isfinite(result).all()):
        # Finite members can still overflow in the products or the sum (two 3e38 float32
        # updates): redo the average on inputs scaled to magnitude <= 1. Non-finite members
        # are the caller's to refuse; they pass through as before.
        return _scaled_average(x, w, None if denominator is None else d, out)
    return result


def _scaled_average(x: Tensor, w: Tensor, d: Tensor | None, out: torch.dtype) -> Tensor:
    """The weighted average computed on ``x / max|x|`` and ``w / max|w|``, rescaled at the end;
    a ValueError if the true average itself is outside ``out``'s range."""
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(w).all())):
        numerator = torch.tensordot(w, x, dims=1) if w.dim() == 1 else (w * x).sum(0)
        return (numerator / (w.sum(0) if d is None else d)).to(out)
    x_scale = x.abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
    w_scale = w.abs().amax().clamp_min(torch.finfo(w.dtype).tiny)
    xs, ws = x / x_scale, w / w_scale
    numerator = torch.tensordot(ws, xs, dims=1) if ws.dim() == 1 else (ws * xs).sum(0)
    if d is None:
        result = numerator / ws.sum(0) * x_scale
    else:
        result = numerator * ((w_scale / d) * x_scale)
    result = result.to(out)
    if not bool(torch.isfinite(result).all()):
        raise AverageOverflowError(
            f"the weighted average of these finite members overflows {out} (largest member "
            f"magnitude {float(x_scale):.3g}); refuse or clip such updates before averaging"
        )
    return result


class RunningWeightedSum:
    """Σ_i w_i x_i and Σ_i w_i accumulated one member at a time, in place: the streaming form of
    :func:`weighted_average` for members too large to stack (model merging reads one
    checkpoint tensor at a time and holds 2 buffers, 3 with elementwise weights, whatever n is).

    Each product w_i x_i is formed in full and then added, left to right in member order (no
    fused multiply-add). For up to 3 members that is exactly the stacked ``(w * x).sum(0)`` of
    :func:`weighted_average` with elementwise weights (or scalar weights expanded to them);
    with more, torch's reduction over the member axis may add in another order (on the
    project's x86 machine from 5 members) and the two agree to rounding. With ``[n]`` scalar weights
    `weighted_average` contracts with ``tensordot``, which also rounds differently. Scalar
    weights are summed as ``torch.tensor(weights).sum()``, as `weighted_average` sums them.

    Args:
        dtype: the accumulation dtype; ``None``: :func:`accumulation_dtypes` of the first
            member (and weight), so half precision accumulates in float32.

    Not repeated here (the caller's, e.g. the merge pipeline's float64 redo): the rescaled
    redo of an overflowing average, and a finiteness check of elementwise weights.
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype; got {dtype}")
        self.dtype = dtype
        self.out_dtype: torch.dtype | None = dtype
        self.count = 0
        #: Σ w_i x_i in `dtype` (None before the first member)
        self.numerator: Tensor | None = None
        self._elementwise: Tensor | None = None
        self._scalars: list[float] = []

    def add(
        self,
        x: Tensor,
        weight: float | Tensor = 1.0,
        *,
        owned: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Add w x. `weight`: a number, or a tensor of x's shape (elementwise, e.g. a Fisher).

        `owned`: x (and a tensor weight) are fresh buffers this sum may keep and overwrite
        (a file read); otherwise they are copied first and the caller's tensors are untouched.
        `dtype`: form this member's product in that dtype (default: the sum's) before adding
        it into the sum; Fisher merging forms each model's in its (member, Fisher) dtype.
        All members use one kind of weight, scalar or elementwise.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor; got {type(x).__name__}")
        elementwise = isinstance(weight, Tensor)
        if elementwise:
            if tuple(weight.shape) != tuple(x.shape):
                raise ValueError(
                    f"weight must be a number or match x's shape {list(x.shape)}; "
                    f"got {list(weight.shape)}"
                )
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weight must be a number or a tensor; got {type(weight).__name__}")
        elif not math.isfinite(weight):
            raise ValueError(f"weight must be finite; got {weight}")
        if self.numerator is not None:
            if x.shape != self.numerator.shape:
                raise ValueError(
                    f"x has shape {list(x.shape)}; earlier members have "
                    f"{list(self.numerator.shape)}"
                )
            if elementwise != (self._elementwise is not None):
                raise ValueError("weight: all members need one kind, scalar or elementwise")
        if self.dtype is None:
            self.dtype, self.out_dtype = accumulation_dtypes(
                x.dtype, *([weight.dtype] if elementwise and weight.is_floating_point() else [])
            )
        form = self.dtype if dtype is None else dtype
        product = x.to(form, copy=not owned)
        if elementwise:
            w = weight.to(form, copy=not owned)
            product.mul_(w)
            if self._elementwise is None:
                self._elementwise = w
            else:
                self._elementwise.add_(w)
            del w
        else:
            product.mul_(weight)
            self._scalars.append(weight)
        if self.numerator is None:
            self.numerator = product
        else:
            self.numerator.add_(product)
        self.count += 1

    @property
    def denominator(self) -> Tensor:
        """Σ_i w_i in `dtype`: a 0-dim tensor for scalar weights, else x's shape (the buffer
        itself: a caller may patch the elements whose sum is zero before :meth:`result`)."""
        if self.count == 0:
            raise ValueError("no members added")
        if self._elementwise is not None:
            return self._elementwise
        return torch.tensor(self._scalars, dtype=self.dtype).sum()

    def result(self, dtype: torch.dtype | None = None, *, check_zero: bool = True) -> Tensor:
        """Σ w x / Σ w cast to `dtype` (``None``: the members' promoted dtype, as
        `weighted_average` returns), computed in place in the numerator: call it once.

        Raises a ValueError when no member was added, or when scalar weights sum to zero and
        `check_zero` (off: the inf/NaN is the caller's, e.g. the merge pipeline's float64 redo
        of a sum that underflowed). Elementwise weights whose sum is zero somewhere are never
        checked (a full-size pass): check :attr:`denominator` first where that can happen.
        """
        total = self.denominator
        if check_zero and total.dim() == 0 and bool(total == 0):
            raise ValueError("weights sum to zero; give positive weight to some member")
        return self.numerator.div_(total).to(self.out_dtype if dtype is None else dtype)


def average_state_dicts(
    states: Sequence[Mapping[str, Tensor]],
    weights: Tensor | Sequence[float] | None = None,
    elementwise: Sequence[Mapping[str, Tensor]] | None = None,
    *,
    denominator: float | Tensor | None = None,
    strict_dtypes: bool = True,
) -> dict[str, Tensor]:
    """Average state dicts key by key with :func:`weighted_average`.

    Args:
        states: the ``n`` state dicts; all must have the same keys, shapes and dtypes.
        weights: ``[n]`` scalar weights (``None``: uniform).
        elementwise: optional per-state dicts of elementwise weights (e.g. diagonal Fisher).
            For a key present there, member i is weighted by ``weights[i] * elementwise[i][key]``;
            keys absent there (buffers without a Fisher, say) use the scalar weights alone.
        denominator: passed through to :func:`weighted_average`.
        strict_dtypes: if True (default) a key whose dtype differs between states is an error;
            if False floating tensors of different dtypes are averaged in the promoted dtype and
            returned in the first state's dtype.

    Integer and boolean tensors (e.g. BatchNorm's ``num_batches_tracked``) are not averaged:
    they are copied from the first state. The result keeps the first state's key order.

    Raises:
        ValueError: naming the offending key, when keys, shapes or dtypes do not match.
        TypeError: when a value is not a tensor.
    """
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError("states must be a sequence of state dicts")
    if len(states) == 0:
        raise ValueError("states is empty; need at least one state dict to know the keys")
    n = len(states)
    if elementwise is not None and len(elementwise) != n:
        raise ValueError(f"elementwise has {len(elementwise)} dicts but states has {n}")
    if weights is not None:
        w = torch.as_tensor(weights)
        if w.dim() != 1 or w.shape[0] != n:
            raise ValueError(f"weights must have shape [{n}] (one per state); got {list(w.shape)}")
    else:
        w = None

    reference = states[0]
    keys = list(reference.keys())
    key_set = set(keys)
    for i, state in enumerate(states[1:], start=1):
        other = set(state.keys())
        if other != key_set:
            missing = sorted(key_set - other)
            extra = sorted(other - key_set)
            raise ValueError(
                f"states[{i}] keys differ from states[0]: missing {missing[:5]}, extra {extra[:5]}"
            )

    result: dict[str, Tensor] = {}
    for key in keys:
        first = reference[key]
        members = [s[key] for s in states]
        for i, t in enumerate(members):
            if not isinstance(t, Tensor):
                raise TypeError(f"key {key!r} of states[{i}] is {type(t).__name__}, not a tensor")
            if t.shape != first.shape:
                raise ValueError(
                    f"key {key!r}: states[{i}] has shape {list(t.shape)}, "
                    f"states[0] has {list(first.shape)}"
                )
            if t.dtype != first.dtype and (strict_dtypes or not t.is_floating_point()):
                raise ValueError(
                    f"key {key!r}: states[{i}] has dtype {t.dtype}, states[0] has {first.dtype}"
                )
        if not first.is_floating_point() and not first.is_complex():
            result[key] = first.clone()
            continue
        member_weights = w
        if elementwise is not None and key in elementwise[0]:
            fisher = []
            for i, e in enumerate(elementwise):
                if key not in e:
                    raise ValueError(f"key {key!r} is in elementwise[0] but not elementwise[{i}]")
                if e[key].shape != first.shape:
                    raise ValueError(
                        f"key {key!r}: elementwise[{i}] has shape {list(e[key].shape)}, "
                        f"the parameter has {list(first.shape)}"
                    )
                fisher.append(e[key])
            stacked_fisher = torch.stack(fisher)
            if w is not None:
                shape = (n,) + (1,) * first.dim()
                stacked_fisher = stacked_fisher * w.to(stacked_fisher.dtype).reshape(shape)
            member_weights = stacked_fisher
        try:
            averaged = weighted_average(members, member_weights, denominator=denominator)
        except ValueError as err:
            raise ValueError(f"key {key!r}: {err}") from None
        result[key] = averaged.to(first.dtype)
    return result


def _check_batch_dims(batch_dims: int, available: int, shape: torch.Size, name: str) -> None:
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int):
        raise TypeError(f"batch_dims must be an int; got {type(batch_dims).__name__}")
    if not 0 <= batch_dims <= available:
        raise ValueError(
            f"batch_dims must be in [0, {available}] for {name} of shape {list(shape)}; "
            f"got {batch_dims}"
        )


def element_variance(tensor: Tensor, *, batch_dims: int = 0) -> Tensor:
    """The unbiased variance over the elements of a tensor: the one per-tensor variance.

    ``batch_dims`` leading axes index independent tensors (``[k, n]`` with ``batch_dims=1``:
    k variances); half precision accumulates in float32. :func:`member_variance`, the flat
    per-tensor variances of :func:`meanwise.engine.layout.layer_variances` and the gossip
    simulator's logged variances are all this.
    """
    # the gossip simulator calls this per tensor of every pushed model: rows that are already
    # [*batch, elements] in a full-precision dtype go straight to var (no reshape, no cast)
    if batch_dims != tensor.dim() - 1 or isinstance(batch_dims, bool):
        _check_batch_dims(batch_dims, tensor.dim(), tensor.shape, "tensor")
        tensor = tensor.reshape(*tensor.shape[:batch_dims], -1)
    if tensor.dtype in _HALF or not tensor.is_floating_point():
        tensor = tensor.to(accumulation_dtypes(tensor.dtype)[0])
    return tensor.var(dim=-1, unbiased=True)


def member_variance(
    stacked: Tensor | Sequence[Tensor],
    weights: Tensor | None = None,
    *,
    batch_dims: int = 0,
) -> Tensor:
    """The weighted mean over members of each member's unbiased variance over its elements.

    This is the variance a merge should keep: averaging m independently initialised tensors
    shrinks the elementwise variance to about 1/m of theirs (Tian et al., 2024), and
    :func:`rescale_to_variance` restores it. ``weights`` as in :func:`weighted_average`
    (scalar per member; ``None``: uniform).

    ``batch_dims``: the number of axes after the member axis that index independent tensors
    (e.g. ``[m, k, P]`` with ``batch_dims=1`` holds m members of k separate tensors of P
    elements); the result then has those axes (``[k]``), one variance per tensor.
    """
    x = _stack(stacked, "stacked")
    _check_batch_dims(batch_dims, x.dim() - 1, x.shape, "stacked")
    lead = x.shape[: 1 + batch_dims]
    if math.prod(x.shape[1 + batch_dims :]) < 2:
        raise ValueError("member_variance needs tensors with at least 2 elements")
    return weighted_average(element_variance(x, batch_dims=len(lead)), weights)


def rescale_to_variance(
    merged: Tensor, target_variance: Tensor | float, eps: float = 1e-4, *, batch_dims: int = 0
) -> Tensor:
    """``(W - mean(W)) * sqrt((v + eps) / (Var(W) + eps)) + mean(W)``: the variance correction.

    Keeps the merged tensor's mean and pattern and gives it (about) the variance ``v``;
    ``eps`` inside both variances keeps a near-constant tensor from being blown up. Var is the
    unbiased variance over the tensor's elements. A tensor with fewer than 2 elements is
    returned unchanged (it has no spread to correct).

    ``batch_dims``: leading axes that index independent tensors (``[k, ...]`` with
    ``batch_dims=1`` rescales each of the k tensors on its own; ``target_variance`` is then a
    scalar or has shape ``[k]``). This is the batched form the gossip simulator merges with.
    """
    _check_batch_dims(batch_dims, merged.dim(), merged.shape, "merged")
    lead = merged.shape[:batch_dims]
    if math.prod(merged.shape[batch_dims:]) < 2:
        return merged
    acc, out = accumulation_dtypes(merged.dtype)
    w = merged.reshape(*lead, -1).to(acc)
    mean = w.mean(dim=-1, keepdim=True)
    target = torch.as_tensor(target_variance, dtype=acc, device=w.device)
    if target.dim() and tuple(target.shape) != tuple(lead):
        raise ValueError(
            f"target_variance must be a scalar or have shape {list(lead)} (the batch axes); "
            f"got {list(target.shape)}"
        )
    target = target.reshape(*target.shape, 1) if target.dim() else target
    scale = torch.sqrt((target + eps) / (w.var(dim=-1, keepdim=True) + eps))
    return ((w - mean) * scale + mean).reshape(merged.shape).to(out)
