"""The assignment: which positions of each image are visible, for which source of its group.

Contract (docs/method.md §1). ``G`` groups of ``r`` sources over ``N`` positions, ``n`` visible per source,
``r * n <= N``. :func:`draw_assignment` returns ``ids: int32 [G, r*n]``, source-major:
``ids[g, j*n:(j+1)*n]`` are source ``j``'s visible positions in ascending order; positions not in
``ids[g]`` are visible for no source. Per group it is a uniform random permutation of the positions,
keyed by ``(seed, step, first_group + g)`` through a counter-based hash (:func:`assignment_keys`), so
CPU, CUDA, Triton and any number of ranks draw bitwise the same ``ids``.

Equivalent PyTorch (what the torch path of :func:`draw_assignment` computes)::

    keys = assignment_keys(G, N, seed, step, first_group)     # int64 [G, N], distinct per row
    perm = keys.argsort(dim=1)[:, : r * n]
    ids = perm.view(G, r, n).sort(dim=2).values.reshape(G, r * n).int()

The Triton path (:func:`assignment_forward`, one kernel, one program a group) ranks the same keys.
Backends as :func:`mixedae_fast.kernels.patch_mix.patch_mix` (``auto | triton | torch``, op
``assignment`` of ``mixedae_fast/measured.json``).
"""
from __future__ import annotations

import torch

from mixedae_fast.kernels._triton import register_self_check, tl, triton, use_triton

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


def _stream_base(seed: int, step: int) -> int:
    return _fmix32(_fold64(seed) ^ ((_fold64(step) * _GOLDEN) & _M32))


def assignment_keys(num_groups: int, num_patches: int, seed: int, step: int, first_group: int = 0,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Random sort keys ``int64 [G, N]``: a pure function of (seed, step, global group, position).

    A counter-based hash instead of a stateful generator, so CPU, CUDA, Triton and any number of
    ranks draw bitwise the same assignment. The position sits in the low 32 bits, which makes every
    key of a row distinct and the sort order unique.
    """
    base = _stream_base(seed, step)
    groups = torch.arange(first_group, first_group + num_groups, device=device, dtype=torch.int64)
    pos = torch.arange(num_patches, device=device, dtype=torch.int64)
    h_group = _fmix32((groups & _M32) ^ base)                      # [G]
    h = _fmix32(h_group[:, None] ^ ((pos[None, :] * _GOLDEN + _C2) & _M32))  # [G, N]
    return (h << 32) | pos


def draw_assignment(num_groups: int, num_patches: int, group_size: int, n_visible: int, seed: int,
                    step: int, first_group: int = 0, device: torch.device | str | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Draw ``ids: int32 [G, r*n]`` on ``device``: per group a uniform random permutation of the
    positions, whose j-th block of ``n`` belongs to source ``j`` (sorted ascending); positions past
    ``r*n`` are dropped. Keyed by ``(seed, step, first_group + g)``, never by rank or device.
    ``backend`` as :func:`patch_mix`: the Triton path (one kernel) is bitwise this torch code.
    """
    r, n = group_size, n_visible
    if r * n > num_patches or n < 1:
        raise ValueError(f"need 1 <= n and r*n <= N, got r={r}, n={n}, N={num_patches}")
    if use_triton(backend, torch.device("cpu") if device is None else torch.device(device), op="assignment"):
        return assignment_forward(num_groups, num_patches, r, n, seed, step, first_group, device)
    keys = assignment_keys(num_groups, num_patches, seed, step, first_group, device)
    perm = keys.argsort(dim=1)[:, : r * n]
    ids = perm.view(num_groups, r, n).sort(dim=2).values
    return ids.reshape(num_groups, r * n).to(torch.int32)


@triton.jit
def _fmix32_tl(x):
    """:func:`_fmix32` on uint32 values held in int64 (products wrap; the mask keeps the low 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _sort_key(pos, group_hash):
    """The high word of :func:`assignment_keys`, as the signed int32 that ``(h << 32) | pos`` sorts by."""
    h = _fmix32_tl(group_hash ^ ((pos.to(tl.int64) * 0x9E3779B9 + 0xC2B2AE35) & 0xFFFFFFFF))
    return tl.where(h >= 0x80000000, h - 0x100000000, h)


@triton.jit
def _assignment_kernel(ids_ptr, base, first_group, N, NV, R: tl.constexpr, BLOCK_N: tl.constexpr,
                       CHUNK: tl.constexpr):
    """One program a group: rank its N keys (ties impossible: the position breaks them), give the
    first r*n to sources by rank // n, place each in its source ascending by position (a cumsum)."""
    g = tl.program_id(0)
    group_hash = _fmix32_tl(((g.to(tl.int64) + first_group) & 0xFFFFFFFF) ^ base)
    i = tl.arange(0, BLOCK_N)
    key_i = _sort_key(i, group_hash)
    rank = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, BLOCK_N, CHUNK):  # [BLOCK_N, CHUNK] comparisons at a time
        k = k0 + tl.arange(0, CHUNK)
        key_k = _sort_key(k, group_hash)
        before = (key_k[None, :] < key_i[:, None]) | ((key_k[None, :] == key_i[:, None]) & (k[None, :] < i[:, None]))
        rank += tl.sum((before & (k < N)[None, :]).to(tl.int32), axis=1)
    src = tl.where((rank < R * NV) & (i < N), rank // NV, R)                 # R = dropped
    slot = tl.zeros([BLOCK_N], dtype=tl.int32)
    for j in tl.static_range(R):
        mine = src == j
        slot = tl.where(mine, tl.cumsum(mine.to(tl.int32), axis=0) - 1, slot)
    tl.store(ids_ptr + g.to(tl.int64) * (R * NV) + src * NV + slot, i, mask=src < R)


def assignment_forward(num_groups: int, num_patches: int, group_size: int, n_visible: int, seed: int,
                       step: int, first_group: int = 0, device=None) -> torch.Tensor:
    """The Triton path of :func:`draw_assignment` (arguments checked there): bitwise the same ids."""
    r, n = group_size, n_visible
    ids = torch.empty(num_groups, r * n, dtype=torch.int32, device=device)
    block_n = triton.next_power_of_2(num_patches)
    _assignment_kernel[(num_groups,)](ids, _stream_base(seed, step), first_group, num_patches, n, R=r,
                                      BLOCK_N=block_n, CHUNK=min(block_n, 16), num_warps=8)  # ~80 registers
    return ids



@register_self_check("assignment")
def _check_kernels(device: torch.device) -> str | None:
    """The assignment kernel against the torch draw on ``device`` (N = 25, r*n = 24 < N): None when they
    agree, else what differed."""
    r, n, N = 4, 6, 25
    ids = draw_assignment(2, N, r, n, seed=1, step=2, device=device, backend="torch")
    if not torch.equal(assignment_forward(2, N, r, n, 1, 2, device=device), ids):
        return "assignment ids differ from the torch draw"
    return None
