"""TopK homologous attention (the paper's homologous *recognition*) and the HC loss's row terms.

Contract (docs/method.md §3, §4). ``q, k, v: [G, H, L, d]`` with ``L = 1 + r*n``: token 0 is the
group CLS, then the patch tokens; ``src: int [L-1]`` the source of each patch token. Scores
``s = q·kᵀ/√d``, the selection made on fp32 scores:

* a patch query keeps the ``K`` highest-scoring *patch* keys (ties at the K-th value kept) and the
  CLS key; the others get −inf before the softmax. The selection is not differentiated.
* the CLS query attends to every key.

With ``hc=True`` it also returns ``hc_rows: fp32 [G, H', L-1, 2]`` for the first ``H' = hc_heads`` heads
(default all; the loss reads head 0 only by default, and the kernels skip the other heads' HC work in
both passes), per patch query ``q`` the two log-sum-exps of the homologous contrastive loss over the
*full* (pre-TopK) patch logits::

    hc_rows[..., 0] = logsumexp_{k != q}            s_qk     # all of the group's patch keys but q
    hc_rows[..., 1] = logsumexp_{k != q, src_k = src_q} s_qk  # its same-source keys
    L_hc = mean(hc_rows[..., 0] - hc_rows[..., 1])

whose gradient flows in the same backward. Returns ``(out [G, H, L, d] in q's dtype, hc_rows | None)``.

Equivalent PyTorch (:func:`homologous_attention_reference`)::

    s = (q.float() @ k.float().mT) * d**-0.5
    keep = s[..., 1:, 1:] >= s[..., 1:, 1:].topk(K).values[..., -1:]      # + CLS key, CLS row all
    out = softmax(s.masked_fill(~keep_full, -inf)) @ v.float()

The fused kernel (:func:`homologous_attention_triton`, ``L <= 256``): one program per (group·head,
``BLOCK_M`` query rows) holds the row's scores against every key in one tile (``L`` padded to a power
of two), finds the K-th largest patch score *exactly* (:func:`_kth_largest_score`: a bracket between two
of the row's scores, narrowed by interpolated probes, a few passes over the row; ties at the K-th value
kept, as ``topk_keep_mask``), masks, softmaxes, multiplies by V, and in the same pass writes the two HC
log-sum-exps, the row's log-sum-exp and the keep mask as bits (``L/32`` words a row). The backward is
one kernel (:func:`_bwd_kernel`, flash-attention style: S and dP once per tile, ``Δ = rowsum(dO∘O)``
inside, P from the saved LSE and the keep bits, so it uses the forward's selection exactly whatever its
own rounding): one program per group·head owns the whole sequence, so dQ, dK and dV are summed in one
fixed order without atomics (bitwise reproducible). The HC terms add ``g0·softmax_{k≠q}(s) +
g1·softmax_{same}(s)`` to dS. On a GPU the dots run in the input dtype (bf16/fp16) with fp32
accumulation, fp32 inputs in IEEE fp32; under Triton's interpreter every dot is fp32 (the interpreter
miscomputes bf16 math). Both passes come in tilings, chosen per card from a measurement
(:mod:`mixedae_fast.measured`, whose ``kernel_variant`` picks a tiling or select for benchmarks;
docs/kernel_notes.md: what they compile to and what a card measured).

The kernels are two ``torch.library`` custom ops (``torch.ops.mixedae_fast.homologous_attention`` and
``..._backward``, fake implementations and an autograd formula): ``torch.compile(fullgraph=True)``
keeps them whole, so a training step with the fused kernel compiles as one graph.
"""
from __future__ import annotations

import torch

from mixedae_fast.choices import TRITON_TOPK_MAX_SEQ
from mixedae_fast.kernels._triton import _buffer_dtype, _interpreted, require_triton, tl, triton
from mixedae_fast.measured import BWD_TILINGS, FWD_TILINGS, select, tiling

MAX_SEQ = TRITON_TOPK_MAX_SEQ  # the fused kernel keeps every key of a row in one tile


def topk_keep_mask(scores_pp: torch.Tensor, topk: int) -> torch.Tensor:
    """``[..., M, M]`` patch-to-patch fp32 scores -> bool keep mask (K-th value ties kept)."""
    with torch.no_grad():
        kth = scores_pp.topk(topk, dim=-1).values[..., -1:]
        return scores_pp >= kth


def hc_row_terms(scores_pp: torch.Tensor, src: torch.Tensor, form: str = "infonce") -> torch.Tensor:
    """``[..., M, M]`` fp32 patch-to-patch logits -> ``[..., M, 2]`` row terms whose difference
    (column 0 − column 1) is a query's HC loss: column 0 the lse over k≠q; column 1 the lse over its
    same-source keys (``infonce``: one positive set, the fused kernel's form) or their mean logit
    (``supcon``: −log-softmax averaged over each positive, so every same-source key is pulled up)."""
    M = scores_pp.shape[-1]
    eye = torch.eye(M, dtype=torch.bool, device=scores_pp.device)
    same = (src[:, None] == src[None, :]) & ~eye
    neg_inf = torch.finfo(scores_pp.dtype).min
    lse_all = scores_pp.masked_fill(eye, neg_inf).logsumexp(dim=-1)
    if form == "infonce":
        pos = scores_pp.masked_fill(~same, neg_inf).logsumexp(dim=-1)
    elif form == "supcon":
        pos = scores_pp.masked_fill(~same, 0.0).sum(dim=-1) / same.sum(dim=-1).to(scores_pp.dtype)
    else:
        raise ValueError(f"hc_row_terms: form={form!r} is not infonce or supcon")
    return torch.stack([lse_all, pos], dim=-1)


def qk_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention logits ``q·kᵀ/√d`` in fp32, rounded as every reference path rounds them (the fp32
    matmul, then the scale): the one place the score formula is written."""
    return (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5


def homologous_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor,
                                   topk: int, hc: bool = False, hc_heads: int | None = None):
    """Eager TopK homologous attention in fp32 (the definition every fast path is tested against); the HC
    rows of the first ``hc_heads`` heads (None: all)."""
    s = qk_scores(q, k)                                                 # [G, H, L, L] fp32
    s_pp = s[..., 1:, 1:]
    keep = topk_keep_mask(s_pp, topk)
    patch_rows = torch.cat([s[..., 1:, :1], s_pp.masked_fill(~keep, float("-inf"))], dim=-1)
    logits = torch.cat([s[..., :1, :], patch_rows], dim=-2)
    out = (logits.softmax(dim=-1) @ v.float()).to(q.dtype)
    hc_rows = hc_row_terms(s_pp[:, :_hc_count(q.shape[1], hc, hc_heads)], src) if hc else None
    return out, hc_rows


# -- Triton ----------------------------------------------------------------------------------------
# the lowest ordered key (a NaN's bit pattern, below every score's): the select's start when fewer than K
# scores are >= 0
INT_MIN = tl.constexpr(-2147483648) if tl is not None else None


@triton.jit
def _mm(a, b, FP32: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``FP32``: operands in IEEE fp32 (fp32 inputs, interpreter)."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _fp32(x):
    """A scalar argument as fp32 whatever Triton was handed (a float64 from inductor, a Python float)."""
    return tl.full([], x, tl.float32)


@triton.jit
def _load_tile(ptr, g, h, s_g, s_h, s_l, idx, dd, L, D):
    """Rows ``idx`` x channels ``dd`` of a ``[G, H, L, d]`` tensor (head ``g, h``), zeros outside."""
    return tl.load(ptr + g * s_g + h * s_h + idx[:, None] * s_l + dd[None, :],
                   mask=(idx < L)[:, None] & (dd < D)[None, :], other=0.0)


@triton.jit
def _score_of(key):
    """The fp32 score whose ordered bit pattern is ``key`` (the map from scores to keys is the same)."""
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest_radix(s, K):
    """``s: fp32 [BM, BN]`` (-inf where not a candidate) -> the K-th largest per row, exactly, in 32 fixed steps.

    A radix search over the scores' ordered bit patterns (``key``: the bits, the lower 31 flipped for
    negative scores, so keys order as the scores do): the largest key ``t`` with ``count(s >= score_of(t))
    >= K``, the sign bit first, then bits 30..0 greedily (with the sign fixed, setting a lower bit raises
    a two's-complement value). Each step counts by comparing the *scores* with the candidate turned back
    into a score, which orders as the keys do for every candidate the search visits while the K-th score
    is finite; -0 and +0 compare equal, as in the reference's ``>=``. :func:`_kth_largest_score`'s
    fallback (and the bench's ``radix-select`` rows)."""
    t = tl.where(tl.sum(tl.where(s >= 0.0, 1.0, 0.0), axis=1) >= K, 0, INT_MIN)
    for i in tl.static_range(31):
        cand = t | (1 << (30 - i))
        count = tl.sum(tl.where(s >= _score_of(cand)[:, None], 1.0, 0.0), axis=1)
        t = tl.where(count >= K, cand, t)
    return _score_of(t)


@triton.jit
def _float_below(x):
    """The largest fp32 value below ``x`` (``x`` finite or +inf, not NaN; below ±0: the negative denormal)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x > 0, bits - 1, tl.where(x < 0, bits + 1, -2147483647))   # -2147483647: 0x80000001
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest_score(s, cand, K, MAX_PASSES: tl.constexpr, FALLBACK: tl.constexpr = True):
    """``s: fp32 [BM, BN]``, ``cand``: the candidate keys (``[1, BN]`` or ``[BM, BN]``; -inf in ``s``
    elsewhere) -> the K-th largest candidate score per row, exactly, in a few passes over the row.

    A bracket ``lo <= v_K <= hi`` whose ends are both scores of the row, with ``count(s >= lo) >= K >
    count(s > hi)`` (``lo``: the row's minimum, ``hi`` its maximum, to start). Each pass probes a value
    ``x`` in ``[lo, hi)`` (interpolated from the two counts: where the K-th of the bracket's elements
    would sit were they evenly spread; the float just below ``hi`` where that rounds onto ``hi``, ``lo``
    itself where it rounds onto ``lo``) and with one compare per key counts ``c = count(s > x)``, the
    least score above ``x`` and the greatest at or below it. ``c >= K``: v_K is above ``x``, so ``lo``
    moves up to that least score (``count(s >= lo) = c``); else ``hi`` moves down to that greatest score.
    Each pass moves an end past at least one score. A row is settled, with ``v_K = lo``, once
    ``count(s >= lo) == K`` (exactly K scores at or above an element) or ``lo == hi`` (the ends met on
    one value: ties at the K-th value, all kept as the reference keeps them). On 196-key rows of six score
    distributions (``benchmarks/select_passes.py``, the same algorithm in PyTorch): 2-9 passes a row on
    average, a 64-row program waiting 2-12 for its slowest. Rows still open after ``MAX_PASSES`` (never
    seen) are finished by :func:`_kth_largest_radix` (32 fixed steps): exact either way. Only compares
    decide (no rounding of the interpolation can change the result); fp32 compares keep denormals."""
    INF: tl.constexpr = float("inf")
    cand = tl.broadcast_to(cand, s.shape)
    lo = tl.min(tl.where(cand, s, INF), axis=1)
    hi = tl.max(tl.where(cand, s, -INF), axis=1)
    c_lo = tl.sum(tl.where(cand, 1.0, 0.0), axis=1)          # count(s >= lo): every candidate
    g_hi = tl.zeros_like(c_lo)                                 # count(s > hi)
    k = tl.full([], K, tl.float32)
    open_rows = tl.sum(tl.where((c_lo != k) & (lo != hi), 1, 0), axis=0)
    passes = 0
    while (open_rows > 0) & (passes < MAX_PASSES):
        f = (c_lo - k - 0.5) / tl.maximum(c_lo - g_hi - 1.0, 1.0)   # < 0 on settled rows: the guard takes lo
        x = lo + (hi - lo) * f
        x = tl.where(x < hi, x, _float_below(hi))    # rounded up onto hi: the float just below it
        x = tl.where(x > lo, x, lo)                  # down onto lo (or settled): probe lo itself
        above = s > x[:, None]
        c = tl.sum(tl.where(above, 1.0, 0.0), axis=1)
        least_above = tl.min(tl.where(above, s, INF), axis=1)
        most_below = tl.max(tl.where(above, -INF, s), axis=1)
        up = c >= k
        lo = tl.where(up, least_above, lo)
        c_lo = tl.where(up, c, c_lo)
        hi = tl.where(up, hi, most_below)
        g_hi = tl.where(up, g_hi, c)
        open_rows = tl.sum(tl.where((c_lo != k) & (lo != hi), 1, 0), axis=0)
        passes += 1
    if FALLBACK:   # off only in a test that checks the search settles every row by itself
        if open_rows > 0:
            lo = tl.where((c_lo != k) & (lo != hi), _kth_largest_radix(s, K), lo)
    return lo


@triton.jit
def _hc_lse(s, mask):
    """Row log-sum-exp of ``s`` over ``mask``; the fp32 minimum for an empty set (as the reference)."""
    m = tl.max(tl.where(mask, s, float("-inf")), axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.where(mask, tl.exp(s - m[:, None]), 0.0), axis=1)   # no masked copy of s kept live
    return tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), -3.4028234663852886e38)


@triton.jit
def _hc_masks(src_ptr, rows, cols, L):
    """(k ≠ q over patch keys, same source k ≠ q) for patch query rows, both ``[BM, BN]``."""
    row_patch = (rows >= 1) & (rows < L)
    col_patch = (cols >= 1) & (cols < L)
    other = row_patch[:, None] & col_patch[None, :] & (rows[:, None] != cols[None, :])
    src_r = tl.load(src_ptr + rows - 1, mask=row_patch, other=-1)
    src_c = tl.load(src_ptr + cols - 1, mask=col_patch, other=-2)
    return other, other & (src_r[:, None] == src_c[None, :])


@triton.jit
def _keep_bits(bits_ptr, bh, rows, cols, col0, L, WORDS: tl.constexpr):
    """The forward's keep mask for ``rows x cols`` from its bit words (False outside the sequence):
    ``cols = col0 + arange`` is a run of whole words (``col0`` a multiple of 32), loaded a word at a time
    and spread to its 32 keys in registers."""
    BM: tl.constexpr = rows.shape[0]
    BN: tl.constexpr = cols.shape[0]
    words = col0 // 32 + tl.arange(0, BN // 32)
    w = tl.load(bits_ptr + (bh * L + rows)[:, None] * WORDS + words[None, :],
                mask=(rows < L)[:, None] & (words < WORDS)[None, :], other=0)
    w = tl.reshape(tl.broadcast_to(w[:, :, None], [BM, BN // 32, 32]), [BM, BN])
    return ((w >> (cols % 32)[None, :]) & 1) != 0


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, src_ptr, o_ptr, lse_ptr, hc_ptr, bits_ptr,
                sqg, sqh, sql, skg, skh, skl, svg, svh, svl, H, L, D, TOPK, HC_HEADS, scale,
                HC: tl.constexpr, FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, SELECT: tl.constexpr, MAX_PASSES: tl.constexpr,
                FALLBACK: tl.constexpr = True):
    """One program: group·head ``bh`` (axis 0) x ``BLOCK_M`` query rows (axis 1), all keys at once.
    ``SELECT``: 2 the bracketing search (:func:`_kth_largest_score`), 1 the 32-step radix search, 0 every
    patch key kept (no TopK: an ablation that times the select, never trained)."""
    bh = tl.program_id(0).to(tl.int64)
    g, h = bh // H, bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    d_ok = (dd < D)[None, :]
    q = _load_tile(q_ptr, g, h, sqg, sqh, sql, rows, dd, L, D)
    k = _load_tile(k_ptr, g, h, skg, skh, skl, cols, dd, L, D)
    v = _load_tile(v_ptr, g, h, svg, svh, svl, cols, dd, L, D)
    s = _mm(q, tl.trans(k), FP32) * _fp32(scale)       # [BM, BN] fp32, the reference's rounding
    row_ok = rows < L
    if HC:  # first: its masks and exps are dead before the select, which keeps only the scores live
        if h < HC_HEADS:  # the heads the loss reads (a whole program skips it: no divergence)
            other, same = _hc_masks(src_ptr, rows, cols, L)
            hc_row = ((g * HC_HEADS + h) * (L - 1) + rows - 1) * 2
            patch = (rows >= 1) & row_ok
            tl.store(hc_ptr + hc_row, _hc_lse(s, other), mask=patch)
            tl.store(hc_ptr + hc_row + 1, _hc_lse(s, same), mask=patch)
    s_cls = tl.sum(tl.where((cols == 0)[None, :], s, 0.0), axis=1)   # the CLS key's score, kept aside
    cand = ((cols >= 1) & (cols < L))[None, :]
    s = tl.where(cand, s, float("-inf"))   # the patch keys only
    if SELECT == 2:
        keep = (s >= _kth_largest_score(s, cand, TOPK, MAX_PASSES, FALLBACK)[:, None]) | (cols == 0)[None, :]
    elif SELECT == 1:
        keep = (s >= _kth_largest_radix(s, TOPK)[:, None]) | (cols == 0)[None, :]
    else:
        keep = (cols < L)[None, :] & (rows >= 0)[:, None]
    keep = tl.where((rows == 0)[:, None], (cols < L)[None, :], keep)   # the CLS query sees every key
    WORDS: tl.constexpr = BLOCK_N // 32
    packed = tl.sum(tl.reshape(keep.to(tl.int32), [BLOCK_M, WORDS, 32]) << tl.arange(0, 32)[None, None, :], axis=2)
    tl.store(bits_ptr + (bh * L + rows)[:, None] * WORDS + tl.arange(0, WORDS)[None, :], packed,
             mask=row_ok[:, None])
    s = tl.where((cols == 0)[None, :], s_cls[:, None], s)     # the CLS column back
    m = tl.max(tl.where(keep, s, float("-inf")), axis=1)      # finite: the CLS key is always kept
    p = tl.where(keep, tl.exp(s - m[:, None]), 0.0)
    total = tl.sum(p, axis=1)
    if FP32:
        acc = _mm(p, v, FP32)
    else:
        acc = _mm(p.to(v.dtype), v, FP32)
    out = acc / total[:, None]
    tl.store(o_ptr + (bh * L + rows)[:, None] * D + dd[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok)
    tl.store(lse_ptr + bh * L + rows, m + tl.log(total), mask=row_ok)
@triton.jit
def _grad_scores(q, k, v, do, lse, delta, src_ptr, hc_ptr, ghc_ptr, bits_ptr, bh, g, h, rows, cols, col0, L, HC_HEADS,
                 scale, HC: tl.constexpr, FP32: tl.constexpr, WORDS: tl.constexpr):
    """``(P, dS)`` of a ``rows x cols`` tile: P from the saved LSE and the forward's keep bits, dS
    through the softmax plus, with ``HC`` and in the first ``HC_HEADS`` heads, through the two HC
    log-sum-exps (dS is w.r.t. the scaled logits; the caller multiplies by ``scale``)."""
    s = _mm(q, tl.trans(k), FP32) * _fp32(scale)
    keep = _keep_bits(bits_ptr, bh, rows, cols, col0, L, WORDS)
    p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
    dp = _mm(do, tl.trans(v), FP32)
    ds = p * (dp - delta[:, None])
    if HC:
        if h < HC_HEADS:
            other, same = _hc_masks(src_ptr, rows, cols, L)
            patch = (rows >= 1) & (rows < L)
            hc_row = ((g * HC_HEADS + h) * (L - 1) + rows - 1) * 2
            lse0 = tl.load(hc_ptr + hc_row, mask=patch, other=0.0)
            lse1 = tl.load(hc_ptr + hc_row + 1, mask=patch, other=0.0)
            g0 = tl.load(ghc_ptr + hc_row, mask=patch, other=0.0)
            g1 = tl.load(ghc_ptr + hc_row + 1, mask=patch, other=0.0)
            ds += tl.where(other, g0[:, None] * tl.exp(s - lse0[:, None]), 0.0)
            ds += tl.where(same, g1[:, None] * tl.exp(s - lse1[:, None]), 0.0)
    return p, ds


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, src_ptr, hc_ptr, ghc_ptr, bits_ptr, dq_ptr, dk_ptr, dv_ptr,
                dqacc_ptr, sqg, sqh, sql, skg, skh, skl, svg, svh, svl, sdg, sdh, sdl, H, L, D, HC_HEADS, scale,
                HC: tl.constexpr, FP32: tl.constexpr, M_BLOCKS: tl.constexpr, N_BLOCKS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WORDS: tl.constexpr):
    """The whole backward of one group·head ``bh`` in one program (flash-attention style, no atomics).

    For each key block in order (``N_BLOCKS`` of ``BLOCK_N`` keys, their dK and dV in registers), for
    each query block (``M_BLOCKS`` of ``BLOCK_M`` rows): S and dP once; Δ = rowsum(dO∘O) from the block's
    dO and O (no pass before); P from the saved LSE and the forward's keep bits; dS (plus the HC terms
    in the loss's heads); dV += Pᵀ dO, dK += dSᵀ Q, and the block's share of dQ = dS K, summed over the
    key blocks in their fixed order in an fp32 scratch row of this program's own (``dqacc``; the last
    key block adds its share and writes dQ). One program owns every key and query of its head, so the
    sums run in one order whatever the scheduling: bitwise reproducible."""
    bh = tl.program_id(0).to(tl.int64)
    g, h = bh // H, bh % H
    dd = tl.arange(0, BLOCK_D)
    d_ok = (dd < D)[None, :]
    for j in tl.static_range(N_BLOCKS):
        cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, g, h, skg, skh, skl, cols, dd, L, D)
        v = _load_tile(v_ptr, g, h, svg, svh, svl, cols, dd, L, D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for i in range(M_BLOCKS):  # constexpr trip count: the interpreter rejects runtime ones
            rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
            r_ok = rows < L
            q = _load_tile(q_ptr, g, h, sqg, sqh, sql, rows, dd, L, D)
            do = _load_tile(do_ptr, g, h, sdg, sdh, sdl, rows, dd, L, D)
            o = tl.load(o_ptr + (bh * L + rows)[:, None] * D + dd[None, :], mask=r_ok[:, None] & d_ok, other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            lse = tl.load(lse_ptr + bh * L + rows, mask=r_ok, other=0.0)
            p, ds = _grad_scores(q, k, v, do, lse, delta, src_ptr, hc_ptr, ghc_ptr, bits_ptr, bh, g, h, rows, cols,
                                 j * BLOCK_N, L, HC_HEADS, scale, HC, FP32, WORDS)
            if FP32:
                dv += _mm(tl.trans(p), do, FP32)
                dk += _mm(tl.trans(ds), q, FP32)
                dq = _mm(ds, k, FP32)
            else:
                dv += _mm(tl.trans(p.to(do.dtype)), do, FP32)
                dk += _mm(tl.trans(ds.to(q.dtype)), q, FP32)
                dq = _mm(ds.to(k.dtype), k, FP32)
            acc = dqacc_ptr + (bh * M_BLOCKS * BLOCK_M + rows)[:, None] * BLOCK_D + dd[None, :]
            if j > 0:
                dq += tl.load(acc, cache_modifier=".cg")
            if j == N_BLOCKS - 1:
                tl.store(dq_ptr + (bh * L + rows)[:, None] * D + dd[None, :],
                         (dq * _fp32(scale)).to(dq_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok)
            else:
                tl.store(acc, dq)
        out = (bh * L + cols)[:, None] * D + dd[None, :]
        c_ok = (cols < L)[:, None] & d_ok
        tl.store(dk_ptr + out, (dk * _fp32(scale)).to(dk_ptr.dtype.element_ty), mask=c_ok)
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=c_ok)
        tl.debug_barrier()  # this key block's dQ shares are in dqacc before any thread reads them


def _strides(t: torch.Tensor):
    """``(t, its G, H, L strides)``; a copy only when the last dimension is not unit-stride."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1), t.stride(2)


def _check(q, k, v, src, topk):
    G, H, L, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [G, H, L, d]: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not 2 <= L <= MAX_SEQ or d > 128:
        raise ValueError(f"the fused TopK kernel takes 2 <= L <= {MAX_SEQ} tokens and head_dim <= 128, got "
                         f"L={L}, d={d}: use attention_backend=flex, sdpa or eager")
    if src.numel() != L - 1 or not 1 <= topk <= L - 1:
        raise ValueError(f"src has {src.numel()} entries and topk={topk}; need L-1 = {L - 1} and 1 <= topk <= L-1")
    return G, H, L, d


def _blocks(L: int, d: int):
    """(BLOCK_N, BLOCK_D) of the forward: every key in one power-of-two tile of >= 32 (whole bit words),
    the head dim padded to a power of two >= 16."""
    return max(32, triton.next_power_of_2(L)), max(16, triton.next_power_of_2(d))


NUM_WARPS = 8

# The tilings (mixedae_fast/measured.py: FWD_TILINGS, BWD_TILINGS, and which one a card runs), lowered for
# sm_90 at L = 197, d = 64 bf16 (``python -m mixedae_fast.benchmarks.kernel_sass``; docs/kernel_notes.md
# has the figures). The forward's, (query rows a program, warps):
#   m32w8   Triton's mma v2 layout puts the 8 warps side by side along the 256 keys, so every row
#           reduction of the select crosses warps through shared memory
#   m64w4   one warpgroup of wgmma: each warp owns 16 whole rows, a row reduction stays inside its warp
#   m128w8  two warpgroups, the same per warp
# The backward's, (keys a key block, query rows a block, warps, pipeline stages): one program a
# group·head walks its key blocks, each over every query block. More keys a block: fewer fp32 dQ shares
# through the scratch row (one key block: none) but larger dK/dV accumulators in registers. These spill no
# register but n256m16w16 (124 bytes); 64-row query blocks spilled 0.4-2.7 KB at every key block and warp
# count tried. fp32 compiled (IEEE dots, no tensor cores) takes BWD_FP32 whatever the card.
BWD_FP32 = (64, 16, 8, 1)
MAX_PASSES = 24  # the search's passes before the radix search finishes the rows still open (none seen past 14)
SEARCH_FALLBACK = True  # False: no radix finish (a test checks the search alone settles every row in MAX_PASSES)


def forward_tiling(q: torch.Tensor, interpreted: bool) -> tuple[int, int]:
    """(query rows, warps) of the forward for ``q``: fp32 compiled (IEEE dots) 16 rows on 8 warps; else
    the tiling :func:`mixedae_fast.measured.tiling` names (the card's, or a benchmark's variant)."""
    if q.dtype == torch.float32 and not interpreted:
        return 16, NUM_WARPS
    return FWD_TILINGS[tiling(q.device)]


def backward_tiling(q: torch.Tensor, interpreted: bool) -> tuple[int, int, int, int]:
    """(keys a key block, query rows a block, warps, stages) of the backward for ``q``: :data:`BWD_FP32` for fp32
    compiled; else the backward tiling :func:`mixedae_fast.measured.tiling` names."""
    if q.dtype == torch.float32 and not interpreted:
        return BWD_FP32
    return BWD_TILINGS[tiling(q.device, "triton_bwd_tiling")]


def _scale(d: int) -> float:
    """The softmax scale rounded to fp32 as the reference applies it (``fp32 scores * d**-0.5``). The
    kernels also cast it to fp32 themselves: a caller that hands Triton a float64 (inductor did) must
    not turn the scores into fp64, which the bit-pattern select cannot take."""
    return float(torch.tensor(d ** -0.5, dtype=torch.float32))


def _hc_count(H: int, hc: bool, hc_heads: int | None) -> int:
    """How many heads (the first ones) the HC rows are made for: 0 without HC, else ``hc_heads`` (None: all)."""
    if not hc:
        return 0
    if hc_heads is not None and not 1 <= hc_heads <= H:
        raise ValueError(f"hc_heads={hc_heads}: need 1 <= hc_heads <= {H} heads, or None (all)")
    return H if hc_heads is None else hc_heads


def homologous_attention_forward(q, k, v, src, topk: int, hc_heads: int):
    """``(out [G,H,L,d], lse fp32 [G*H, L], hc fp32 [G*hc_heads, L-1, 2] | None, bits int32 [G*H, L, L/32])``;
    HC rows for the first ``hc_heads`` heads (0: none)."""
    G, H, L, d = _check(q, k, v, src, topk)
    interpreted = _interpreted(_fwd_kernel)
    block_n, block_d = _blocks(L, d)
    block_m, num_warps = forward_tiling(q, interpreted)
    (q, *sq), (k, *sk), (v, *sv) = _strides(q), _strides(k), _strides(v)
    dev = q.device
    src = src.to(device=dev, dtype=torch.int32).contiguous()
    out = torch.empty(G, H, L, d, dtype=_buffer_dtype(q.dtype, _fwd_kernel), device=dev)
    lse = torch.empty(G * H, L, dtype=torch.float32, device=dev)
    hc_rows = torch.empty(G * hc_heads, L - 1, 2, dtype=torch.float32, device=dev) if hc_heads else lse
    bits = torch.empty(G * H, L, block_n // 32, dtype=torch.int32, device=dev)
    grid = (G * H, triton.cdiv(L, block_m))
    _fwd_kernel[grid](q, k, v, src, out, lse, hc_rows, bits, *sq, *sk, *sv, H, L, d, topk, hc_heads, _scale(d),
                      HC=hc_heads > 0, FP32=q.dtype == torch.float32 or interpreted, BLOCK_M=block_m,
                      BLOCK_N=block_n, BLOCK_D=block_d, SELECT=select(), MAX_PASSES=MAX_PASSES,
                      FALLBACK=SEARCH_FALLBACK, num_warps=num_warps)
    return out.to(q.dtype), lse, hc_rows if hc_heads else None, bits


def backward_stages(do, q, k, v, out, src, lse, hc_rows, grad_hc, bits):
    """The backward as named stages ``[(name, run)]`` and the ``(dq, dk, dv)`` buffers they fill, run in
    order: one, ``backward`` (:func:`_bwd_kernel`, Δ inside). :func:`homologous_attention_backward` runs
    them; ``bench_attention --parts`` times each alone."""
    G, H, L, d = q.shape
    interpreted = _interpreted(_bwd_kernel)
    _, block_d = _blocks(L, d)
    block_n, block_m, num_warps, num_stages = backward_tiling(q, interpreted)
    words = _blocks(L, d)[0] // 32
    (q, *sq), (k, *sk), (v, *sv), (do, *sd) = _strides(q), _strides(k), _strides(v), _strides(do)
    out = out.contiguous()
    dev = q.device
    hc = grad_hc is not None
    hc_heads = grad_hc.shape[0] // G if hc else 0
    ghc = grad_hc.float().contiguous() if hc else lse
    hc_rows = hc_rows if hc else lse
    src = src.to(device=dev, dtype=torch.int32).contiguous()
    buf = _buffer_dtype(q.dtype, _bwd_kernel)
    dq, dk, dv = (torch.empty(G, H, L, d, dtype=buf, device=dev) for _ in range(3))
    m_blocks, n_blocks = triton.cdiv(L, block_m), triton.cdiv(L, block_n)
    # each program's dQ shares between key blocks (fp32, its own rows); none with one key block
    dqacc = torch.empty(G * H, m_blocks * block_m, block_d, dtype=torch.float32, device=dev) if n_blocks > 1 else lse

    def run():
        _bwd_kernel[(G * H,)](
            q, k, v, out, do, lse, src, hc_rows, ghc, bits, dq, dk, dv, dqacc, *sq, *sk, *sv, *sd, H, L, d, hc_heads,
            _scale(d), HC=hc, FP32=q.dtype == torch.float32 or interpreted, M_BLOCKS=m_blocks, N_BLOCKS=n_blocks,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, WORDS=words, num_warps=num_warps,
            num_stages=num_stages)

    return [("backward", run)], (dq, dk, dv)


def homologous_attention_backward(do, q, k, v, out, src, lse, hc_rows, grad_hc, bits):
    """``(dq, dk, dv)`` in q's dtype; ``grad_hc`` (``[G*hc_heads, L-1, 2]`` or None) is the HC rows' gradient."""
    stages, grads = backward_stages(do, q, k, v, out, src, lse, hc_rows, grad_hc, bits)
    for _, run in stages:
        run()
    return tuple(g.to(q.dtype) for g in grads)


# The fused kernels as torch.library custom ops with an autograd formula: torch.compile keeps them
# opaque (inductor never traces into the Triton source; shapes come from the fake implementations),
# so a training step with them compiles as one graph. The signatures hold tensors, ints and bools only:
# the softmax scale is derived from d inside, never a Python float that dynamo could specialise.
@torch.library.custom_op("mixedae_fast::homologous_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, topk: int,
                  hc_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, hc_rows, bits = homologous_attention_forward(q, k, v, src, topk, hc_heads)
    return out, lse, lse.new_empty(0) if hc_rows is None else hc_rows, bits


@_attention_op.register_fake
def _(q, k, v, src, topk, hc_heads):
    G, H, L, d = _check(q, k, v, src, topk)
    block_n = _blocks(L, d)[0]
    lse = q.new_empty(G * H, L, dtype=torch.float32)
    hc_rows = q.new_empty(G * hc_heads, L - 1, 2, dtype=torch.float32) if hc_heads else \
        q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse, hc_rows, \
        q.new_empty(G * H, L, block_n // 32, dtype=torch.int32)


@torch.library.custom_op("mixedae_fast::homologous_attention_backward", mutates_args=())
def _attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           src: torch.Tensor, lse: torch.Tensor, hc_rows: torch.Tensor | None,
                           grad_hc: torch.Tensor | None, bits: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return homologous_attention_backward(do, q, k, v, out, src, lse, hc_rows, grad_hc, bits)


@_attention_backward_op.register_fake
def _(do, q, k, v, out, src, lse, hc_rows, grad_hc, bits):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, src, topk, hc_heads = inputs
    out, lse, hc_rows, bits = output
    ctx.hc_heads = hc_heads
    ctx.save_for_backward(q, k, v, out, src, lse, hc_rows, bits)
    ctx.mark_non_differentiable(lse, bits)


def _backward(ctx, grad_out, grad_lse, grad_hc, grad_bits):
    q, k, v, out, src, lse, hc_rows, bits = ctx.saved_tensors
    G, _, L, _ = q.shape
    hc = ctx.hc_heads > 0 and grad_hc is not None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, src, lse, hc_rows if hc else None,
                                        grad_hc.reshape(G * ctx.hc_heads, L - 1, 2) if hc else None, bits)
    return dq, dk, dv, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def homologous_attention_triton(q, k, v, src, topk: int, hc: bool = False, hc_heads: int | None = None):
    """:func:`homologous_attention_reference` through the fused kernels, forward and backward:
    ``(out, hc_rows [G, hc_heads, L-1, 2] | None)``; the heads past ``hc_heads`` (None: all) skip the HC
    terms in both passes. A custom op (``torch.ops.mixedae_fast.homologous_attention``):
    ``torch.compile`` keeps it whole. ``src`` and ``topk`` get no gradient."""
    G, H, L, _ = q.shape
    count = _hc_count(H, hc, hc_heads)
    out, _, hc_rows, _ = _attention_op(q, k, v, src, topk, count)
    return out, (hc_rows.view(G, count, L - 1, 2) if count else None)


def check_triton(device: torch.device, setting: str = "attention_backend='triton'") -> None:
    """Raise unless the fused kernel can run on ``device`` (``setting``: what asked for it, for the message)."""
    require_triton(setting, [device], "runtime.attention_backend=auto, sdpa or eager on CPU")


def homologous_attention(q, k, v, src, topk, hc=False, backend="auto", hc_heads=None):
    """The TopK op: ``triton`` = :func:`homologous_attention_triton`, anything else the reference
    (``mixedae_fast.model.attention`` routes the other backends)."""
    if backend == "triton":
        return homologous_attention_triton(q, k, v, src, topk, hc, hc_heads)
    return homologous_attention_reference(q, k, v, src, topk, hc, hc_heads)
