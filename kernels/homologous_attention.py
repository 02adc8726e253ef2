"""TopK homologous attention (the paper's homologous *recognition*) and the HC loss's row terms.

Contract (DESIGN §1 steps 3-4). ``q, k, v: [G, H, L, d]`` with ``L = 1 + r*n``: token 0 is the
group CLS, then the patch tokens; ``src: int [L-1]`` the source of each patch token. Scores
``s = q·kᵀ/√d``, the selection made on fp32 scores:

* a patch query keeps the ``K`` highest-scoring *patch* keys (ties at the K-th value kept) and the
  CLS key; the others get −inf before the softmax. The selection is not differentiated.
* the CLS query attends to every key.

With ``hc=True`` it also returns ``hc_rows: fp32 [G, H, L-1, 2]``, per patch query ``q`` the two
log-sum-exps of the homologous contrastive loss over the *full* (pre-TopK) patch logits::

    hc_rows[..., 0] = logsumexp_{k != q}            s_qk     # all of the group's patch keys but q
    hc_rows[..., 1] = logsumexp_{k != q, src_k = src_q} s_qk  # its same-source keys
    L_hc = mean(hc_rows[..., 0] - hc_rows[..., 1])

whose gradient flows in the same backward. Returns ``(out [G, H, L, d] in q's dtype, hc_rows | None)``.
"""
from __future__ import annotations

import torch


def topk_keep_mask(scores_pp: torch.Tensor, topk: int) -> torch.Tensor:
    """``[..., M, M]`` patch-to-patch fp32 scores -> bool keep mask (K-th value ties kept)."""
    with torch.no_grad():
        kth = scores_pp.topk(topk, dim=-1).values[..., -1:]
        return scores_pp >= kth


def hc_row_terms(scores_pp: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``[..., M, M]`` fp32 patch-to-patch logits -> ``[..., M, 2]`` (lse over k≠q, lse over same source)."""
    M = scores_pp.shape[-1]
    eye = torch.eye(M, dtype=torch.bool, device=scores_pp.device)
    same = (src[:, None] == src[None, :]) & ~eye
    neg_inf = torch.finfo(scores_pp.dtype).min
    lse_all = scores_pp.masked_fill(eye, neg_inf).logsumexp(dim=-1)
    lse_pos = scores_pp.masked_fill(~same, neg_inf).logsumexp(dim=-1)
    return torch.stack([lse_all, lse_pos], dim=-1)


def homologous_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor,
                                   topk: int, hc: bool = False):
    """Eager TopK homologous attention in fp32 (the definition every fast path is tested against)."""
    d = q.shape[-1]
    s = (q.float() @ k.float().transpose(-2, -1)) * d ** -0.5          # [G, H, L, L] fp32
    s_pp = s[..., 1:, 1:]
    keep = topk_keep_mask(s_pp, topk)
    patch_rows = torch.cat([s[..., 1:, :1], s_pp.masked_fill(~keep, float("-inf"))], dim=-1)
    logits = torch.cat([s[..., :1, :], patch_rows], dim=-2)
    out = (logits.softmax(dim=-1) @ v.float()).to(q.dtype)
    hc_rows = hc_row_terms(s_pp, src) if hc else None
    return out, hc_rows


def homologous_attention(q, k, v, src, topk, hc=False):
    """The op the model calls; today the reference (the fused Triton kernel drops in beside it)."""
    return homologous_attention_reference(q, k, v, src, topk, hc)
