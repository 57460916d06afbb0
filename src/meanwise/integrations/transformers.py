"""AdaHessian inside Hugging Face ``Trainer``: ``AdaHessianTrainer``.

``Trainer`` calls ``accelerator.backward(loss)`` without ``create_graph``, so AdaHessian's
Hessian steps would fail with "AdaHessian needs gradients that carry a graph". This subclass
passes ``create_graph=optimizer.hessian_due`` to that backward (every micro-batch of an
accumulated step gets the same flag, so the accumulated gradient carries one graph) and
nothing else changes: with AdaBelief, DiffGrad or any other optimizer it is a plain Trainer.

Use::

    from meanwise.integrations.transformers import AdaHessianTrainer
    opt = AdaHessian(model.parameters(), lr=0.15, update_each=4)
    trainer = AdaHessianTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

Known limits, each reported by AdaHessian with what to do:
- attention kernels without a double backward (PyTorch's fused ``sdpa`` kernels on the CPU):
  load the model with ``attn_implementation="eager"``;
- ``torch.compile``d models cannot double-backward at all: do not compile the model;
- gradient clipping (``max_grad_norm``, 1.0 by default) rescales the graph-carrying gradients
  in place before the Hessian step; the Hessian estimate then belongs to the *clipped* loss
  (the estimate is of the Hessian of ``c * loss`` with the clip factor ``c``). Set
  ``max_grad_norm=0`` to estimate the loss' own Hessian, as the AdaHessian paper does.
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import Tensor, nn

from meanwise.integrations._common import find_adahessian

__all__ = ["AdaHessianTrainer"]


class AdaHessianTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose backward keeps the graph on AdaHessian's Hessian steps."""

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        adahessian = find_adahessian(self.optimizer)
        if adahessian is None or not adahessian.hessian_due:
            return super().training_step(model, inputs, num_items_in_batch)
        accelerator = self.accelerator
        backward = accelerator.backward

        def backward_with_graph(loss: Tensor, **kwargs: Any) -> None:
            kwargs.setdefault("create_graph", True)
            backward(loss, **kwargs)

        accelerator.backward = backward_with_graph  # this call only; restored below
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del accelerator.backward  # the instance attribute; the class method shows again
