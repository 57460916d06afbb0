"""What both framework adapters share: finding the AdaHessian behind a framework's wrappers."""

from __future__ import annotations

from typing import Any

from meanwise.optim import AdaHessian

__all__ = ["find_adahessian"]


def find_adahessian(optimizer: Any) -> AdaHessian | None:
    """The AdaHessian inside ``optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer`` and similar wrappers keep it as ``.optimizer``), or None."""
    seen = 0
    while optimizer is not None and seen < 8:  # wrappers of wrappers; never loop forever
        if isinstance(optimizer, AdaHessian):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None
