"""Full fine-tuning of the pretrained encoder, as MAE's fine-tuning recipe does it.

The encoder runs as a plain ViT (global attention, every block trained) with a Linear head on the
mean-pooled patch tokens after the final norm (the probe features, DESIGN §1.8). Layer-wise lr decay:
block ``i`` of ``depth`` gets ``lr · decay^(depth - i)``, the patch embedding and CLS token
``lr · decay^(depth + 1)``, the final norm and head the full ``lr`` (MAE: 0.65 for ViT-B, 0.75 for
ViT-L). AdamW without weight decay on biases, norms and the CLS token; linear warm-up then a
half-cycle cosine per step (``engine.lr_at``); label smoothing; optional stochastic depth.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mixedae_fast.engine import lr_at

# MixedAutoencoderViT parts that only pretraining uses (decoder, mask token, HC head, slot embedding)
PRETRAIN_ONLY = ("decoder_embed", "mask_token", "decoder_pos_embed", "decoder_blocks", "decoder_norm",
                 "decoder_pred", "hc_head", "seg_embed")


@dataclass
class FinetuneConfig:
    epochs: int = 4  # cpu_tiny on the embedded set: ~50 s on 2 cores (MAE: 100 for ViT-B, 50 for ViT-L)
    batch_size: int = 64
    blr: float | None = None  # lr = blr * batch_size / 256; None = default_blr(depth)
    lr: float | None = None  # absolute peak lr; overrides blr
    layer_decay: float | None = None  # None: MAE's 0.65 below 24 blocks (ViT-B), 0.75 from 24 (ViT-L)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    drop_path: float = 0.0  # stochastic depth, rising linearly to this in the last block (MAE: 0.1 ViT-B)
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range (+ flip)
    seed: int = 0

    def __post_init__(self):
        errors = []
        if self.epochs < 1 or self.batch_size < 2:
            errors.append(f"epochs = {self.epochs} and batch_size = {self.batch_size}: need epochs >= 1, "
                          "batch_size >= 2")
        if (self.blr is not None and self.blr <= 0) or (self.lr is not None and self.lr <= 0):
            errors.append(f"blr = {self.blr}, lr = {self.lr}: must be > 0")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            errors.append(f"layer_decay = {self.layer_decay}: must be in (0, 1] (1 = no decay)")
        if not 0 <= self.drop_path < 1 or not 0 <= self.label_smoothing < 1:
            errors.append(f"drop_path = {self.drop_path}, label_smoothing = {self.label_smoothing}: each in [0, 1)")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.min_lr < 0:
            errors.append("warmup_epochs, weight_decay and min_lr must be >= 0")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            errors.append(f"crop_scale = {self.crop_scale}: must be (lo, hi) with 0 < lo <= hi <= 1")
        if errors:
            raise ValueError("fine-tune settings: " + "; ".join(errors))

    def peak_lr(self, depth: int) -> float:
        if self.lr is not None:
            return self.lr
        return (self.blr if self.blr is not None else default_blr(depth)) * self.batch_size / 256


def default_layer_decay(depth: int) -> float:
    """MAE's: 0.65 for ViT-B (12 blocks), 0.75 for ViT-L (24)."""
    return 0.75 if depth >= 24 else 0.65


def default_blr(depth: int) -> float:
    """MAE's 5e-4 for ViT-B and 1e-3 for ViT-L (at batch 1024); below 12 blocks 1.6e-2, measured on
    cpu_tiny (4 epochs on the embedded set: blr 4e-3 / 8e-3 / 1.6e-2 gave val top-1 90.4 / 94.0 / 96.5)."""
    if depth >= 24:
        return 1e-3
    return 5e-4 if depth >= 12 else 1.6e-2


class ViTClassifier(nn.Module):
    """The encoder of a :class:`~mixedae_fast.models.MixedAutoencoderViT` (its pretraining-only parts
    removed) and a Linear head on mean-pooled features. Takes ownership of ``model``."""

    def __init__(self, model: nn.Module, num_classes: int, drop_path: float = 0.0):
        super().__init__()
        from timm.layers import DropPath  # timm is imported (shimmed) by models.py already

        for name in PRETRAIN_ONLY:
            if hasattr(model, name):
                delattr(model, name)
        self.encoder = model
        depth = len(model.blocks)
        for i, blk in enumerate(model.blocks):
            rate = drop_path * i / max(depth - 1, 1)
            if rate > 0:
                blk.drop_path1, blk.drop_path2 = DropPath(rate), DropPath(rate)
        self.head = nn.Linear(model.norm.normalized_shape[0], num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: start from near-zero logits
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.extract_features(images, pool="avg"))


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, ``i + 1`` for block ``i``, ``depth + 1`` for the final norm and head."""
    name = name.removeprefix("encoder.")
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, depth: int, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; no weight decay on
    biases, norms (1-D parameters) and the CLS token."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        no_wd = p.ndim == 1 or name.endswith(("bias", "cls_token"))
        group = groups.setdefault((lid, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                                 "lr_scale": layer_decay ** (depth + 1 - lid), "layer": lid})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


@torch.no_grad()
def top1_accuracy(model: nn.Module, loader, device, amp_dtype=None) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images.to(device))
        correct += (logits.argmax(dim=1) == labels.to(device)).sum().item()
        total += len(labels)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def finetune(model: nn.Module, train_loader, val_loader, num_classes: int, device, fcfg: FinetuneConfig,
             amp_dtype=None, progress: bool = True, desc: str = "finetune") -> dict:
    """Fine-tune ``model``'s encoder (taken over, see :class:`ViTClassifier`) on ``train_loader``;
    val top-1 after every epoch. Returns the figures and the per-epoch history."""
    torch.manual_seed(fcfg.seed)
    clf = ViTClassifier(model, num_classes, fcfg.drop_path).to(device)
    depth = len(clf.encoder.blocks)
    decay = fcfg.layer_decay if fcfg.layer_decay is not None else default_layer_decay(depth)
    peak = fcfg.peak_lr(depth)
    opt = torch.optim.AdamW(layer_decay_groups(clf, depth, fcfg.weight_decay, decay), lr=peak,
                            betas=tuple(fcfg.betas))
    steps_per_epoch = len(train_loader)
    history, step, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=fcfg.epochs * steps_per_epoch, disable=not progress, desc=desc, unit="step", dynamic_ncols=True)
    try:
        for epoch in range(fcfg.epochs):
            train_loader.set_epoch(epoch)
            clf.train()
            loss_sum, seen = torch.zeros((), device=device), 0
            for images, labels in train_loader:
                lr = lr_at(step / steps_per_epoch, peak, fcfg.warmup_epochs, fcfg.epochs, fcfg.min_lr)
                for group in opt.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    logits = clf(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=fcfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(labels)
                seen += len(labels)
                step += 1
                bar.update(1)
            row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / max(seen, 1), "lr": lr,
                   "val_top1": top1_accuracy(clf, val_loader, device, amp_dtype)}
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_top1=f"{row['val_top1']:.1f}")
    finally:
        bar.close()
    return {"val_top1": history[-1]["val_top1"], "best_val_top1": max(r["val_top1"] for r in history),
            "seconds": time.perf_counter() - t0, "steps": step, "peak_lr": peak, "layer_decay": decay,
            "history": history, "settings": dataclasses.asdict(fcfg)}
