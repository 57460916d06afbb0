"""Glue for training frameworks: AdaHessian's Hessian steps need ``create_graph=True`` in the
backward, which Hugging Face ``Trainer`` and Lightning never pass. AdaBelief and DiffGrad need
no glue (they are plain torch.optim optimizers).

- :mod:`meanwise.integrations.transformers`: ``AdaHessianTrainer`` (needs ``transformers``);
- :mod:`meanwise.integrations.lightning`: ``AdaHessianMixin`` (needs ``pytorch-lightning`` or
  ``lightning``).

Both import their framework, so import the one you use; this package imports neither.
"""

from meanwise.integrations._common import find_adahessian

__all__ = ["find_adahessian"]
