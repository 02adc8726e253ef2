"""Attention for the encoder and decoder blocks: global, oracle (per-source), TopK homologous.

The module keeps timm's ``Attention`` parameter names (``qkv``, ``proj``) so the encoder exports to a
timm ``VisionTransformer`` key for key. Which attention a block computes comes from the
:class:`MixLayout` the model hands it per forward; blocks outside ``ha_layers`` get ``None`` (global).

Backends (``runtime.attention_backend``): ``sdpa`` (torch's scaled_dot_product_attention) and
``eager`` (explicit softmax; the reference). ``auto`` is ``sdpa``. TopK always runs through
:func:`mixedae_fast.kernels.homologous_attention.homologous_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mixedae_fast.kernels.homologous_attention import homologous_attention, topk_keep_mask

BACKENDS = ("auto", "sdpa", "eager")
HA_MODES = ("topk", "oracle", "none")


@dataclass
class MixLayout:
    """What homologous attention needs to know about one forward's token layout.

    Tokens are ``[CLS, source 0's n tokens, ..., source r-1's n tokens]`` per group.
    ``hc_rows`` and ``stats`` collect one entry per homologous-attention block.
    """

    group_size: int
    n_visible: int
    mode: str = "topk"
    topk: int = 1
    hc: bool = False
    collect_stats: bool = False
    hc_rows: list = field(default_factory=list)
    stats: list = field(default_factory=list)

    def source_ids(self, device) -> torch.Tensor:
        return torch.arange(self.group_size, device=device).repeat_interleave(self.n_visible)


def global_attention(q, k, v, backend: str = "auto"):
    if backend == "eager":
        attn = ((q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return (attn @ v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def oracle_attention(q, k, v, group_size: int, n_visible: int, backend: str = "auto"):
    """Patch queries see their own source's keys and the CLS key; the CLS query sees all keys.

    Block-diagonal by construction: the patch rows reshape into ``G*r`` sequences of ``1 + n`` keys
    that share the CLS key/value; no dense mask is ever built.
    """
    G, H, L, d = q.shape
    r, n = group_size, n_visible
    cls_out = global_attention(q[:, :, :1], k, v, backend)                     # [G, H, 1, d]

    def per_source(t):  # [G, H, 1+r*n, d] -> [G, H, r, 1+n, d] with the CLS prepended to each source
        return torch.cat([t[:, :, None, :1].expand(G, H, r, 1, d), t[:, :, 1:].reshape(G, H, r, n, d)], dim=3)

    qp = q[:, :, 1:].reshape(G, H, r, n, d)
    patch_out = global_attention(qp, per_source(k), per_source(v), backend)    # [G, H, r, n, d]
    return torch.cat([cls_out, patch_out.reshape(G, H, r * n, d)], dim=2)


@torch.no_grad()
def topk_stats(q, k, v_unused, src: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    """Logged metrics of one TopK block (no host sync; scalars stay on the device).

    ``recognition``: among a query's kept patch keys other than itself, the fraction from its own
    source (chance ``(n-1)/(r*n-1)``). ``w_self / w_same / w_other / w_cls``: how the patch queries'
    attention weight splits between themselves, their source's other tokens, other sources, CLS.
    """
    d = q.shape[-1]
    s = (q.float() @ k.float().transpose(-2, -1)) * d ** -0.5
    s_pp = s[..., 1:, 1:]
    keep = topk_keep_mask(s_pp, topk)
    M = s_pp.shape[-1]
    eye = torch.eye(M, dtype=torch.bool, device=q.device)
    same = (src[:, None] == src[None, :]) & ~eye
    kept_other = keep & ~eye
    recognition = (kept_other & same).sum() / kept_other.sum().clamp_min(1)
    w = torch.cat([s[..., 1:, :1], s_pp.masked_fill(~keep, float("-inf"))], dim=-1).softmax(dim=-1)
    w_cls, w_pp = w[..., 0], w[..., 1:]
    return {
        "recognition": recognition,
        "w_self": (w_pp * eye).sum(-1).mean(),
        "w_same": (w_pp * same).sum(-1).mean(),
        "w_other": (w_pp * ~(same | eye)).sum(-1).mean(),
        "w_cls": w_cls.mean(),
    }


class HomologousAttention(nn.Module):
    """Multi-head self-attention whose pattern follows the :class:`MixLayout` (None = global)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, layout: MixLayout | None = None) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if layout is None or layout.mode == "none":
            out = global_attention(q, k, v, self.backend)
        elif layout.mode == "oracle":
            out = oracle_attention(q, k, v, layout.group_size, layout.n_visible, self.backend)
        elif layout.mode == "topk":
            src = layout.source_ids(x.device)
            out, hc_rows = homologous_attention(q, k, v, src, layout.topk, layout.hc)
            if hc_rows is not None:
                layout.hc_rows.append(hc_rows)
            if layout.collect_stats:
                layout.stats.append(topk_stats(q, k, v, src, layout.topk))
        else:
            raise ValueError(f"homologous attention mode {layout.mode!r} is not one of {HA_MODES}")
        return self.proj(out.transpose(1, 2).reshape(B, L, C))
