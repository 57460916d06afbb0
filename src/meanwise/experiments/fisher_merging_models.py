"""The pieces experiment `fisher-merging` is built from: the digits MLP, its data splits, the input
shifts of the robust fine-tuning part, and a trainer that fine-tunes K copies side by side.

The trainer holds the K copies as stacked tensors ([K, out, in] weights) and trains them with one
batched matmul per layer. Adam is elementwise and the loss is the sum of the copies' own mean
losses, so copy k gets exactly the gradient and the update it would get alone (the test checks
this against K separate `nn.Module` trainings); it only saves the per-step overhead that
dominates such small models on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.data import NUM_CLASSES, load_digits

__all__ = [
    "MLP",
    "LAYERS",
    "BODY_KEYS",
    "Splits",
    "make_splits",
    "subset",
    "affine_shift",
    "broad_augment",
    "shifted_test_sets",
    "train_copies",
    "logits",
    "accuracy",
    "accuracy_and_nll",
    "as_module",
]

Pair = tuple[Tensor, Tensor]
State = dict[str, Tensor]


class MLP(nn.Module):
    """64 pixels -> hidden -> hidden -> classes, tanh: a few thousand parameters."""

    def __init__(self, hidden: int = 64, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


# (weight, bias) key pairs in forward order; tanh after every layer but the last
LAYERS: tuple[tuple[str, str], ...] = (
    ("body.1.weight", "body.1.bias"),
    ("body.3.weight", "body.3.bias"),
    ("head.weight", "head.bias"),
)
BODY_KEYS: tuple[str, ...] = tuple(k for pair in LAYERS[:-1] for k in pair)


def logits(state: State, x: Tensor) -> Tensor:
    """The MLP's logits for one state dict, without building a module (merges are scored often)."""
    h = x.reshape(x.shape[0], -1)
    for i, (w, b) in enumerate(LAYERS):
        h = F.linear(h, state[w], state[b])
        if i < len(LAYERS) - 1:
            h = torch.tanh(h)
    return h


def accuracy(state: State, data: Pair) -> float:
    """Top-1 accuracy in %."""
    x, y = data
    with torch.no_grad():
        return 100.0 * float((logits(state, x).argmax(1) == y).double().mean())


def accuracy_and_nll(state: State, data: Pair) -> tuple[float, float]:
    """Top-1 accuracy in % and mean cross-entropy, from one forward pass (the coefficient search
    ranks by accuracy and breaks ties by the loss)."""
    x, y = data
    with torch.no_grad():
        out = logits(state, x)
        acc = 100.0 * float((out.argmax(1) == y).double().mean())
        return acc, float(F.cross_entropy(out, y))


def as_module(state: State, hidden: int) -> MLP:
    """An eval-mode MLP holding `state` (for `diagonal_fisher`, which takes a module)."""
    model = MLP(hidden, state["head.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval()


# --- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """The training images split per seed; the test split is fixed by the split seed."""

    pretrain: Pair
    finetune: Pair
    validation: Pair
    test: Pair
    background: float  # the standardized value of a blank pixel (what shifted images pad with)


def make_splits(
    pretrain_fraction: float,
    validation_fraction: float,
    split_seed: int,
    test_fraction: float,
    generator: torch.Generator,
) -> Splits:
    """Stratified pre-training / fine-tuning / validation parts of the training images."""
    data = load_digits(split_seed, test_fraction)
    images, labels = data.train_images, data.train_labels
    parts: dict[str, list[Tensor]] = {"pretrain": [], "finetune": [], "validation": []}
    for c in range(NUM_CLASSES):  # stratified, so every part has every class
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_pre = round(pretrain_fraction * len(members))
        n_val = round(validation_fraction * len(members))
        parts["pretrain"].append(members[:n_pre])
        parts["validation"].append(members[n_pre : n_pre + n_val])
        parts["finetune"].append(members[n_pre + n_val :])
    picked = {k: torch.cat(v).sort().values for k, v in parts.items()}
    return Splits(
        **{k: (images[idx], labels[idx]) for k, idx in picked.items()},
        test=(data.test_images, data.test_labels),
        background=float(torch.cat([images, data.test_images]).min()),
    )


def subset(pair: Pair, classes: Sequence[int]) -> Pair:
    x, y = pair
    mask = torch.isin(y, torch.tensor(list(classes)))
    return x[mask], y[mask]


def affine_shift(
    x: Tensor,
    degrees: Tensor,
    shift_pixels: Tensor,
    noise_sd: Tensor,
    background: float,
    generator: torch.Generator,
) -> Tensor:
    """Rotate each 8x8 image by `degrees` [N], translate it by `shift_pixels` [N, 2] (x, y) and
    add Gaussian noise of sd `noise_sd` [N] (in standardized units). Pixels moved in from
    outside are blank (the background value), not zero, which is a mid-grey after
    standardization."""
    n, _, height, _ = x.shape
    angle = degrees.to(x.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / height
    tx, ty = (shift_pixels.to(x.dtype) * (2.0 / height)).unbind(1)
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x - background, grid, align_corners=False) + background
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return moved + noise_sd.to(x.dtype).view(n, 1, 1, 1) * noise


def broad_augment(
    x: Tensor,
    generator: torch.Generator,
    background: float,
    max_degrees: float,
    max_shift: float,
    max_noise: float,
) -> Tensor:
    """The 'broad' pre-training distribution: uniform rotations, translations and noise."""
    n = x.shape[0]
    degrees = (torch.rand(n, generator=generator) * 2 - 1) * max_degrees
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    noise = torch.rand(n, generator=generator) * max_noise
    return affine_shift(x, degrees, shift, noise, background, generator)


def shifted_test_sets(
    test: Pair,
    background: float,
    degrees: tuple[float, float],
    shift: float,
    noise: float,
    seed: int,
) -> dict[str, Pair]:
    """The test images under three input shifts (labels unchanged), fixed by `seed`:
    'rotated' (|angle| uniform in `degrees`, random sign), 'translated' (by `shift` pixels in a
    random diagonal direction), 'noisy' (Gaussian noise of sd `noise`)."""
    x, y = test
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    zero_angle, zero_shift, zero_noise = torch.zeros(n), torch.zeros(n, 2), torch.zeros(n)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    angle = sign * (degrees[0] + (degrees[1] - degrees[0]) * torch.rand(n, generator=g))
    direction = torch.where(torch.rand(n, 2, generator=g) < 0.5, -1.0, 1.0)
    noise_sd = torch.full((n,), noise)
    return {
        "rotated": (affine_shift(x, angle, zero_shift, zero_noise, background, g), y),
        "translated": (
            affine_shift(x, zero_angle, direction * shift, zero_noise, background, g),
            y,
        ),
        "noisy": (affine_shift(x, zero_angle, zero_shift, noise_sd, background, g), y),
    }


# --- training K copies side by side ----------------------------------------------------------


def _stacked_logits(params: list[Tensor], x: Tensor) -> Tensor:
    """x [K, B, 64] through K MLPs whose layers are params = [W1, b1, W2, b2, W3, b3] stacked."""
    h = x
    for i in range(len(LAYERS)):
        weight, bias = params[2 * i], params[2 * i + 1]
        h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        if i < len(LAYERS) - 1:
            h = torch.tanh(h)
    return h


def train_copies(
    states: Sequence[State],
    data: Pair,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    augment: Callable[[Tensor], Tensor] | None = None,
    label_maps: Sequence[Callable[[Tensor], Tensor] | None] | None = None,
) -> list[State]:
    """Adam-train K MLP copies (initial `states`) on the same inputs, each with its own batch
    order drawn from `generator`; returns the K trained state dicts.

    `augment(x)` redraws the inputs once per epoch (shared by the copies); `label_maps[k]` maps
    copy k's labels (e.g. digit mod 5 for a related pre-training task; None: unchanged). The
    copies' heads must have one shape (a 5-class task uses 5 of 10 logits).
    """
    x, y = data
    k, n = len(states), y.shape[0]
    maps = list(label_maps) if label_maps is not None else [None] * k
    if len(maps) != k:
        raise ValueError(f"label_maps has {len(maps)} entries for {k} copies")
    labels = torch.stack([y if m is None else m(y) for m in maps])  # [K, n]
    keys = [key for pair in LAYERS for key in pair]
    params = [torch.stack([s[key] for s in states]).clone().requires_grad_(True) for key in keys]
    # fused: one kernel per tensor; it is elementwise like Adam's reference loop
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)
    flat = x.reshape(n, -1)
    for _ in range(epochs):
        inputs = flat if augment is None else augment(x).reshape(n, -1)
        orders = torch.stack([torch.randperm(n, generator=generator) for _ in range(k)])
        for start in range(0, n, batch_size):
            idx = orders[:, start : start + batch_size]  # [K, B]: copy k's own batch
            out = _stacked_logits(params, inputs[idx])
            # sum of the copies' mean losses: copy k's gradient is its own loss's gradient
            target = labels.gather(1, idx).reshape(-1)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), target) * k
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return [{key: p[i].detach().clone() for key, p in zip(keys, params, strict=True)}
            for i in range(k)]  # fmt: skip
