"""Unmix: the group's decoder-embedded encoder tokens -> one decoder input sequence per source.

Contract (docs/method.md §5). ``dec_tokens: [G, 1 + r*n, D]`` (token 0 the group CLS, then source-
major patch tokens), ``ids: int [G, r*n]`` the assignment, ``mask_token: [D]`` (any shape that views
as ``[D]``), ``dec_pos: [1, N+1, D]`` the fixed decoder position embedding (row 0 for the CLS).
Returns ``[B, N+1, D]``, ``B = G*r``, in ``dec_tokens``' dtype::

    out[g*r + j, 0]          = dec_tokens[g, 0]                  + dec_pos[0, 0]
    out[g*r + j, 1 + p]      = dec_tokens[g, 1 + j*n + t]        + dec_pos[0, 1 + p]   where p = ids[g, j*n + t]
    out[g*r + j, 1 + p]      = mask_token                        + dec_pos[0, 1 + p]   elsewhere

Gradients reach ``dec_tokens`` (visible tokens, and the CLS summed over the group's r sources) and
``mask_token`` (summed over masked slots); the fixed ``dec_pos`` gets none. ``ids`` must be a valid
assignment (distinct positions per group), as :func:`~mixedae_fast.kernels.assignment.draw_assignment`
draws it.

The Triton path (:func:`unmix_triton`) adds in fp32 and rounds once to the dtype: bitwise the
reference computed in fp32 and rounded (the reference in bf16/fp16 rounds ``mask_token`` and
``dec_pos`` to the dtype before the add, so the two differ there by up to a rounding of each input;
in fp32 they agree exactly). Its backward is deterministic (no atomics: bitwise reproducible) and
sums the CLS and mask-token gradients in fp32. Backends as
:func:`~mixedae_fast.kernels.patch_mix.patch_mix` (``auto``: the ``unmix`` entry of the measured table).
"""
from __future__ import annotations

import torch

from mixedae_fast.kernels._triton import _buffer_dtype, register_self_check, tl, triton, use_triton
from mixedae_fast.tolerances import tol


def unmix_reference(dec_tokens: torch.Tensor, ids: torch.Tensor, mask_token: torch.Tensor,
                    dec_pos: torch.Tensor, group_size: int) -> torch.Tensor:
    G, L, D = dec_tokens.shape
    r = group_size
    n = (L - 1) // r
    N = dec_pos.shape[1] - 1
    if L != 1 + r * n or tuple(ids.shape) != (G, r * n):
        raise ValueError(f"dec_tokens {tuple(dec_tokens.shape)} and ids {tuple(ids.shape)} do not fit "
                         f"group_size {r}")
    dtype = dec_tokens.dtype
    base = mask_token.reshape(1, 1, 1, D).to(dtype).expand(G, r, N, D)
    idx = ids.view(G, r, n).long()[..., None].expand(G, r, n, D)
    patches = torch.scatter(base, 2, idx, dec_tokens[:, 1:].reshape(G, r, n, D)).reshape(G * r, N, D)
    cls = dec_tokens[:, :1].repeat_interleave(r, dim=0)                 # [B, 1, D]
    return torch.cat([cls, patches], dim=1) + dec_pos.to(dtype).detach()




# -- Triton ----------------------------------------------------------------------------------------
@triton.jit
def _slots(ids_ptr, b64, pos, NV, BLOCK_V: tl.constexpr):
    """For positions ``pos`` (``[BLOCK_L]``) of source ``b``: visible (0/1) and the slot ``t`` in
    ``ids[g, j*n:(j+1)*n]`` (row ``b`` of ids viewed as ``[B, n]``)."""
    v = tl.arange(0, BLOCK_V)
    sel = tl.load(ids_ptr + b64 * NV + v, mask=v < NV, other=0)
    hit = (pos[:, None] == sel[None, :]) & (v < NV)[None, :]
    return tl.max(hit.to(tl.int32), axis=1), tl.sum(tl.where(hit, v[None, :], 0), axis=1)


@triton.jit
def _unmix_fwd_kernel(tok_ptr, ids_ptr, mask_tok_ptr, pos_ptr, out_ptr, N, D, NV, R: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program: source ``b`` (axis 0) x ``BLOCK_L`` output rows (axis 1) x ``BLOCK_D`` channels
    (axis 2). Each output row gathers one token row (CLS, visible token or the mask token)."""
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)                # 0 = CLS, 1 + p = position p
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    g64 = b64 // R
    visible, slot = _slots(ids_ptr, b64, rows - 1, NV, BLOCK_V)
    take = (rows == 0) | (visible > 0)
    # row of dec_tokens viewed as [G*(1+r*n), D]: the CLS at g*(1+r*n), source j's slot t at +1+j*n+t
    tok_row = g64 * (1 + R * NV) + tl.where(rows == 0, 0, 1 + (b64 - g64 * R) * NV + slot)
    row_ok = rows <= N
    d_ok = d < D
    ok = row_ok[:, None] & d_ok[None, :]
    x = tl.load(tok_ptr + tok_row[:, None] * D + d[None, :], mask=ok & take[:, None], other=0.0)
    m = tl.load(mask_tok_ptr + d, mask=d_ok, other=0.0)
    pe = tl.load(pos_ptr + rows[:, None] * D + d[None, :], mask=ok, other=0.0)
    val = tl.where(take[:, None], x.to(tl.float32), m.to(tl.float32)[None, :]) + pe.to(tl.float32)
    out = out_ptr + (b64 * (N + 1) + rows)[:, None] * D + d[None, :]
    tl.store(out, val.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _unmix_bwd_kernel(gout_ptr, ids_ptr, gtok_ptr, part_ptr, N, D, NV, R: tl.constexpr,
                      ROW_BLOCKS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    """One program: source ``b`` (axis 0) x ``BLOCK_D`` channels (axis 1), looping over its ``N+1`` rows.

    Every visible slot of ``dec_tokens`` is one (source, position) pair, so its gradient is a plain
    store; the group's first source writes the CLS gradient (its r rows 0 summed in a fixed order);
    the masked rows are summed into ``part[b]`` (fp32), which the launcher sums over ``b``. No atomics:
    the result is bitwise reproducible."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    b64 = b.to(tl.int64)
    g64 = b64 // R
    j64 = b64 - g64 * R
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for i in range(ROW_BLOCKS):  # constexpr trip counts: the interpreter rejects runtime ones
        rows = 1 + i * BLOCK_L + tl.arange(0, BLOCK_L)
        row_ok = rows <= N
        visible, slot = _slots(ids_ptr, b64, rows - 1, NV, BLOCK_V)
        ok = row_ok[:, None] & d_ok[None, :]
        gy = tl.load(gout_ptr + (b64 * (N + 1) + rows)[:, None] * D + d[None, :], mask=ok, other=0.0)
        tok_row = g64 * (1 + R * NV) + 1 + j64 * NV + slot
        tl.store(gtok_ptr + tok_row[:, None] * D + d[None, :], gy.to(gtok_ptr.dtype.element_ty),
                 mask=ok & (visible > 0)[:, None])
        acc += tl.where((visible == 0)[:, None], gy.to(tl.float32), 0.0)  # masked-out rows load 0
    tl.store(part_ptr + b64 * D + d, tl.sum(acc, axis=0), mask=d_ok)

    lead = j64 == 0
    cls = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(R):
        cls += tl.load(gout_ptr + (g64 * R + k) * (N + 1) * D + d, mask=d_ok & lead, other=0.0).to(tl.float32)
    tl.store(gtok_ptr + g64 * (1 + R * NV) * D + d, cls.to(gtok_ptr.dtype.element_ty), mask=d_ok & lead)


def _shapes(dec_tokens: torch.Tensor, ids: torch.Tensor, dec_pos: torch.Tensor, group_size: int):
    G, L, D = dec_tokens.shape
    r = group_size
    n = (L - 1) // r
    if L != 1 + r * n or tuple(ids.shape) != (G, r * n):
        raise ValueError(f"dec_tokens {tuple(dec_tokens.shape)} and ids {tuple(ids.shape)} do not fit "
                         f"group_size {r}")
    return G, r, n, dec_pos.shape[1] - 1, D


def _blocks(rows: int, D: int, max_d: int, tile: int):
    """(BLOCK_L, BLOCK_D): full 128-byte lines a row, 16 rows at D = 512 (sm_90 ptxas: ~40 registers
    forward, ~80 backward, no spills; untuned). The interpreter runs the same blocks, so the CPU tests
    cover the multi-block paths."""
    block_d = min(triton.next_power_of_2(D), max_d)
    return max(1, min(triton.next_power_of_2(rows), tile // block_d)), block_d


def unmix_forward(dec_tokens: torch.Tensor, ids: torch.Tensor, mask_token: torch.Tensor,
                  dec_pos: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B, N+1, D]`` in ``dec_tokens``' dtype: the forward of :func:`unmix_triton`."""
    G, r, n, N, D = _shapes(dec_tokens, ids, dec_pos, group_size)
    dtype, dev = dec_tokens.dtype, dec_tokens.device
    tokens = dec_tokens.contiguous()
    ids = ids.to(device=dev, dtype=torch.int32).contiguous()
    mask_token = mask_token.detach().reshape(D).contiguous()
    dec_pos = dec_pos.detach().reshape(N + 1, D).contiguous()
    out = torch.empty(G * r, N + 1, D, dtype=_buffer_dtype(dtype, _unmix_fwd_kernel), device=dev)
    block_l, block_d = _blocks(N + 1, D, max_d=128, tile=2048)
    grid = (G * r, triton.cdiv(N + 1, block_l), triton.cdiv(D, block_d))
    _unmix_fwd_kernel[grid](tokens, ids, mask_token, dec_pos, out, N, D, n, R=r, BLOCK_L=block_l,
                            BLOCK_D=block_d, BLOCK_V=triton.next_power_of_2(n), num_warps=4)
    return out.to(dtype)


def unmix_backward(grad_out: torch.Tensor, ids: torch.Tensor, group_size: int, dtype: torch.dtype,
                   mask_shape: torch.Size, mask_dtype: torch.dtype):
    """``grad_out [B, N+1, D]`` -> ``(grad dec_tokens [G, 1+r*n, D] in dtype, grad mask_token in
    mask_shape and mask_dtype)``, the CLS and mask-token gradients summed in fp32."""
    B, L, D = grad_out.shape
    r = group_size
    G, n, N = B // r, ids.shape[1] // r, L - 1
    grad_out = grad_out.contiguous()
    ids = ids.to(device=grad_out.device, dtype=torch.int32).contiguous()
    grad_tokens = torch.empty(G, 1 + r * n, D, dtype=_buffer_dtype(dtype, _unmix_bwd_kernel),
                              device=grad_out.device)
    part = torch.empty(B, D, dtype=torch.float32, device=grad_out.device)
    block_l, block_d = _blocks(N, D, max_d=64, tile=1024)  # more programs: each loops over its rows
    grid = (B, triton.cdiv(D, block_d))
    _unmix_bwd_kernel[grid](grad_out, ids, grad_tokens, part, N, D, n, R=r, ROW_BLOCKS=triton.cdiv(N, block_l),
                            BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_V=triton.next_power_of_2(n), num_warps=4)
    grad_mask = part.sum(0).reshape(mask_shape).to(mask_dtype)
    return grad_tokens.to(dtype), grad_mask


# The Triton path as torch.library custom ops with an autograd formula: torch.compile treats them as
# opaque nodes (no graph break; shapes from the fake implementations) and eager autograd works as usual.
@torch.library.custom_op("mixedae_fast::unmix", mutates_args=())
def _unmix_op(dec_tokens: torch.Tensor, ids: torch.Tensor, mask_token: torch.Tensor, dec_pos: torch.Tensor,
              group_size: int) -> torch.Tensor:
    return unmix_forward(dec_tokens, ids, mask_token, dec_pos, group_size)


@_unmix_op.register_fake
def _(dec_tokens, ids, mask_token, dec_pos, group_size):
    G, _, D = dec_tokens.shape
    return dec_tokens.new_empty(G * group_size, dec_pos.shape[-2], D)


@torch.library.custom_op("mixedae_fast::unmix_backward", mutates_args=())
def _unmix_backward_op(grad_out: torch.Tensor, ids: torch.Tensor, mask_token: torch.Tensor,
                       group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return unmix_backward(grad_out, ids, group_size, grad_out.dtype, mask_token.shape, mask_token.dtype)


@_unmix_backward_op.register_fake
def _(grad_out, ids, mask_token, group_size):
    G, D = ids.shape[0], grad_out.shape[-1]
    return grad_out.new_empty(G, 1 + ids.shape[1], D), torch.empty_like(mask_token)


def _unmix_setup_context(ctx, inputs, output):
    _, ids, mask_token, _, group_size = inputs
    ctx.save_for_backward(ids, mask_token.detach())
    ctx.group_size = group_size


def _unmix_grad(ctx, grad_out):
    ids, mask_token = ctx.saved_tensors
    grad_tokens, grad_mask = _unmix_backward_op(grad_out.contiguous(), ids, mask_token, ctx.group_size)
    return grad_tokens, None, grad_mask, None, None


_unmix_op.register_autograd(_unmix_grad, setup_context=_unmix_setup_context)


def unmix_triton(dec_tokens: torch.Tensor, ids: torch.Tensor, mask_token: torch.Tensor, dec_pos: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """:func:`unmix_reference` through the Triton kernels, forward and backward (``dec_pos`` gets no
    gradient: it is fixed). A custom op (``torch.ops.mixedae_fast.unmix``): ``torch.compile`` keeps it
    whole."""
    return _unmix_op(dec_tokens, ids, mask_token, dec_pos, group_size)


def unmix(dec_tokens, ids, mask_token, dec_pos, group_size, backend="auto"):
    """The op the model calls: :func:`unmix_triton` or :func:`unmix_reference` by ``backend``."""
    if use_triton(backend, dec_tokens, ids, op="unmix"):
        return unmix_triton(dec_tokens, ids, mask_token, dec_pos, group_size)
    return unmix_reference(dec_tokens, ids, mask_token, dec_pos, group_size)


@register_self_check("unmix")
def _check_kernels(device: torch.device) -> str | None:
    """The unmix kernel (forward and backward) against its reference at small odd shapes on ``device``:
    None when they agree, else what differed."""
    gen = torch.Generator().manual_seed(0)
    G, r, n, N, D = 2, 4, 6, 25, 24                                    # r*n = 24 < N = 25
    ids = torch.stack([torch.randperm(N, generator=gen)[:r * n] for _ in range(G)]).to(torch.int32).to(device)
    tokens = torch.randn(G, 1 + r * n, D, generator=gen).to(device).requires_grad_()
    mask_token = torch.randn(1, 1, D, generator=gen).to(device).requires_grad_()
    pos = torch.randn(1, N + 1, D, generator=gen).to(device)
    grad = torch.randn(G * r, N + 1, D, generator=gen).to(device)
    outs = []
    for fn in (unmix_triton, unmix_reference):
        out = fn(tokens, ids, mask_token, pos, r)
        outs.append((out.detach(), *torch.autograd.grad(out, (tokens, mask_token), grad)))
    if not all(torch.allclose(a, b, **tol(torch.float32, device, "selfcheck")) for a, b in zip(*outs)):
        return "output or gradients differ"
    return None
