"""``AdaHessian``: the Hutchinson-diagonal second-order optimizer as a torch.optim.Optimizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from meanwise.functional import adahessian, estimate_hessian_diagonal, rademacher_like
from meanwise.optim._base import (
    Closure,
    FunctionalOptimizer,
    as_learning_rate,
    check_hyperparameters,
    parameter_name,
)


class AdaHessian(FunctionalOptimizer):
    """AdaHessian (Yao et al., AAAI 2021): Adam with the second moment replaced by an RMS EMA of
    a Hutchinson estimate of the Hessian diagonal.

    Use it like this: the step that estimates the Hessian needs gradients that carry a graph::

        loss = loss_fn(model(x), y)
        loss.backward(create_graph=opt.hessian_due)   # True on Hessian steps
        opt.step()
        opt.zero_grad()

    or ``opt.step(closure)`` with a closure that does the same. ``create_graph=True`` keeps the
    backward graph alive (about one more forward+backward of activation memory) until the step,
    which frees it by detaching the gradients. With ``update_each=k`` only every k-th step (the
    first, then every k) estimates the Hessian; the others reuse the last estimate, keep the
    EMA and bias corrections exact, and need a plain ``backward()`` -- much cheaper.

    Args:
        params: parameters or param groups (``model.named_parameters()`` works too).
        lr, betas: as in Adam; ``betas[1]`` is the EMA of the squared Hessian diagonal.
        eps: added to the denominator.
        weight_decay: decoupled, ``p <- p - lr * wd * p`` (as in the authors' code).
        hessian_power: k in ``denom = (sqrt(v_hat))^k + eps``, in [0, 1].
        update_each: estimate the Hessian every this many steps.
        n_samples: Rademacher probes per estimate; ``D = |mean_s z_s * H z_s|``.
        spatial_average: average the diagonal of conv kernels (tensors of >= 3 dims) over
            their spatial dims; a param-group option, so turn it off for a group of
            non-convolution tensors with >= 3 dims.
        generator: the probes' random generator. ``None`` makes a private one seeded from
            torch's global generator, so ``torch.manual_seed`` before construction fixes it.
            Its state is part of ``state_dict()``: resuming continues the same probes.
            The probes are drawn by the attribute ``probe(tensor, generator)``
            (:func:`meanwise.functional.rademacher_like`); assign another to change them.
        check_finite: raise ValueError naming the parameter if a gradient is nan/inf.
        maximize: maximize the objective (step along the gradient), as in torch.optim; the
            Hessian estimate is unchanged (AdaHessian uses ``|z * Hz|``).
        state_in_float32: for float16/bfloat16 parameters, keep the state (moments and the
            stored Hessian diagonal) in float32; the update is computed in float32 for them.
        distributed: average gradients and Hessian probes over ``process_group`` (the
            optimizer does the communication itself because DDP does not support double
            backward; do not wrap the model in DDP). ``None``: on when torch.distributed is
            initialized. Parameters must start equal on all ranks.
        process_group: the group to average over (default: the world). It is not carried by
            ``copy.deepcopy``/pickle (process groups cannot be), which restore the default.

    Every option is a param-group option, as in torch.optim (``update_each`` and
    ``n_samples`` must be the same in every group: one backward serves all groups), so
    ``state_dict()`` round trips restore them; ``load_state_dict`` takes them from the
    checkpoint, as torch.optim does for every group option. The one step counter is
    torch.optim's per-parameter ``state["step"]``. ``lr`` may be a one-element tensor.
    Complex parameters are refused (the Hutchinson estimate here is for real parameters).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        n_samples: int = 1,
        spatial_average: bool = True,
        generator: torch.Generator | None = None,
        check_finite: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        state_in_float32: bool = True,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        if not isinstance(hessian_power, float | int) or not 0.0 <= hessian_power <= 1.0:
            raise ValueError(f"hessian_power must be in [0, 1]; got {hessian_power!r}")
        _check_cadence(update_each, n_samples)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        if distributed is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=float(hessian_power),
            update_each=update_each,
            n_samples=n_samples,
            spatial_average=spatial_average,
            foreach=foreach,
            maximize=maximize,
            check_finite=check_finite,
            state_in_float32=state_in_float32,
            distributed=bool(distributed),
        )
        super().__init__(params, defaults)
        self._cadence()  # groups given as dicts may carry their own update_each/n_samples
        if generator is None:
            first = next(p for g in self.param_groups for p in g["params"])
            generator = torch.Generator(device=first.device)
            generator.manual_seed(int(torch.randint(0, 2**62, ())))
        self.generator = generator
        self.probe = rademacher_like
        self.process_group = process_group
        self._generator_synced = False

    # -- pickling: torch.optim keeps defaults, state and param_groups; the probe generator and
    # the probe function are state too (a copy must draw the same probes next).
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["generator"] = self.generator
        if self.probe is not rademacher_like:
            state["probe"] = self.probe
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = state.pop("generator", None)
        probe = state.pop("probe", rademacher_like)
        super().__setstate__(state)
        if generator is None:  # an object pickled by an older meanwise
            generator = torch.Generator()
        self.generator = generator
        self.probe = probe
        self.process_group = None
        self._generator_synced = False

    def _cadence(self) -> tuple[int, int]:
        """``(update_each, n_samples)``, the same in every group (validated)."""
        values = {(g["update_each"], g["n_samples"]) for g in self.param_groups}
        if len(values) != 1:
            raise ValueError(
                "update_each and n_samples must be the same in every param group (one backward "
                f"with create_graph serves all groups); got {sorted(values)}"
            )
        update_each, n_samples = values.pop()
        _check_cadence(update_each, n_samples)
        return update_each, n_samples

    @property
    def steps_taken(self) -> int:
        """Steps taken so far: the largest per-parameter ``state["step"]``."""
        steps = [int(s["step"]) for s in self.state.values() if "step" in s]
        return max(steps, default=0)

    @property
    def distributed(self) -> bool:
        return bool(self.defaults["distributed"])

    @property
    def update_each(self) -> int:
        return self._cadence()[0]

    @property
    def n_samples(self) -> int:
        return self._cadence()[1]

    @property
    def hessian_due(self) -> bool:
        """Whether the next step estimates the Hessian (its backward needs create_graph=True)."""
        return self.steps_taken % self.update_each == 0

    # -- distributed helpers -------------------------------------------------------------
    def _all_reduce_mean(self, tensors: list[Tensor]) -> list[Tensor]:
        """Average tensors across ranks in one flat buffer per dtype."""
        dist = torch.distributed
        world = dist.get_world_size(self.process_group)
        out: list[Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for indices in by_dtype.values():
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
            dist.all_reduce(flat, group=self.process_group)
            flat.div_(world)
            sizes = [tensors[i].numel() for i in indices]
            for i, piece in zip(indices, flat.split(sizes), strict=True):
                out[i] = piece.view_as(tensors[i])
        return out  # type: ignore[return-value]

    def _sync_generator(self) -> None:
        """Give every rank rank 0's probe generator, so all ranks draw the same z."""
        dist = torch.distributed
        state = self.generator.get_state()
        source = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
        dist.broadcast(state, src=source, group=self.process_group)
        self.generator.set_state(state)
        self._generator_synced = True

    # -- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Closure = None):
        """One step; a Hessian step (see :attr:`hessian_due`) needs graph-carrying gradients."""
        loss = self._run_closure(closure)
        entries = []  # (group_index, group, param_index_in_group, param)
        for group_index, group in enumerate(self.param_groups):
            params, _ = self._gradients(group_index, group, apply_maximize=False)
            names = {id(p): i for i, p in enumerate(group["params"])}
            entries.extend((group_index, group, names[id(p)], p) for p in params)
        if not entries:
            return loss
        params = [e[3] for e in entries]
        for group_index, group, param_index, p in entries:
            if p.is_complex():
                raise ValueError(
                    "AdaHessian does not support complex parameters (parameter "
                    f"{parameter_name(group, group_index, param_index)})"
                )
        grads = [p.grad for p in params]
        update_each, n_samples = self._cadence()
        hessian_step = self.steps_taken % update_each == 0

        if hessian_step:
            if all(g.grad_fn is None for g in grads):
                group_index, group, param_index, _ = entries[0]
                raise ValueError(
                    "AdaHessian needs gradients that carry a graph on this step (hessian_due is "
                    "True): call loss.backward(create_graph=True) before opt.step() (parameter "
                    f"{parameter_name(group, group_index, param_index)} has a plain gradient)"
                )
            if self.distributed and not self._generator_synced:
                self._sync_generator()
            with torch.enable_grad(), _explain_missing_double_backward():
                diagonals = estimate_hessian_diagonal(
                    grads,
                    params,
                    n_samples=n_samples,
                    generator=self.generator,
                    spatial=[e[1]["spatial_average"] for e in entries],
                    # ranks average the signed products before the absolute value
                    reduce=self._all_reduce_mean if self.distributed else None,
                    probe=self.probe,
                )
        # Dropping the graph-carrying gradients frees the double-backward graph.
        for p in params:
            p.grad = p.grad.detach()
        if self.distributed:
            averaged = self._all_reduce_mean([p.grad for p in params])
            for p, g in zip(params, averaged, strict=True):
                p.grad = g

        for i, (group_index, group, param_index, p) in enumerate(entries):
            self._init_state(group, [p], ("exp_avg", "exp_hessian_diag_sq"))
            state = self.state[p]
            if hessian_step:
                if update_each > 1:
                    keep = state["exp_avg"].dtype  # float32 for half-precision parameters
                    state["hessian_diag"] = diagonals[i].to(keep)
            elif "hessian_diag" not in state:
                raise ValueError(
                    f"parameter {parameter_name(group, group_index, param_index)} has no Hessian "
                    "estimate yet: its first gradient came on a step without one; give it a "
                    "gradient on a Hessian step (opt.hessian_due) first"
                )

        for group in self.param_groups:
            rows = [i for i, e in enumerate(entries) if e[1] is group]
            if not rows:
                continue
            group_params = [params[i] for i in rows]
            group_grads = [params[i].grad for i in rows]
            if group["maximize"]:
                group_grads = torch._foreach_neg(group_grads)
            group_diagonals = [diagonals[i] for i in rows] if hessian_step else None
            beta1, beta2 = group["betas"]
            self._apply_rule(
                group,
                group_params,
                lambda indices, states, ps=group_params, gs=group_grads, ds=group_diagonals: [
                    [ps[i] for i in indices],
                    [gs[i] for i in indices],
                    [
                        ds[i] if ds is not None else s["hessian_diag"]
                        for i, s in zip(indices, states, strict=True)
                    ],
                    [s["exp_avg"] for s in states],
                    [s["exp_hessian_diag_sq"] for s in states],
                ],
                adahessian,
                lr=as_learning_rate(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                hessian_power=group["hessian_power"],
            )
        return loss

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict (options in the groups, steps in the state) plus the probe
        generator's state, so a resume draws the same probes."""
        state = super().state_dict()
        state["adahessian"] = {"generator_state": self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("adahessian", None)
        legacy = extra is not None and "update_each" in extra  # written by meanwise <= 0.1.0
        if legacy:
            groups = [dict(g) for g in state_dict["param_groups"]]
            for g in groups:
                g.setdefault("update_each", int(extra["update_each"]))
                g.setdefault("n_samples", int(extra["n_samples"]))
            state_dict["param_groups"] = groups
        super().load_state_dict(state_dict)
        self._cadence()
        if extra is not None:
            self.generator.set_state(extra["generator_state"])


@contextlib.contextmanager
def _explain_missing_double_backward() -> Iterator[None]:
    """Turn autograd's "no double backward" errors into what to do about them."""
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        missing = ("derivative for" in text and "not implemented" in text) or (
            "double backward" in text
        )
        if not missing:
            raise
        raise RuntimeError(
            "AdaHessian's Hessian-vector product needs a double backward, which an operation "
            f"of this model lacks ({text.splitlines()[0]}). Fused attention kernels "
            "(scaled_dot_product_attention's flash kernel on the CPU) have none: load Hugging "
            "Face models with attn_implementation='eager'. torch.compile'd models cannot "
            "double-backward: do not compile the model you train with AdaHessian."
        ) from error


def _check_cadence(update_each: Any, n_samples: Any) -> None:
    if not isinstance(update_each, int) or isinstance(update_each, bool) or update_each < 1:
        raise ValueError(f"update_each must be an integer >= 1; got {update_each!r}")
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1; got {n_samples!r}")
