"""The homologous contrastive (HC) objective (docs/method.md §4): what the encoder must return for it,
and the loss from what it returned.

Built once from the mixing settings (:meth:`HCObjective.build`). It acts in up to two places:

- **on the attention** (``on`` = attention or both, TopK blocks, r > 1): per query of the first ``heads``
  heads, the row terms ``[lse over k != q, positive term]`` of its patch-to-patch logits, which every
  homologous block returns as a value (the fused kernel computes the InfoNCE form in its forward pass;
  the SupCon form comes from the block's own logits, :func:`mixedae_fast.model.attention.hc_rows_from_logits`). The loss
  is the mean of ``column 0 - column 1`` over queries, heads, then blocks.
- **on features** (``on`` = head, tokens or both, r > 1): a SupCon loss inside each group on the
  encoder's patch tokens, through a projection head for ``head`` / ``both``.

The model adds ``weight * loss`` to the reconstruction loss.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from mixedae_fast.choices import HC_FORMS, HC_ON, hc_flags, hc_ignored, hc_problems
from mixedae_fast.model.losses import hc_attention_loss, supcon_loss


@dataclass(frozen=True)
class HCObjective:
    weight: float = 1.0       # λ_hc; 0 turns the loss off
    on: str = "attention"     # attention | head | tokens | both
    form: str = "infonce"     # the attention form: infonce (one positive set) | supcon (every positive pulled up)
    heads: int | None = 1     # the attention form on heads 0 .. heads-1 (None: every head)
    tau: float = 0.2          # temperature of the features' SupCon loss
    attention: bool = False   # acts on the attention logits (derived by build)
    features: bool = False    # acts on the tokens / projection head (derived by build)

    @classmethod
    def build(cls, weight: float, on: str, form: str, heads: int | None, tau: float, *, group_size: int,
              n_visible: int, ha: str, ha_layers: tuple[int, ...], num_heads: int, warn: bool = True) -> HCObjective:
        """The objective these settings describe; a ValueError for a setting outside its range, a warning
        (with ``warn``) when the loss is asked for where it cannot act (e.g. ``ha=none``). The rules are
        :mod:`mixedae_fast.choices`' (the config checks the same ones at load): a model built from Python
        without a config gets the same answer."""
        for name, value, allowed in (("hc_on", on, HC_ON), ("hc_form", form, HC_FORMS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        problems = hc_problems(weight, group_size, on, ha, ha_layers, heads, num_heads, n_visible)
        if problems:
            raise ValueError("; ".join(f"{name}={value!r}: {why}" for name, (value, why) in problems.items()))
        attention, features = hc_flags(weight, group_size, on, ha, ha_layers)
        ignored = hc_ignored(weight, group_size, on, ha, ha_layers)
        if ignored and warn:
            warnings.warn(f"hc_weight = {weight} partly or wholly ignored: {'; '.join(ignored)} (got ha={ha}, "
                          f"group_size={group_size})", stacklevel=3)
        return cls(weight, on, form, heads, tau, attention, features)

    @property
    def active(self) -> bool:
        return self.attention or self.features

    def projection_head(self, embed_dim: int) -> nn.Module | None:
        """The features' projection head (``on`` = head or both), else None."""
        if not (self.features and self.on in ("head", "both")):
            return None
        return nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, 128))

    def loss(self, hc_rows, tokens: torch.Tensor, src: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """The unweighted loss (an fp32 zero when inactive) from the homologous blocks' row terms
        ``hc_rows`` (a sequence of ``[G, heads, M, 2]``) and the encoder's patch tokens ``[G, M, D]`` whose
        sources are ``src [M]``."""
        parts = []
        if self.attention:
            parts.append(hc_attention_loss(list(hc_rows), self.heads))
        if self.features:
            parts.append(supcon_loss(head(tokens) if head is not None else tokens, src, self.tau))
        return torch.stack(parts).sum() if parts else tokens.new_zeros((), dtype=torch.float32)
