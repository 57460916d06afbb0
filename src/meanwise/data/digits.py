"""scikit-learn's bundled 8x8 handwritten digits as ready-to-train tensors.

The optimizer comparison needs a real image-classification task that trains in seconds on a
laptop CPU and needs no download: the 1,797 digits images ship inside scikit-learn. The split
is stratified (every class keeps its share in train and test) and determined by the seed alone,
and the pixels are standardised with statistics of the *training* images only, so nothing of
the test set leaks into training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["DigitsSplit", "load_digits", "NUM_CLASSES"]

NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplit:
    """Train and test tensors: images float32 [N, 1, 8, 8] (standardised), labels int64 [N]."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    train_indices: Tensor
    test_indices: Tensor

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)  # [1797, 8, 8], values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def standardizer(
    images: np.ndarray, train_idx: np.ndarray
) -> tuple[Callable[[np.ndarray], Tensor], float]:
    """``to_images(idx)`` -> float32 [n, 1, 8, 8] tensors of the images divided by 16 and
    standardised by the *training* images' scalar mean and std, and the standardised value of a
    blank pixel. Both digits tasks standardise this way, so no test statistics leak in."""
    scaled = images / 16.0
    mean = float(scaled[train_idx].mean())
    std = float(scaled[train_idx].std())
    normalised = (scaled - mean) / std

    def to_images(idx: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(normalised[idx])).unsqueeze(1)

    return to_images, (0.0 - mean) / std


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> DigitsSplit:
    """The digits images split into train/test by `seed` (stratified by class).

    Images are divided by 16 (the pixel maximum) and then standardised by the training set's
    mean and standard deviation, a single scalar each, so conv nets see zero-mean inputs.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    images, labels = _raw_digits()
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    to_images, _ = standardizer(images, train_idx)
    return DigitsSplit(
        train_images=to_images(train_idx),
        train_labels=torch.from_numpy(labels[train_idx].copy()),
        test_images=to_images(test_idx),
        test_labels=torch.from_numpy(labels[test_idx].copy()),
        train_indices=torch.from_numpy(train_idx),
        test_indices=torch.from_numpy(test_idx),
    )
