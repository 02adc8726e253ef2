"""Patch mixing: assignment, patchify, the group's mixed encoder input, norm-pix targets, loss mask.

Contract (DESIGN §1 steps 1, 2, 6). ``B`` images, group size ``r``, ``G = B / r`` groups; image
``i = g * r + j`` is source ``j`` of group ``g``. ``N`` positions of ``P x P`` patches, ``n`` visible
per source, ``r * n <= N``.

``ids: int32 [G, r*n]`` holds the assignment, source-major: ``ids[g, j*n:(j+1)*n]`` are source ``j``'s
visible positions in ascending order. Positions not in ``ids[g]`` are dropped (visible for no source).

Equivalent PyTorch (what :func:`patch_mix_reference` computes)::

    patches = patchify(images, P)                         # [B, N, 3P²], MAE order (p, q, c)
    mixed = patches.view(G, r, N, -1).gather(2, ids.view(G, r, n))   # [G, r*n, 3P²]
    loss_mask[b, p] = p not in ids[g, j*n:(j+1)*n]        # [B, N] bool, True = reconstruct
    targets = norm_pix(patches.float())                    # [B, N, 3P²] fp32

The images are data: nothing here needs a backward pass for them.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
# odd 32-bit constants (murmur3's finaliser and the golden ratio) for the counter-based hash
_C1, _C2, _GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9


def _fmix32(x):
    """murmur3's 32-bit finaliser on uint32 values held in int64 tensors (or Python ints).

    Products may pass 2**63 and wrap; the low 32 bits kept by the mask are still exact.
    """
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 13)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def _fold64(v: int) -> int:
    v &= (1 << 64) - 1
    return _fmix32((v & _M32) ^ _fmix32((v >> 32) ^ _GOLDEN))


def assignment_keys(num_groups: int, num_patches: int, seed: int, step: int, first_group: int = 0,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Random sort keys ``int64 [G, N]``: a pure function of (seed, step, global group, position).

    A counter-based hash instead of a stateful generator, so CPU, CUDA, Triton and any number of
    ranks draw bitwise the same assignment. The position sits in the low 32 bits, which makes every
    key of a row distinct and the sort order unique.
    """
    base = _fmix32(_fold64(seed) ^ ((_fold64(step) * _GOLDEN) & _M32))
    groups = torch.arange(first_group, first_group + num_groups, device=device, dtype=torch.int64)
    pos = torch.arange(num_patches, device=device, dtype=torch.int64)
    h_group = _fmix32((groups & _M32) ^ base)                      # [G]
    h = _fmix32(h_group[:, None] ^ ((pos[None, :] * _GOLDEN + _C2) & _M32))  # [G, N]
    return (h << 32) | pos


def draw_assignment(num_groups: int, num_patches: int, group_size: int, n_visible: int, seed: int,
                    step: int, first_group: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Draw ``ids: int32 [G, r*n]`` on ``device``: per group a uniform random permutation of the
    positions, whose j-th block of ``n`` belongs to source ``j`` (sorted ascending); positions past
    ``r*n`` are dropped. Keyed by ``(seed, step, first_group + g)``, never by rank or device.
    """
    r, n = group_size, n_visible
    if r * n > num_patches or n < 1:
        raise ValueError(f"need 1 <= n and r*n <= N, got r={r}, n={n}, N={num_patches}")
    keys = assignment_keys(num_groups, num_patches, seed, step, first_group, device)
    perm = keys.argsort(dim=1)[:, : r * n]
    ids = perm.view(num_groups, r, n).sort(dim=2).values
    return ids.reshape(num_groups, r * n).to(torch.int32)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, S, S] -> [B, N, P*P*C]`` in MAE's order: row in patch, column in patch, channel."""
    B, C, H, W = images.shape
    P = patch_size
    h, w = H // P, W // P
    x = images.reshape(B, C, h, P, w, P)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, P * P * C)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, P*P*C] -> [B, C, S, S]`` (square images)."""
    B, N, _ = patches.shape
    P, C = patch_size, channels
    h = w = int(round(N ** 0.5))
    x = patches.reshape(B, h, w, P, P, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, h * P, w * P)


def norm_pix_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` targets in fp32: per patch ``(t - mean) / sqrt(var + eps)``, the
    variance unbiased over the patch's ``3P²`` values."""
    t = patches.float()
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True, unbiased=True)
    return (t - mean) / (var + eps).sqrt()


def patch_mix_reference(images: torch.Tensor, ids: torch.Tensor, group_size: int, n_visible: int,
                        patch_size: int, norm_pix: bool = True):
    """Returns ``(mixed [G, r*n, 3P²] image dtype, targets [B, N, 3P²] fp32, loss_mask [B, N] bool)``.

    ``loss_mask`` is True where the position is *not* visible for that source (MAE's mask=1 means
    removed), dropped positions included.
    """
    B = images.shape[0]
    r, n = group_size, n_visible
    if B % r:
        raise ValueError(f"batch of {B} images is not a multiple of the group size {r}")
    G = B // r
    patches = patchify(images, patch_size)                   # [B, N, D]
    N, D = patches.shape[1], patches.shape[2]
    if tuple(ids.shape) != (G, r * n):
        raise ValueError(f"ids has shape {tuple(ids.shape)}, expected (G, r*n) = ({G}, {r * n})")
    idx = ids.view(G, r, n).long()
    mixed = patches.view(G, r, N, D).gather(2, idx[..., None].expand(G, r, n, D)).reshape(G, r * n, D)
    loss_mask = torch.ones(G, r, N, dtype=torch.bool, device=images.device)
    loss_mask.scatter_(2, idx, False)
    targets = norm_pix_targets(patches) if norm_pix else patches.float()
    return mixed, targets, loss_mask.view(B, N)


def patch_mix(images, ids, group_size, n_visible, patch_size, norm_pix=True):
    """The op the model calls; today the reference (the Triton path drops in beside it)."""
    return patch_mix_reference(images, ids, group_size, n_visible, patch_size, norm_pix)
