"""The cache-chunked execution: bundles must tile every element exactly once, as views."""

import torch

from meanwise.optim._base import chunked


def test_bundles_tile_every_element_once_as_views():
    big = torch.arange(25.0).reshape(5, 5)
    small = torch.arange(3.0)
    odd = torch.arange(12.0).reshape(3, 4).t()  # not contiguous: kept whole
    params = [big, small, odd]
    twins = [t.clone() * 10 for t in params]
    bundles = list(chunked([params, twins], chunk=7))
    seen = torch.cat([t.reshape(-1) for b in bundles for t in b[0]])
    assert sorted(seen.tolist()) == sorted(torch.cat([t.reshape(-1) for t in params]).tolist())
    for b in bundles:
        for p, q in zip(b[0], b[1], strict=True):
            torch.testing.assert_close(q, p * 10)  # columns stay aligned
        assert sum(t.numel() for t in b[0]) >= 7 or b is bundles[-1] or len(b[0]) == 1
    for b in bundles:  # views write through
        for t in b[0]:
            t.add_(1000)
    assert (big >= 1000).all() and (small >= 1000).all() and (odd >= 1000).all()


def test_mismatched_shapes_are_not_sliced():
    p = torch.zeros(4, 3, 3, 3)
    d = torch.zeros(4, 3, 1, 1)  # a spatially averaged Hessian diagonal
    bundles = list(chunked([[p], [d]], chunk=5))
    assert len(bundles) == 1 and bundles[0][0][0] is p and bundles[0][1][0] is d
