"""Patch mixing (docs/method.md §1, §2, §6): the assignment, MAE's patchify, the mixed encoder input,
the norm-pix targets and the loss mask.

Pins: ``draw_assignment`` gives int32 ``[G, r*n]``, per group disjoint sources of exactly ``n``
ascending positions in ``[0, N)`` (``N - r*n`` dropped), keyed by (seed, step, *global* group) only,
bitwise-reproducible and statistically uniform; ``patchify`` is MAE's ``(p, q, c)`` order and
``unpatchify`` its inverse; ``patch_mix_reference`` (and the op the model calls) against explicit
loops, over odd shapes and low-precision images; its errors.
"""
import math

import pytest
import torch
from tolerances import tol

from mixedae_fast.kernels.assignment import draw_assignment
from mixedae_fast.kernels.patch_mix import (
    norm_pix_targets,
    patch_mix,
    patch_mix_reference,
    patchify,
    unpatchify,
)

# Targets are fp32 whatever the image dtype (docs/method.md §6); they are compared with a float64 hand
# formula on the same (upcast) pixel values: mixedae_fast/tolerances.py's fp64_oracle.
TARGET_TOL = tol(torch.float32, "cpu", "fp64_oracle")


def _images(B, S=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, S, S, generator=g).to(dtype)


# -- the assignment ------------------------------------------------------------------------------
@pytest.mark.parametrize("G,N,r,n", [(5, 16, 4, 4), (3, 16, 3, 4), (1, 25, 2, 7), (2, 64, 1, 16),
                                     (4, 9, 2, 1)])
def test_assignment_structure(G, N, r, n):
    ids = draw_assignment(G, N, r, n, seed=1, step=3)
    assert ids.dtype == torch.int32 and tuple(ids.shape) == (G, r * n)
    assert int(ids.min()) >= 0 and int(ids.max()) < N
    for g in range(G):
        row = ids[g].tolist()
        assert len(set(row)) == r * n, "a position is visible for two sources"
        for j in range(r):
            block = row[j * n:(j + 1) * n]
            assert block == sorted(block) and len(set(block)) == n, "source block not strictly ascending"
        dropped = set(range(N)) - set(row)
        assert len(dropped) == N - r * n


def test_assignment_is_keyed_by_global_group_not_rank():
    full = draw_assignment(4, 16, 3, 4, seed=7, step=11, first_group=0)
    tail = draw_assignment(2, 16, 3, 4, seed=7, step=11, first_group=2)
    assert torch.equal(full[2:], tail)
    # two "ranks" of 2 groups each reassemble the single-rank draw
    head = draw_assignment(2, 16, 3, 4, seed=7, step=11, first_group=0)
    assert torch.equal(torch.cat([head, tail]), full)


def test_assignment_depends_on_seed_and_step_and_repeats_bitwise():
    base = draw_assignment(8, 64, 4, 16, seed=0, step=5)
    assert torch.equal(base, draw_assignment(8, 64, 4, 16, seed=0, step=5))
    assert not torch.equal(base, draw_assignment(8, 64, 4, 16, seed=0, step=6))
    assert not torch.equal(base, draw_assignment(8, 64, 4, 16, seed=1, step=5))
    # groups within one draw differ too
    assert len({tuple(row) for row in base.tolist()}) == 8


def test_assignment_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="r\\*n <= N"):
        draw_assignment(2, 16, 4, 5, seed=0, step=0)
    with pytest.raises(ValueError):
        draw_assignment(2, 16, 4, 0, seed=0, step=0)


def _chi2_bound(dof):
    # the statistic has mean ~dof and sd ~sqrt(2 dof): six standard deviations never fail by chance,
    # while a biased assignment (e.g. one favoured position) overshoots by orders of magnitude
    return dof + 6 * math.sqrt(2 * dof)


def _category_counts(ids, N, r, n):
    """``[N, r+1]`` counts: how often position p went to source j (column r = dropped)."""
    G = ids.shape[0]
    src = torch.full((G, N), r, dtype=torch.long)
    src.scatter_(1, ids.long(), torch.arange(r).repeat_interleave(n).expand(G, -1).contiguous())
    return torch.stack([(src == j).sum(0) for j in range(r + 1)], dim=1).double(), src


@pytest.mark.parametrize("across", ["groups", "steps"])
def test_assignment_is_uniform(across):
    N, r, n, T = 16, 3, 4, 2000
    if across == "groups":
        ids = draw_assignment(T, N, r, n, seed=3, step=0)
    else:
        ids = torch.cat([draw_assignment(1, N, r, n, seed=3, step=s, first_group=5) for s in range(T)])
    counts, src = _category_counts(ids, N, r, n)
    probs = torch.tensor([n / N] * r + [(N - r * n) / N], dtype=torch.float64)
    expected = T * probs[None, :].expand(N, -1)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # each cell's count is Binomial(T, p_j), so E[chi2] = sum_cells (1 - p_j) = N * r (measured: a
    # torch.randperm sampler gives 48 +- 9.5 here); the constraints only lower the variance
    dof = N * r
    assert chi2 < _chi2_bound(dof), f"chi2 {chi2:.1f} for dof {dof}"

    # pairs are not degenerate: given a visible, b shares its source with probability (n-1)/(N-1),
    # and (a in source 0, b in source 1) has probability n/N * n/(N-1)
    for a, b in [(0, 1), (0, N - 1), (5, 6), (3, 12), (7, 8)]:
        visible = src[:, a] < r
        same = (src[:, b] == src[:, a]) & visible
        p_same = float(same.sum()) / float(visible.sum())
        sd = math.sqrt(p_same * (1 - p_same) / float(visible.sum()))
        assert abs(p_same - (n - 1) / (N - 1)) < max(6 * sd, 0.02), (a, b, p_same)
        p01 = float(((src[:, a] == 0) & (src[:, b] == 1)).double().mean())
        p01_expected = n / N * n / (N - 1)
        assert abs(p01 - p01_expected) < 6 * math.sqrt(p01_expected / T), (a, b, p01)


# -- patchify ------------------------------------------------------------------------------------
def test_patchify_matches_mae_order_loop():
    P, C = 2, 3
    x = torch.arange(2 * C * 6 * 6, dtype=torch.float32).reshape(2, C, 6, 6)
    out = patchify(x, P)
    assert tuple(out.shape) == (2, 9, P * P * C)
    w = 6 // P
    for b in range(2):
        for hi in range(w):
            for wi in range(w):
                for p in range(P):
                    for q in range(P):
                        for c in range(C):
                            assert out[b, hi * w + wi, (p * P + q) * C + c] == x[b, c, hi * P + p, wi * P + q]


@pytest.mark.parametrize("S,P", [(16, 4), (20, 4), (6, 2)])
def test_unpatchify_inverts_patchify(S, P):
    x = _images(3, S)
    assert torch.equal(unpatchify(patchify(x, P), P), x)


# -- patch_mix_reference ---------------------------------------------------------------------------
def _hand_norm_pix(patch_row):
    """One patch (1-D), float64: (t - mean) / sqrt(unbiased var + 1e-6)."""
    t = patch_row.double()
    m = t.numel()
    mean = t.sum() / m
    var = ((t - mean) ** 2).sum() / (m - 1)
    return (t - mean) / torch.sqrt(var + 1e-6)


def _check_patch_mix(images, ids, r, n, P, mixed, targets, loss_mask, norm_pix=True):
    B, N = images.shape[0], (images.shape[-1] // P) ** 2
    G = B // r
    patches = patchify(images, P)
    assert mixed.dtype == images.dtype and tuple(mixed.shape) == (G, r * n, 3 * P * P)
    assert targets.dtype == torch.float32 and tuple(targets.shape) == (B, N, 3 * P * P)
    assert loss_mask.dtype == torch.bool and tuple(loss_mask.shape) == (B, N)
    for g in range(G):
        for j in range(r):
            visible = set(ids[g, j * n:(j + 1) * n].tolist())
            for t in range(n):
                assert torch.equal(mixed[g, j * n + t], patches[g * r + j, int(ids[g, j * n + t])])
            for p in range(N):
                assert bool(loss_mask[g * r + j, p]) == (p not in visible)
    hand = torch.stack([torch.stack([_hand_norm_pix(patches[b, p].float()) if norm_pix
                                     else patches[b, p].double() for p in range(N)]) for b in range(B)])
    torch.testing.assert_close(targets.double(), hand, **TARGET_TOL)


@pytest.mark.parametrize("B,S,P,r,mask_ratio", [
    (8, 16, 4, 4, 0.75),   # r*n = N: nothing dropped
    (6, 16, 4, 3, 0.75),   # r*n = 12 < N = 16: 4 dropped
    (2, 20, 4, 2, 0.6),    # 5x5 grid (N = 25 not a power of two), G = 1
    (3, 16, 4, 3, 0.9),    # n = 1
    (4, 16, 4, 1, 0.75),   # r = 1: MAE's random masking
])
def test_patch_mix_reference_against_loops(B, S, P, r, mask_ratio):
    N = (S // P) ** 2
    n = int(N * (1 - mask_ratio))
    images = _images(B, S)
    ids = draw_assignment(B // r, N, r, n, seed=2, step=1)
    mixed, targets, loss_mask = patch_mix_reference(images, ids, r, n, P)
    _check_patch_mix(images, ids, r, n, P, mixed, targets, loss_mask)
    # every source reconstructs exactly N - n positions; dropped positions are masked for everyone
    assert (loss_mask.sum(1) == N - n).all()
    # the op the model calls computes the reference
    for a, b in zip(patch_mix(images, ids, r, n, P), (mixed, targets, loss_mask), strict=True):
        assert torch.equal(a, b)


def test_norm_pix_off_gives_raw_fp32_patches():
    images = _images(4)
    ids = draw_assignment(2, 16, 2, 4, seed=0, step=0)
    mixed, targets, loss_mask = patch_mix_reference(images, ids, 2, 4, 4, norm_pix=False)
    assert targets.dtype == torch.float32 and torch.equal(targets, patchify(images, 4))
    _check_patch_mix(images, ids, 2, 4, 4, mixed, targets, loss_mask, norm_pix=False)


def test_norm_pix_uses_unbiased_variance_and_eps():
    # a near-constant patch: var ~1e-8 << eps = 1e-6, so eps dominates the denominator
    t = torch.zeros(1, 2, 48)
    t[0, 0] = torch.linspace(-1, 1, 48)
    t[0, 1] = 0.5 + 1e-4 * torch.linspace(-1, 1, 48)
    out = norm_pix_targets(t)
    for k in range(2):
        torch.testing.assert_close(out[0, k].double(), _hand_norm_pix(t[0, k]), **TARGET_TOL)
    biased = (t[0, 0] - t[0, 0].mean()) / (t[0, 0].var(unbiased=False) + 1e-6).sqrt()
    assert not torch.allclose(out[0, 0], biased, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_images(dtype):
    r, n, P = 2, 6, 4
    images = _images(4, 16, dtype=dtype)
    ids = draw_assignment(2, 16, r, n, seed=4, step=0)
    mixed, targets, loss_mask = patch_mix_reference(images, ids, r, n, P)
    # mixed keeps the image dtype and its exact values; targets are fp32 from the upcast pixels
    _check_patch_mix(images, ids, r, n, P, mixed, targets, loss_mask)
    low = norm_pix_targets(patchify(images, P).to(dtype)).to(dtype).float()  # what fp32 must not be
    assert not torch.allclose(targets, low, rtol=1e-4, atol=1e-4)


def test_patch_mix_errors():
    images = _images(6)
    ids = draw_assignment(1, 16, 4, 4, seed=0, step=0)
    with pytest.raises(ValueError, match="not a multiple of the group size 4"):
        patch_mix_reference(images, ids, 4, 4, 4)
    with pytest.raises(ValueError, match="ids has shape"):
        patch_mix_reference(images, draw_assignment(2, 16, 3, 4, seed=0, step=0)[:, :8], 3, 4, 4)
    with pytest.raises(ValueError, match="ids has shape"):
        patch_mix_reference(images, draw_assignment(3, 16, 2, 4, seed=0, step=0), 3, 4, 4)
