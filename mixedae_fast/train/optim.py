"""The optimiser and the schedule: MAE's weight-decay groups, fused AdamW (apex FusedAdam when asked for
and importable), and MAE's per-step lr (linear warm-up, half-cycle cosine to ``min_lr``)."""
from __future__ import annotations

import math

import torch

from mixedae_fast.config import Config
from mixedae_fast.errors import RunFailure


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """MAE's split: no weight decay on biases and other 1-D parameters (norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: Config, lr: float, device: torch.device):
    """apex ``FusedAdam`` (AdamW mode) when importable and asked for (auto/apex), else torch's fused
    AdamW. Returns ``(optimizer, supports_found_inf)``."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.optimizer in ("auto", "apex"):
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]

            return FusedAdam(groups, lr=lr, betas=tuple(o.betas), adam_w_mode=True), False
        except ImportError:
            if o.optimizer == "apex":
                raise RunFailure("optim.optimizer = 'apex', but apex is not importable (NVIDIA apex, built "
                                 "from source); use optim.optimizer=torch (fused torch AdamW) or auto") from None
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), fused=True), True


def lr_at(progress_epochs: float, peak: float, warmup_epochs: float, epochs: float, min_lr: float) -> float:
    """MAE's per-iteration schedule: linear warm-up, then a half-cycle cosine to ``min_lr``."""
    if progress_epochs < warmup_epochs:
        return peak * progress_epochs / warmup_epochs
    t = (progress_epochs - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
