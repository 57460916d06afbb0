"""Few-shot digits: the split, the label flips and the shift augmentation against hand-made
oracles (counts, set algebra, explicit shifted copies)."""

import numpy as np
import pytest
import torch

from meanwise.data import load_digits
from meanwise.data.digits_task import few_shot_digits, random_shift


def test_split_counts_disjoint_and_covering():
    task = few_shot_digits(20, seed=3)
    assert task.train_images.shape == (200, 1, 8, 8)
    assert torch.bincount(task.train_labels, minlength=10).tolist() == [20] * 10
    train, test = set(task.train_indices.tolist()), set(task.test_indices.tolist())
    assert not train & test and len(train | test) == 1797
    assert len(task.test_labels) == 1597
    # standardised with the training images' statistics only
    assert float(task.train_images.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(task.train_images.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_labels_and_pixels_are_the_raw_digits():
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    task = few_shot_digits(5, seed=0)
    assert torch.equal(task.test_labels, torch.from_numpy(raw.target[task.test_indices.numpy()]))
    # undoing the standardisation: a blank pixel maps to `background`, the images to raw / 16
    images = raw.images[task.train_indices.numpy()] / 16.0
    mean, std = images.mean(), images.std()
    assert task.background == pytest.approx((0.0 - mean) / std, rel=1e-5)
    np.testing.assert_allclose(task.train_images[:, 0].numpy() * std + mean, images, atol=1e-5)


def test_seed_decides_the_draw():
    a, b, c = few_shot_digits(10, 1), few_shot_digits(10, 1), few_shot_digits(10, 2)
    assert torch.equal(a.train_indices, b.train_indices)
    assert not torch.equal(a.train_indices, c.train_indices)
    # the old loader is unchanged by the new module
    assert load_digits(0).train_images.shape[0] == 1347


def test_label_noise_flips_to_another_class_only():
    task = few_shot_digits(50, seed=4, label_noise=0.5)
    flipped = task.train_labels != task.clean_train_labels
    # 500 labels, p = 0.5: a count outside 190..310 has probability below 1e-6
    assert 190 <= int(flipped.sum()) <= 310
    clean = few_shot_digits(50, seed=4)
    assert torch.equal(clean.train_labels, clean.clean_train_labels)
    assert torch.equal(task.clean_train_labels, clean.clean_train_labels)
    # a flip adds 1..9 modulo 10: every other class is reachable, the true one never
    offsets = (task.train_labels[flipped] - task.clean_train_labels[flipped]) % 10
    assert set(offsets.tolist()) == set(range(1, 10))


def _shifted(image: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """Image moved down by dy and right by dx, blank border, written with explicit loops."""
    h, w = image.shape
    out = torch.full_like(image, fill)
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[i, j] = image[i - dy, j - dx]
    return out


def test_random_shift_gives_one_of_the_hand_shifted_copies():
    images = torch.randn(400, 8, 8)
    out = random_shift(images, 1, torch.Generator().manual_seed(0), fill=-7.0)
    seen = set()
    for image, shifted in zip(images, out, strict=True):
        matches = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(shifted, _shifted(image, dy, dx, -7.0))
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 9  # every offset occurs in 400 draws
    assert torch.equal(random_shift(images, 0, torch.Generator()), images)


def test_random_shift_keeps_leading_dims_and_is_seeded():
    images = torch.randn(5, 3, 8, 8)
    a = random_shift(images, 2, torch.Generator().manual_seed(1))
    b = random_shift(images, 2, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [{"per_class": 0}, {"per_class": 200}, {"per_class": 5, "label_noise": 1.0}],
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        few_shot_digits(seed=0, **kwargs)
    with pytest.raises(ValueError, match="max_shift"):
        random_shift(torch.zeros(2, 8, 8), -1, torch.Generator())
