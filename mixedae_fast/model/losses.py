"""Losses (docs/method.md §4, §6): reconstruction and homologous contrastive, all in fp32."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """The HC loss on the attention logits from each block's ``[G, H, M, 2]`` row terms
    (:func:`~mixedae_fast.kernels.homologous_attention.hc_row_terms`: the lse over k != q, and the lse over
    the same-source keys (InfoNCE) or their mean logit (SupCon)): column 0 − column 1, averaged over
    queries, heads (the first ``heads``; None = all), then blocks."""
    if not hc_rows:
        raise ValueError("hc_attention_loss needs the row terms of at least one homologous block")
    picked = [select_heads(rows, heads) for rows in hc_rows]
    return torch.stack([(rows[..., 0] - rows[..., 1]).mean() for rows in picked]).mean()


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
