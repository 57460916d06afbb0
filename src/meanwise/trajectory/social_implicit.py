"""Social-Implicit (Mohamed et al., ECCV 2022): a 5.8K-parameter implicit trajectory sampler.

Tensors follow the metrics' layout, time first: observed displacements `[8, N, 2]` in, sampled
future displacements `[K, 12, N, 2]` out (`predict` turns them into absolute positions). Inside,
the cells work on the authors' layout `[K, 2, time, N]` because the released weights' conv
kernels are laid out for it (the global stream's 3x3 kernels run across the pedestrian axis).

Zones. Each pedestrian is routed to one Social-Cell by its observed speed: zone =
bucketize(max over the observed steps of the inf-norm of the displacement, bins, right=True) - 1
(`torch.bucketize(..., right=True)`, as the authors call it: bin i holds bins[i] <= s < bins[i+1],
the last bin is open above). The authors' code takes the norm of the *first* observed step only,
which their loader sets to zero, so every pedestrian lands in zone 0 and only the first cell was
ever trained; `compat=True` reproduces that (and is what `from_official_checkpoint` sets), the
default routes by real speed.

Noise. One 2-D standard normal draw per sample, shared by all pedestrians, steps and zones of the
scene, scaled per zone by the cell's learnable `noise_w` times a fixed zone factor; drawn in
float64 whatever the model's dtype, so float32 and float64 models sample the same futures.

Many scenes. `forward_scenes` samples many scenes in one call (training's batched steps): each
zone's cell runs once over all scenes laid side by side with an empty column between scenes,
which equals one `forward` per scene.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from meanwise.trajectory.data import OBS_LEN, PRED_LEN

__all__ = [
    "SocialCell",
    "SocialImplicit",
    "ZONE_BINS",
    "NOISE_FACTORS",
    "NOISE_FACTORS_ETH",
    "noise_factors_for",
]

ZONE_BINS: tuple[float, ...] = (0.0, 0.01, 0.1, 1.2)
NOISE_FACTORS: tuple[float, ...] = (0.05, 1.0, 4.0, 8.0)
NOISE_FACTORS_ETH: tuple[float, ...] = (0.175, 1.5, 4.0, 8.0)


def noise_factors_for(dataset: str) -> tuple[float, ...]:
    """The zone noise factors the authors used for a split (ETH has its own, larger ones)."""
    return NOISE_FACTORS_ETH if dataset == "eth" else NOISE_FACTORS


def _patches(images: Tensor) -> Tensor:
    """[B, C, H, W] -> zero-padded 3x3 neighbourhoods [B, C, H, W, 3, 3], a strided view."""
    return F.pad(images, (1, 1, 1, 1)).unfold(2, 3, 1).unfold(3, 3, 1)


def _conv_columns(rows: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
    """1-D convolution with zero padding 1: rows [B, C, W], kernel [O, C, 3] -> [B, O, W], as
    one batched matmul of the flattened kernel with each row's three shifted copies (torch's
    CPU conv1d takes the slow im2col path for these, and is slower still backward)."""
    width = rows.shape[-1]
    padded = F.pad(rows, (1, 1))
    shifted = torch.cat([padded[..., j : j + width] for j in range(3)], dim=1)  # (tap, C)
    flat = kernel.permute(0, 2, 1).reshape(1, kernel.shape[0], -1).expand(rows.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(flat, shifted)
    return torch.baddbmm(bias[:, None], flat, shifted)


class _ThreeTap(torch.autograd.Function):
    """`_conv_columns` for inputs that need a gradient, without the shifted copies: the three
    taps are three batched matmuls on shifted views, added into place, forward and backward
    (the copies' backward, zero-filled slices summed, cost more than the matmuls)."""

    @staticmethod
    def forward(ctx, rows, kernel, bias):  # noqa: D102
        batch, (out_channels, channels, _) = rows.shape[0], kernel.shape
        taps = kernel.permute(2, 0, 1).contiguous()  # [3, O, C]

        def tap(j: int) -> Tensor:
            return taps[j].expand(batch, out_channels, channels)

        out = torch.baddbmm(bias[:, None], tap(1), rows)
        out[..., 1:] += torch.bmm(tap(0), rows[..., :-1])  # column w reads w - 1
        out[..., :-1] += torch.bmm(tap(2), rows[..., 1:])  # and w + 1
        ctx.save_for_backward(rows, taps)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        rows, taps = ctx.saved_tensors
        batch, channels, out_channels = rows.shape[0], rows.shape[1], taps.shape[1]

        def tap_t(j: int) -> Tensor:
            return taps[j].t().expand(batch, channels, out_channels)

        grad_rows = torch.bmm(tap_t(1), grad)
        grad_rows[..., :-1] += torch.bmm(tap_t(0), grad[..., 1:])
        grad_rows[..., 1:] += torch.bmm(tap_t(2), grad[..., :-1])
        grad_kernel = torch.stack(
            [
                torch.bmm(grad[..., 1:], rows[..., :-1].transpose(1, 2)).sum(0),
                torch.bmm(grad, rows.transpose(1, 2)).sum(0),
                torch.bmm(grad[..., :-1], rows[..., 1:].transpose(1, 2)).sum(0),
            ],
            dim=-1,
        )
        return grad_rows, grad_kernel, grad.sum(dim=(0, 2))


class _LocalStream(nn.Module):
    """The per-pedestrian stream's parameters (the released `ped.*` keys): a conv over time
    with x/y as channels, then one with time as channels along x/y. `SocialCell` runs them
    fused with the global stream."""

    def __init__(self, obs_len: int, pred_len: int) -> None:
        super().__init__()
        self.feat = nn.Conv1d(2, 2, 3, padding=1)
        self.highway_input = nn.Conv1d(2, 2, 1)
        self.tpcnn = nn.Conv1d(obs_len, pred_len, 3, padding=1)
        self.highway = nn.Conv1d(obs_len, pred_len, 1)


class SocialCell(nn.Module):
    """One zone's cell (1,459 parameters): a global stream over the time x pedestrian grid and
    a local per-pedestrian stream, mixed by learnable scalars (all three start at zero, as in
    the released code, so an untrained cell predicts zero displacement).

    The parameters keep the released layout (so the state dicts load as they are), but the
    forward runs as two convolutions: every first-stage kernel (global 3x3 and 1x1, local 3 and
    1 along time) is one 2 -> 8 channel 3x3 convolution, and the second stage (global 3x3 + 1x1,
    local 3 + 1 along x/y, each scaled by its mixing weight) is one 16 -> 12 channel 3x3
    convolution; the zero taps keep the local stream per pedestrian. On a CPU these tiny
    convolutions cost their call overhead, so four times fewer calls is four times faster.
    """

    def __init__(self, obs_len: int = OBS_LEN, pred_len: int = PRED_LEN) -> None:
        super().__init__()
        self.feat = nn.Conv2d(2, 2, 3, padding=1)
        self.highway_input = nn.Conv2d(2, 2, 1)
        self.tpcnn = nn.Conv2d(obs_len, pred_len, 3, padding=1)
        self.highway = nn.Conv2d(obs_len, pred_len, 1)
        self.noise_w = nn.Parameter(torch.zeros(1))
        self.global_w = nn.Parameter(torch.zeros(1))
        self.local_w = nn.Parameter(torch.zeros(1))
        self.ped = _LocalStream(obs_len, pred_len)
        self.obs_len, self.pred_len = obs_len, pred_len

    def fused_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(w1 [8, 2, 3, 3], b1 [8], w2 [pred, 2 obs, 3, 3], b2 [pred]) of the two-conv form.

        Stage-1 output channels: global ReLU branch (2), local ReLU branch (2), global linear
        branch (2), local linear branch (2). Stage-2 input channels: (stream, time).
        """
        p = self.ped
        w1 = self.feat.weight.new_zeros(8, 2, 3, 3)
        w1[0:2] = self.feat.weight
        w1[2:4, :, :, 1] = p.feat.weight  # along time only: no mixing across pedestrians
        w1[4:6, :, 1, 1] = self.highway_input.weight[:, :, 0, 0]
        w1[6:8, :, 1, 1] = p.highway_input.weight[:, :, 0]
        b1 = torch.cat([self.feat.bias, p.feat.bias, self.highway_input.bias, p.highway_input.bias])
        t_in, t_out = self.obs_len, self.pred_len
        w_global = self.tpcnn.weight.clone()
        w_global[:, :, 1, 1] += self.highway.weight[:, :, 0, 0]
        w_local = self.tpcnn.weight.new_zeros(t_out, t_in, 3, 3)
        w_local[:, :, :, 1] = p.tpcnn.weight  # along x/y only, per pedestrian
        w_local[:, :, 1, 1] += p.highway.weight[:, :, 0]
        w2 = torch.cat([self.global_w * w_global, self.local_w * w_local], dim=1)
        b2 = self.global_w * (self.tpcnn.bias + self.highway.bias) + self.local_w * (
            p.tpcnn.bias + p.highway.bias
        )
        return w1, b1, w2, b2

    def forward(self, x: Tensor, noise: Tensor, noise_factor: float) -> Tensor:
        """x: [1, 2, obs_len, N] displacements; noise: [K, 2, 1, 1] -> [K, pred_len, 2, N].

        The noise is one 2-vector per sample, constant over time and pedestrians, and stage 1
        is linear before its ReLU, so stage 1 of sample k is conv(x) + c_k0 conv(1_0) +
        c_k1 conv(1_1) (1_i: a field of ones in channel i): three single-image convolutions
        and one matmul serve all K samples. Convolutions run as unfold + matmul: torch's CPU
        convolution loops over the batch, and K tiny images cost K calls.
        """
        w1, b1, w2, b2 = self._weights()
        k, t, n = noise.shape[0], x.shape[-2], x.shape[-1]
        ones = x.new_zeros(2, 2, t, n)
        ones[0, 0], ones[1, 1] = 1.0, 1.0
        basis = torch.einsum("bcxnij,ocij->boxn", _patches(torch.cat([x, ones])), w1)
        scale = (self.noise_w * noise_factor) * noise.view(k, 2)
        h = torch.addmm(
            (basis[0] + b1[:, None, None]).reshape(1, -1), scale, basis[1:].reshape(2, -1)
        )
        h = h.view(k, 8, t, n)
        a = torch.relu(h[:, :4]) + h[:, 4:]  # [K, (stream, x/y), obs, N]
        a = a.view(k, 2, 2, t, n).transpose(2, 3).reshape(k, 2 * t, 2, n)  # time as channels
        out = torch.einsum("kcxnij,ocij->koxn", _patches(a), w2)
        return out + b2[:, None, None]  # [K, pred, x/y, N]

    def forward_packed(self, x: Tensor, mask: Tensor, noise: Tensor, noise_factor: float) -> Tensor:
        """Many scenes side by side: x [1, 2, obs_len, W], mask [W] (1 on a pedestrian's
        column, 0 on the empty column kept between two scenes), noise [K, 2, W] (each column
        its scene's draw, 0 on the gaps) -> [K, pred_len, 2, W] (garbage on the gaps).

        Every 3x3 kernel reaches one column either side, so with one empty column between
        scenes each scene sees exactly the zero padding it sees alone, provided the gaps are
        zero at both stages' inputs: x and the noise are zero there by construction, and the
        stage-1 output (bias, ReLU) is masked before stage 2.

        Both stages are 1-D convolutions along the columns, each one batched matmul over the
        K samples (torch's CPU 2-D convolution of these few-channel images is an unvectorised
        im2col per image, most of a training step's time). Stage 1 is linear in its input
        x + noise, and each sample's noise is constant over time: it is the observed image's
        convolution, once, plus a 1-D convolution of each sample's [2, W] noise row, with the
        time taps summed over those that stay inside the window. Stage 2's image has only the
        rows x and y, so its 3x3 kernel is a 1-D one from (stream, time, x/y) channels to
        (step, x/y) channels. Each sample is its own matrix of the batch, so samples that are
        equal (a zero noise weight) come out bitwise equal and IMLE's ties break as in
        `forward`.
        """
        w1, b1, w2, b2 = self._weights()
        k, t = noise.shape[0], x.shape[-2]

        def stage1_rows(v: Tensor) -> Tensor:  # [(branch, stream, x/y), obs, ...] -> rows
            # (branch, stream, obs, x/y): stage 2's channel order, no reshuffle per sample
            return v.reshape(2, 2, 2, t, *v.shape[2:]).transpose(2, 3).reshape(8 * t, -1)

        base = stage1_rows(F.conv2d(x, w1, b1, padding=1)[0])  # [8 obs, W]
        # valid[s, i]: time tap i of output step s falls inside the window
        steps = torch.arange(t)[:, None] + torch.arange(3)[None, :] - 1
        valid = ((steps >= 0) & (steps < t)).to(w1.dtype)
        taps = stage1_rows(torch.einsum("si,ocij->oscj", valid, w1))  # [8 obs, (x/y in, tap)]
        taps = (self.noise_w * noise_factor) * taps.view(8 * t, 2, 3)
        h = _conv_columns(noise, taps) + base
        a = (torch.relu(h[:, : 4 * t]) + h[:, 4 * t :]) * mask  # [K, (stream, obs, x/y), W]
        # the 1-D kernel [(step, x/y out), (stream, obs, x/y in), column tap]: its row tap is
        # x/y in - x/y out + 1
        rows = [torch.stack([w2[:, :, h_in - h_out + 1] for h_in in (0, 1)], 2) for h_out in (0, 1)]
        kernel = torch.stack(rows, dim=1).reshape(2 * self.pred_len, 4 * t, 3)
        out = _ThreeTap.apply(a, kernel, b2.repeat_interleave(2))
        return out.view(k, self.pred_len, 2, -1)

    def _weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`fused_weights`, cached while no parameter changes and no gradient is recorded
        (building them is a dozen small ops, a sizeable part of a one-scene forward)."""
        if torch.is_grad_enabled():
            return self.fused_weights()
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
        cached = getattr(self, "_fused_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.fused_weights())
            self._fused_cache = cached
        return cached[1]


class SocialImplicit(nn.Module):
    """Social-Implicit: one `SocialCell` per speed zone; `forward` samples K futures.

    Args:
        bins: zone lower edges (speed in metres per observed step), ascending, first 0.
        noise_factors: one fixed noise scale per zone.
        compat: route by the first observed displacement, as the released code does (every
            pedestrian then falls in zone 0); the default routes by the maximum observed speed.
    """

    def __init__(
        self,
        bins: Sequence[float] = ZONE_BINS,
        noise_factors: Sequence[float] = NOISE_FACTORS,
        *,
        compat: bool = False,
        obs_len: int = OBS_LEN,
        pred_len: int = PRED_LEN,
    ) -> None:
        super().__init__()
        bins = [float(b) for b in bins]
        if not bins or any(b1 <= b0 for b0, b1 in zip(bins, bins[1:], strict=False)):
            raise ValueError(f"bins must be non-empty and strictly ascending; got {bins}")
        if len(noise_factors) != len(bins):
            raise ValueError(
                f"noise_factors needs one value per zone ({len(bins)}); got {list(noise_factors)}"
            )
        self.register_buffer("bins", torch.tensor(bins, dtype=torch.float64), persistent=False)
        self.noise_factors = tuple(float(f) for f in noise_factors)
        self.compat = compat
        self.obs_len, self.pred_len = obs_len, pred_len
        self.implicit_cells = nn.ModuleList(SocialCell(obs_len, pred_len) for _ in range(len(bins)))

    # --- zones -------------------------------------------------------------------------------

    def zones(self, displacements: Tensor) -> Tensor:
        """[N] zone index of each pedestrian, from observed displacements [obs_len, N, 2]."""
        if self.compat:
            speed = displacements[0].abs().amax(dim=-1)  # the released code's first step
        else:
            speed = displacements.abs().amax(dim=(0, 2))
        return torch.bucketize(speed.to(self.bins.dtype), self.bins, right=True) - 1

    # --- sampling ----------------------------------------------------------------------------

    def _check(self, displacements: Tensor) -> None:
        if (
            displacements.dim() != 3
            or displacements.shape[0] != self.obs_len
            or (displacements.shape[2] != 2)
        ):
            raise ValueError(
                f"displacements must be [{self.obs_len}, N, 2]; got {tuple(displacements.shape)}"
            )
        if displacements.shape[1] == 0:
            raise ValueError("displacements has no pedestrians (N = 0)")

    def forward(
        self,
        displacements: Tensor,
        num_samples: int = 20,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """K samples of future displacements [K, pred_len, N, 2] for one scene.

        Args:
            displacements: observed displacements [obs_len, N, 2] (first step 0 by the
                loader's convention), in the model's dtype.
            num_samples: K.
            generator: torch generator for the noise (reproducible sampling).
            noise: explicit noise [K, 2] instead of drawing it (tests, IMLE with fixed draws).
        """
        self._check(displacements)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; got {num_samples}")
        dtype = self.implicit_cells[0].feat.weight.dtype
        x = displacements.to(dtype).permute(2, 0, 1).unsqueeze(0)  # [1, 2, obs_len, N]
        if noise is None:
            # drawn in float64 whatever the dtype: float32 and float64 models sample alike
            noise = torch.randn(num_samples, 2, generator=generator, dtype=torch.float64)
        elif noise.shape != (num_samples, 2):
            raise ValueError(f"noise must be [{num_samples}, 2]; got {tuple(noise.shape)}")
        noise = noise.to(dtype).view(num_samples, 2, 1, 1)
        zone = self.zones(displacements)
        first = int(zone[0])
        if bool((zone == first).all()):
            # one zone (always so in compat mode): no gather/scatter over pedestrians
            out = self.implicit_cells[first](x, noise, self.noise_factors[first])
        else:
            out = x.new_zeros(num_samples, self.pred_len, 2, x.shape[-1])
            for i in torch.unique(zone).tolist():
                select = zone == i
                out[..., select] = self.implicit_cells[i](
                    x[..., select], noise, self.noise_factors[i]
                )
        return out.permute(0, 1, 3, 2)

    def forward_scenes(self, displacements: Tensor, sizes: Sequence[int], noise: Tensor) -> Tensor:
        """K samples for many scenes in one forward: the same as calling `forward(scene,
        noise=noise[s])` for each scene s and concatenating along the pedestrian axis.

        Args:
            displacements: [obs_len, sum(sizes), 2], the scenes' pedestrians one scene after
                the other.
            sizes: the scenes' pedestrian counts, each >= 1.
            noise: [S, K, 2], each scene's noise draw.

        Returns:
            [K, pred_len, sum(sizes), 2].

        Each zone's cell runs once on all scenes: its pedestrians (per scene in their order,
        as `forward` gathers them) are laid out scene after scene with one empty column
        between scenes (`SocialCell.forward_packed`).
        """
        self._check(displacements)
        sizes = [int(n) for n in sizes]
        if not sizes or min(sizes) < 1 or sum(sizes) != displacements.shape[1]:
            raise ValueError(
                f"sizes must be positive pedestrian counts summing to {displacements.shape[1]}; "
                f"got {sizes[:8]}{'...' if len(sizes) > 8 else ''}"
            )
        if noise.dim() != 3 or noise.shape[0] != len(sizes) or noise.shape[2] != 2:
            raise ValueError(f"noise must be [{len(sizes)}, K, 2]; got {tuple(noise.shape)}")
        dtype = self.implicit_cells[0].feat.weight.dtype
        k, total = noise.shape[1], displacements.shape[1]
        x = displacements.to(dtype).permute(2, 0, 1)  # [2, obs_len, M]
        noise = noise.to(dtype)
        scene = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        zone = self.zones(displacements)
        results, source, offset = [], torch.empty(total, dtype=torch.long), 0
        for i in torch.unique(zone).tolist():
            columns = torch.nonzero(zone == i).squeeze(1)
            owner = scene[columns]
            # one empty column before every change of scene
            position = torch.arange(len(columns)) + torch.cat(
                [owner.new_zeros(1), (owner[1:] != owner[:-1]).cumsum(0)]
            )
            width = int(position[-1]) + 1
            packed = x.new_zeros(2, self.obs_len, width)
            packed[:, :, position] = x[:, :, columns]
            mask = x.new_zeros(width)
            mask[position] = 1.0
            column_noise = x.new_zeros(k, 2, width)
            column_noise[:, :, position] = noise[owner].permute(1, 2, 0)
            cell = self.implicit_cells[i]
            results.append(
                cell.forward_packed(packed[None], mask, column_noise, self.noise_factors[i])
            )
            source[columns] = position + offset
            offset += width
        # the zones' packed outputs side by side, then one gather back to the input's order
        # (one index_select and, backward, one index_add, instead of a scatter per zone)
        out = torch.cat(results, dim=-1) if len(results) > 1 else results[0]
        out = out.index_select(-1, source)
        return out.permute(0, 1, 3, 2)

    def predict(
        self,
        observed: Tensor,
        num_samples: int = 20,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """K sampled futures in absolute positions [K, pred_len, N, 2] from observed positions
        [obs_len, N, 2]: the cumulative sum of the sampled displacements plus the last
        observed position."""
        if observed.dim() != 3 or observed.shape[0] != self.obs_len or observed.shape[2] != 2:
            raise ValueError(
                f"observed must be [{self.obs_len}, N, 2]; got {tuple(observed.shape)}"
            )
        rel = torch.zeros_like(observed)
        rel[1:] = observed[1:] - observed[:-1]
        steps = self(rel, num_samples, generator=generator)
        return steps.cumsum(dim=1) + observed[-1].to(steps.dtype)

    # --- the released weights ----------------------------------------------------------------

    @classmethod
    def from_official_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        dataset: str | None = None,
        compat: bool = True,
    ) -> SocialImplicit:
        """Load the authors' `val_best.pth` (a plain state dict; loaded with weights_only=True).

        `path` is the file or its folder. The zone noise factors are not in the state dict; they
        follow the split named by `dataset`, else by the `dataset` field of the `args.json` next
        to the weights. The model is float64 (the weights were trained and evaluated in it) and
        in compatibility mode unless `compat=False`.
        """
        path = Path(path)
        weights = path / "val_best.pth" if path.is_dir() else path
        if not weights.is_file():
            raise ValueError(f"path {str(path)!r}: no checkpoint file {str(weights)!r}")
        if dataset is None:
            args_file = weights.parent / "args.json"
            if not args_file.is_file():
                raise ValueError(
                    f"path {str(path)!r}: no args.json beside the weights; pass dataset= "
                    "(the split they were trained for, which sets the noise factors)"
                )
            dataset = json.loads(args_file.read_text()).get("dataset")
            if not isinstance(dataset, str):
                raise ValueError(f"{args_file}: no 'dataset' string field")
        # the released tensors were saved on a GPU; map them to the CPU
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{weights}: expected a state dict; got {type(state).__name__}")
        model = cls(noise_factors=noise_factors_for(dataset), compat=compat).double()
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(
            k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k].shape
        )
        if missing or unexpected or wrong:
            raise ValueError(
                f"{weights} does not match SocialImplicit: missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}, wrong shapes {wrong[:4]}"
            )
        model.load_state_dict({k: v.to(torch.float64) for k, v in state.items()})
        return model.eval()
