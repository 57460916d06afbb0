"""AdaHessian inside Lightning: ``AdaHessianMixin`` for a ``LightningModule``.

Lightning's automatic optimization calls ``LightningModule.backward(loss)`` inside the
optimizer's closure, without ``create_graph``. Put the mixin first among the bases and the
backward keeps the graph whenever the module's AdaHessian is due for a Hessian step::

    class Model(AdaHessianMixin, pl.LightningModule):
        def configure_optimizers(self):
            return AdaHessian(self.parameters(), lr=0.15, update_each=4)

With manual optimization call ``self.manual_backward(loss)`` as usual: it goes through the same
hook. Works with ``pytorch_lightning`` and ``lightning`` (the mixin needs neither at import).
Gradient clipping and ``torch.compile`` have the limits described in
:mod:`meanwise.integrations.transformers`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from meanwise.integrations._common import find_adahessian

__all__ = ["AdaHessianMixin"]


class AdaHessianMixin:
    """Passes ``create_graph=opt.hessian_due`` to the backward of a LightningModule."""

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if "create_graph" not in kwargs and self._adahessian_due():
            kwargs["create_graph"] = True
        super().backward(loss, *args, **kwargs)  # type: ignore[misc]

    def _adahessian_due(self) -> bool:
        trainer = getattr(self, "_trainer", None)
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        return any((opt := find_adahessian(o)) is not None and opt.hessian_due for o in optimizers)
