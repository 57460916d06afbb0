"""Pure optimizer update rules: tensors in, tensors out (see ``_ops`` for the three flavours)."""

from meanwise.functional._ops import FOREACH, FUNCTIONAL, LOOP, resolve_ops
from meanwise.functional.adabelief import AdaBeliefResult, adabelief, rectification
from meanwise.functional.adahessian import (
    AdaHessianResult,
    adahessian,
    estimate_hessian_diagonal,
    hessian_diagonal,
    hutchinson_products,
    rademacher_like,
    spatial_average,
)
from meanwise.functional.adam import AdamResult, adam
from meanwise.functional.diffgrad import DiffGradResult, diffgrad
from meanwise.functional.sgd import SGDResult, sgd

__all__ = [
    "FOREACH",
    "FUNCTIONAL",
    "LOOP",
    "resolve_ops",
    "adabelief",
    "rectification",
    "AdaBeliefResult",
    "diffgrad",
    "DiffGradResult",
    "adahessian",
    "AdaHessianResult",
    "estimate_hessian_diagonal",
    "hessian_diagonal",
    "hutchinson_products",
    "rademacher_like",
    "spatial_average",
    "sgd",
    "SGDResult",
    "adam",
    "AdamResult",
]
