"""Patch mixing: patchify, the group's mixed encoder input, norm-pix targets, loss mask (the assignment
``ids`` it reads is drawn by :func:`mixedae_fast.kernels.assignment.draw_assignment`).

Contract (docs/method.md §1, §2, §6). ``B`` images, group size ``r``, ``G = B / r`` groups; image
``i = g * r + j`` is source ``j`` of group ``g``. ``N`` positions of ``P x P`` patches, ``n`` visible
per source, ``r * n <= N``.

``ids: int32 [G, r*n]`` holds the assignment, source-major: ``ids[g, j*n:(j+1)*n]`` are source ``j``'s
visible positions in ascending order. Positions not in ``ids[g]`` are dropped (visible for no source).

Equivalent PyTorch (what :func:`patch_mix_reference` computes)::

    patches = patchify(images, P)                         # [B, N, 3P²], MAE order (p, q, c)
    mixed = patches.view(G, r, N, -1).gather(2, ids.view(G, r, n))   # [G, r*n, 3P²]
    loss_mask[b, p] = p not in ids[g, j*n:(j+1)*n]        # [B, N] bool, True = reconstruct
    targets = norm_pix(patches.float())                    # [B, N, 3P²] fp32

The images are data: nothing here needs a backward pass for them. The Triton path
(:func:`patch_mix_forward`) returns tensors without autograd history; the reference inherits
``images.requires_grad`` like any torch op.

Backends (:func:`patch_mix`; the same for ``draw_assignment`` and ``unmix``): ``auto`` = Triton on a
CUDA card where ``mixedae_fast/measured.json`` records the kernel as measured faster for that op and the
kernels passed their once-per-device self-check (:mod:`mixedae_fast.kernels._triton`), the reference
otherwise; ``triton`` forces the kernel (on CPU only through ``TRITON_INTERPRET=1``); ``torch`` = the
reference.

Norm-pix targets are computed on each patch shifted by its first value (the mean and variance do not
change): pixels far from zero (raw 0-255 values, a bright flat sky) would otherwise lose their
variance to fp32 cancellation in the mean, and a constant patch gives exactly 0 however its value
rounds. Both paths do it; the kernel divides and takes the square root correctly rounded (``div_rn``,
``sqrt_rn``), not with the GPU's approximate instructions.
"""
from __future__ import annotations

import torch

from mixedae_fast.kernels._triton import register_self_check, tl, triton, use_triton
from mixedae_fast.tolerances import tol


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
    t = t - t[..., :1]  # exact for nearby values (Sterbenz): no cancellation in the mean, see the module doc
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




# -- Triton ----------------------------------------------------------------------------------------
@triton.jit
def _patch_mix_kernel(img_ptr, ids_ptr, mixed_ptr, tgt_ptr, mask_ptr,
                      s_b, s_c, s_h, s_w, N, GRID_W, NV,
                      P: tl.constexpr, PATCH_DIM: tl.constexpr, NORM_PIX: tl.constexpr, EPS: tl.constexpr,
                      BLOCK_WI: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program: image ``b`` (axis 0), patch row ``hi`` (axis 1), ``BLOCK_WI`` patches along it (axis
    2), as a ``[BLOCK_WI, p, q, c]`` tile (``P`` padded to ``BLOCK_P``, ``c`` 3 -> 4). ``q`` is an axis of
    its own and runs along the image row (stride ``s_w``, 1 for NCHW): the loads see ``P`` contiguous pixels
    per patch row and ``BLOCK_WI * P`` across a warp; ``(q, c)`` runs along the output vector, so the
    stores of targets and mixed patches are contiguous too (Triton's coalescing pass gives each access its
    own layout and converts in between). One pass: every loaded pixel is a target and a mixed value."""
    b = tl.program_id(0)
    hi = tl.program_id(1)
    wi = tl.program_id(2) * BLOCK_WI + tl.arange(0, BLOCK_WI)               # [BLOCK_WI] patch columns
    wi_ok = wi < GRID_W
    w4 = wi[:, None, None, None]
    p = tl.arange(0, BLOCK_P)[None, :, None, None]
    q = tl.arange(0, BLOCK_P)[None, None, :, None]
    c = tl.arange(0, 4)[None, None, None, :]
    ok = wi_ok[:, None, None, None] & (p < P) & (q < P) & (c < 3)           # [BLOCK_WI, BLOCK_P, BLOCK_P, 4]
    b64 = b.to(tl.int64)  # B * image size can pass 2**31
    src = img_ptr + b64 * s_b + c * s_c + (hi * P + p) * s_h + (w4 * P + q) * s_w
    x = tl.load(src, mask=ok, other=0.0)
    elem = (p * P + q) * 3 + c                                               # MAE's (p, q, c) order

    xf = x.to(tl.float32)  # statistics in fp32 whatever the image dtype
    if NORM_PIX:
        # shift by the patch's first value (see the module doc); then a two-pass mean and variance
        first = tl.sum(tl.sum(tl.sum(tl.where((p == 0) & (q == 0) & (c == 0), xf, 0.0), 3), 2), 1)
        xf = tl.where(ok, xf - first[:, None, None, None], 0.0)
        mean = tl.div_rn(tl.sum(tl.sum(tl.sum(xf, 3), 2), 1), tl.full([BLOCK_WI], PATCH_DIM, tl.float32))
        dev = tl.where(ok, xf - mean[:, None, None, None], 0.0)
        var = tl.div_rn(tl.sum(tl.sum(tl.sum(dev * dev, 3), 2), 1),
                        tl.full([BLOCK_WI], PATCH_DIM - 1, tl.float32))          # unbiased, as MAE
        std = tl.sqrt_rn(var + EPS)[:, None, None, None]
        xf = tl.div_rn(dev, tl.broadcast_to(std, (BLOCK_WI, BLOCK_P, BLOCK_P, 4)))
    pos = hi * GRID_W + wi                                                   # [BLOCK_WI] positions
    row = b64 * N + pos                                                      # rows of targets [B*N, 3P²]
    tl.store(tgt_ptr + row[:, None, None, None] * PATCH_DIM + elem, xf, mask=ok)

    # Is the position one of source b's n visible ones, and at which slot? ids[g, j*n:(j+1)*n] is
    # row b of ids viewed as [B, n]; mixed viewed as [B*n, 3P²] puts slot t of source b at row b*n + t.
    v = tl.arange(0, BLOCK_V)
    sel = tl.load(ids_ptr + b64 * NV + v, mask=v < NV, other=0)
    hit = (pos[:, None] == sel[None, :]) & (v < NV)[None, :]                 # [BLOCK_WI, BLOCK_V]
    visible = tl.max(hit.to(tl.int32), axis=1)                               # 0 or 1
    slot = tl.sum(tl.where(hit, v[None, :], 0), axis=1)
    tl.store(mask_ptr + row, (1 - visible).to(tl.uint8), mask=wi_ok)
    dst = mixed_ptr + (b64 * NV + slot)[:, None, None, None] * PATCH_DIM + elem
    tl.store(dst, x, mask=ok & (visible > 0)[:, None, None, None])  # a copy: the image dtype, bit for bit


def _prune_patch_mix_configs(configs, named_args, **kwargs):
    """Tiles of 1K, 2K or 4K elements (a 4K tile is 32 fp32 registers a thread at 4 warps), none past
    the patch row: at most 3 tiles x 2 warp counts to compile and time per shape."""
    args = {**named_args, **kwargs}
    patch = 4 * triton.next_power_of_2(args["P"]) ** 2
    most = triton.next_power_of_2(args["GRID_W"])
    sizes = sorted({c.kwargs["BLOCK_WI"] for c in configs if c.kwargs["BLOCK_WI"] <= most})
    keep = [b for b in sizes if 1024 <= b * patch <= 4096] or [max(b for b in sizes if b * patch <= 4096 or b == 1)]
    return [c for c in configs if c.kwargs["BLOCK_WI"] in keep]


# CUDA only: patches a program x warps, pruned to the patch size; outputs are written, never read, so
# the timing runs are harmless
_patch_mix_tuned = None if tl is None else triton.autotune(
    [triton.Config({"BLOCK_WI": bw}, num_warps=w) for bw in (1, 2, 4, 8, 16) for w in (4, 8)],
    key=["GRID_W", "NV", "PATCH_DIM", "NORM_PIX"],
    prune_configs_by={"early_config_prune": _prune_patch_mix_configs})(_patch_mix_kernel)


def patch_mix_forward(images: torch.Tensor, ids: torch.Tensor, group_size: int, n_visible: int,
                      patch_size: int, norm_pix: bool = True):
    """The Triton path of :func:`patch_mix_reference` (same arguments, same return): one pass that
    reads each image once, straight from its strides. No autograd: the images are data."""
    B, C, H, W = images.shape
    r, n, P = group_size, n_visible, patch_size
    if C != 3 or H != W or H % P:
        raise ValueError(f"images of shape {tuple(images.shape)}: need [B, 3, S, S] with S % {P} == 0")
    if B % r:
        raise ValueError(f"batch of {B} images is not a multiple of the group size {r}")
    G, grid_w = B // r, W // P
    N, D = grid_w * grid_w, 3 * P * P
    if tuple(ids.shape) != (G, r * n):
        raise ValueError(f"ids has shape {tuple(ids.shape)}, expected (G, r*n) = ({G}, {r * n})")
    ids = ids.to(device=images.device, dtype=torch.int32).contiguous()
    mixed = torch.empty(G, r * n, D, dtype=images.dtype, device=images.device)
    targets = torch.empty(B, N, D, dtype=torch.float32, device=images.device)
    loss_mask = torch.empty(B, N, dtype=torch.bool, device=images.device)
    block_p = triton.next_power_of_2(P)
    args = (images, ids, mixed, targets, loss_mask.view(torch.uint8), *images.stride(), N, grid_w, n)
    meta = dict(P=P, PATCH_DIM=D, NORM_PIX=bool(norm_pix), EPS=1e-6, BLOCK_P=block_p,
                BLOCK_V=triton.next_power_of_2(n))
    if images.is_cuda:  # autotuned per card and shape (the first call of a shape times the configs)
        _patch_mix_tuned[lambda m: (B, grid_w, triton.cdiv(grid_w, m["BLOCK_WI"]))](*args, **meta)
        return mixed, targets, loss_mask
    # the interpreter cannot autotune: one fixed config of 1K-element tiles (one 16 px patch a program,
    # several small ones), which covers ragged patch rows in the CPU tests
    block_wi = max(1, min(triton.next_power_of_2(grid_w), 1024 // (4 * block_p * block_p)))
    _patch_mix_kernel[(B, grid_w, triton.cdiv(grid_w, block_wi))](*args, **meta, BLOCK_WI=block_wi, num_warps=4)
    return mixed, targets, loss_mask


# The Triton path as a torch.library custom op: torch.compile keeps it whole (no graph break) and takes
# its output shapes from the fake implementation.
@torch.library.custom_op("mixedae_fast::patch_mix", mutates_args=())
def _patch_mix_op(images: torch.Tensor, ids: torch.Tensor, group_size: int, n_visible: int, patch_size: int,
                  norm_pix: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return patch_mix_forward(images, ids, group_size, n_visible, patch_size, norm_pix)


@_patch_mix_op.register_fake
def _(images, ids, group_size, n_visible, patch_size, norm_pix):
    B, C, S, _ = images.shape
    N, D = (S // patch_size) ** 2, C * patch_size * patch_size
    return (images.new_empty(B // group_size, group_size * n_visible, D),
            images.new_empty(B, N, D, dtype=torch.float32), images.new_empty(B, N, dtype=torch.bool))


def patch_mix(images, ids, group_size, n_visible, patch_size, norm_pix=True, backend="auto"):
    """The op the model calls: :func:`patch_mix_forward` (as the custom op ``torch.ops.mixedae_fast.
    patch_mix``) or :func:`patch_mix_reference` by ``backend``."""
    if use_triton(backend, images, ids, op="patch_mix"):
        return _patch_mix_op(images, ids, group_size, n_visible, patch_size, bool(norm_pix))
    return patch_mix_reference(images, ids, group_size, n_visible, patch_size, norm_pix)


@register_self_check("patch_mix")
def _check_kernels(device: torch.device) -> str | None:
    """The patch_mix kernel against its reference at small odd shapes on ``device`` (a constant and a
    far-from-zero patch included): None when they agree, else what differed."""
    gen = torch.Generator().manual_seed(0)
    r, n, P, S = 4, 6, 8, 40                                          # 5x5 grid: N = 25, r*n = 24 < N
    N = (S // P) ** 2
    ids = torch.stack([torch.randperm(N, generator=gen)[:r * n].view(r, n).sort().values.flatten()
                       for _ in range(2)]).to(device=device, dtype=torch.int32)  # any valid assignment
    images = torch.randn(2 * r, 3, S, S, generator=gen)
    images[0, :, :P, :P] = 1000.1                                     # a constant patch: targets exactly 0
    images[1] = 1000.0 + 1e-3 * images[1]                             # far from zero: no cancellation allowed
    for dtype in (torch.float32, torch.bfloat16):
        x = images.to(device=device, dtype=dtype)
        got, want = patch_mix_forward(x, ids, r, n, P), patch_mix_reference(x, ids, r, n, P)
        if not (torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])):
            return "mixed patches or loss mask differ"
        if not (torch.allclose(got[1], want[1], **tol(torch.float32, device, "selfcheck")) and not got[1][0, 0].any()):
            return f"targets differ ({dtype})"
    return None
