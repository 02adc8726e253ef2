"""Losses (docs/method.md §4, §6): reconstruction and homologous contrastive, all in fp32."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mixedae_fast.choices import HC_FORMS, HC_ROW_FORMS


def reconstruction_loss(pred: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """MSE per patch (mean over its values), averaged over the positions not visible to their source.

    ``pred, targets: [B, N, 3P²]``; ``loss_mask: [B, N]`` bool, True = reconstruct.
    """
    per_patch = (pred.float() - targets.float()).pow(2).mean(dim=-1)
    mask = loss_mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()




def select_heads(t: torch.Tensor, heads: int | None) -> torch.Tensor:
    """The first ``heads`` heads of a per-head tensor ``[G, H, ...]`` (None = all). The HC loss on a
    subset leaves the other heads free to attend by content (on every head it pulls them all onto one
    "same source" pattern: their TopK sets coincide)."""
    return t if heads is None else t[:, :heads]


def hc_attention_loss(hc_rows: list[torch.Tensor], heads: int | None = None) -> torch.Tensor:
    """InfoNCE on the attention logits, from each block's ``[G, H, M, 2]`` row terms
    ``(lse over k != q, lse over same-source k != q)``: averaged over queries, heads (the first
    ``heads``; None = all), then blocks."""
    if not hc_rows:
        raise ValueError("hc_attention_loss needs the row terms of at least one homologous block")
    picked = [select_heads(rows, heads) for rows in hc_rows]
    return torch.stack([(rows[..., 0] - rows[..., 1]).mean() for rows in picked]).mean()


def hc_hinge_terms(scores_pp: torch.Tensor, src: torch.Tensor, margin: float) -> torch.Tensor:
    """Ranking form of the HC loss per query: ``[..., M, M]`` patch-to-patch logits -> ``[..., M]``.

    ``mean_{p in same(q), p != q} relu(margin - s_qp + max_{o in other(q)} s_qo)``: every same-source key
    is pushed above the best other-source key by ``margin`` and no further. It is zero exactly when a
    query's n−1 same-source keys are its n−1 best keys besides itself (by the margin), i.e. when TopK
    with K = n and the query itself kept selects only its own source; then it stops pulling on the
    logits, where InfoNCE keeps sharpening them (and the heads with them).
    """
    M = scores_pp.shape[-1]
    eye = torch.eye(M, dtype=torch.bool, device=scores_pp.device)
    same_src = src[:, None] == src[None, :]
    pos, other = same_src & ~eye, ~same_src
    if not bool(pos.any(dim=-1).all()) or not bool(other.any(dim=-1).all()):
        raise ValueError("hc_hinge_terms needs >= 2 tokens per source and >= 2 sources")
    hardest_other = scores_pp.masked_fill(~other, float("-inf")).amax(dim=-1, keepdim=True)
    violation = (margin - scores_pp + hardest_other).clamp_min(0).masked_fill(~pos, 0.0)
    return violation.sum(dim=-1) / pos.sum(dim=-1)


def hc_scores_loss(scores: list[torch.Tensor], src: torch.Tensor, form: str = "infonce", margin: float = 1.0,
                   heads: int | None = None) -> torch.Tensor:
    """The HC loss from each homologous block's fp32 patch-to-patch logits ``[G, H, M, M]`` (the
    reference path, for forms the fused kernel's row terms do not give): ``infonce`` (the same loss as
    :func:`hc_attention_loss`), ``supcon`` (the per-positive form, :func:`hc_row_terms`) or ``hinge``
    (:func:`hc_hinge_terms`), averaged over queries, the first ``heads`` heads, then blocks."""
    from mixedae_fast.kernels.homologous_attention import hc_row_terms

    if form not in HC_FORMS:
        raise ValueError(f"hc_form={form!r} is not one of {', '.join(HC_FORMS)}")
    if not scores:
        raise ValueError("hc_scores_loss needs the logits of at least one homologous block")
    per_block = []
    for s in scores:
        s = select_heads(s.to(torch.promote_types(s.dtype, torch.float32)), heads)
        if form in HC_ROW_FORMS:
            rows = hc_row_terms(s, src, form)
            per_block.append((rows[..., 0] - rows[..., 1]).mean())
        else:
            per_block.append(hc_hinge_terms(s, src, margin).mean())
    return torch.stack(per_block).mean()


def supcon_loss(features: torch.Tensor, src: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised-contrastive loss inside each group: ``features [G, M, C]`` (normalised here),
    ``src [M]`` the source of each token; positives = same source, negatives = the rest of the group.

    Per anchor ``a``: ``-mean_{p in pos(a)} log( exp(z_a·z_p/τ) / Σ_{k≠a} exp(z_a·z_k/τ) )``.
    """
    z = F.normalize(features.float(), dim=-1)
    M = z.shape[1]
    eye = torch.eye(M, dtype=torch.bool, device=z.device)
    pos = (src[:, None] == src[None, :]) & ~eye
    if not bool(pos.any(dim=-1).all()):
        raise ValueError("supcon_loss needs at least two tokens per source")
    logits = (z @ z.transpose(-2, -1) / tau).masked_fill(eye, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=-1, keepdim=True)
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(dim=-1) / pos.sum(dim=-1)
    return per_anchor.mean()
