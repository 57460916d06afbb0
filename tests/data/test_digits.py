"""The digits split: shapes, dtypes, a disjoint deterministic stratified split, no test leak."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sklearn_load_digits

from meanwise.data import load_digits


@pytest.fixture(scope="module")
def raw():
    bunch = sklearn_load_digits()
    return bunch.images.astype(np.float64), bunch.target


def test_shapes_and_dtypes():
    d = load_digits(0)
    n_train, n_test = len(d.train_labels), len(d.test_labels)
    assert n_train + n_test == 1797
    assert d.train_images.shape == (n_train, 1, 8, 8)
    assert d.test_images.shape == (n_test, 1, 8, 8)
    assert d.train_images.dtype == torch.float32 and d.test_images.dtype == torch.float32
    assert d.train_labels.dtype == torch.int64 and d.test_labels.dtype == torch.int64
    assert abs(n_test / 1797 - 0.25) < 0.01


def test_split_is_disjoint_and_covers_everything():
    d = load_digits(3)
    train, test = set(d.train_indices.tolist()), set(d.test_indices.tolist())
    assert not train & test
    assert train | test == set(range(1797))


def test_split_is_deterministic_per_seed():
    a, b, c = load_digits(1), load_digits(1), load_digits(2)
    assert torch.equal(a.test_indices, b.test_indices)
    assert torch.equal(a.train_images, b.train_images)
    assert not torch.equal(a.test_indices, c.test_indices)


def test_ten_classes_stratified():
    d = load_digits(0)
    assert d.num_classes == 10
    train_counts = torch.bincount(d.train_labels, minlength=10)
    test_counts = torch.bincount(d.test_labels, minlength=10)
    assert bool((train_counts > 0).all()) and bool((test_counts > 0).all())
    fractions = test_counts.double() / (train_counts + test_counts).double()
    assert bool(((fractions - 0.25).abs() < 0.02).all())


def test_images_and_labels_match_sklearn_with_train_statistics(raw):
    images, target = raw
    d = load_digits(5)
    train_idx, test_idx = d.train_indices.numpy(), d.test_indices.numpy()
    scaled = images / 16.0
    mean, std = scaled[train_idx].mean(), scaled[train_idx].std()
    expected = (scaled[test_idx] - mean) / std
    np.testing.assert_allclose(d.test_images[:, 0].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(d.test_labels.numpy(), target[test_idx])
    np.testing.assert_array_equal(d.train_labels.numpy(), target[train_idx])
    # standardised with the training images only: exactly zero mean / unit std there
    assert abs(float(d.train_images.mean())) < 1e-4
    assert abs(float(d.train_images.std(unbiased=False)) - 1.0) < 1e-4


def test_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(0, test_fraction=1.0)
