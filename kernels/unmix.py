"""Unmix: the group's decoder-embedded encoder tokens -> one decoder input sequence per source.

Contract (DESIGN §1 step 5). ``dec_tokens: [G, 1 + r*n, D]`` (token 0 the group CLS, then source-
major patch tokens), ``ids: int [G, r*n]`` the assignment, ``mask_token: [D]`` (any shape that views
as ``[D]``), ``dec_pos: [1, N+1, D]`` the fixed decoder position embedding (row 0 for the CLS).
Returns ``[B, N+1, D]``, ``B = G*r``, in ``dec_tokens``' dtype::

    out[g*r + j, 0]          = dec_tokens[g, 0]                  + dec_pos[0, 0]
    out[g*r + j, 1 + p]      = dec_tokens[g, 1 + j*n + t]        + dec_pos[0, 1 + p]   where p = ids[g, j*n + t]
    out[g*r + j, 1 + p]      = mask_token                        + dec_pos[0, 1 + p]   elsewhere

Gradients reach ``dec_tokens`` (visible tokens, and the CLS summed over the group's r sources) and
``mask_token`` (summed over masked slots); the fixed ``dec_pos`` gets none.
"""
from __future__ import annotations

import torch


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


def unmix(dec_tokens, ids, mask_token, dec_pos, group_size):
    """The op the model calls; today the reference (the Triton path drops in beside it)."""
    return unmix_reference(dec_tokens, ids, mask_token, dec_pos, group_size)
