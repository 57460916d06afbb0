"""torch.optim.Optimizer classes: thin stateful shells over the rules in meanwise.functional."""

from meanwise.optim.adabelief import AdaBelief
from meanwise.optim.adahessian import AdaHessian
from meanwise.optim.diffgrad import DiffGrad

__all__ = ["AdaBelief", "AdaHessian", "DiffGrad"]
