"""Frozen-encoder evaluation: weighted kNN and a linear probe on encoder features.

Features are mean-pooled patch tokens after the final norm by default (DESIGN §1.8: in mixed
pretraining the CLS token is a group token); ``pool="cls"`` takes the CLS token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(model, loader, device, pool: str = "avg", amp_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``loader``'s images through ``model.extract_features``: ``(features fp32 [M, D], labels [M])``."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            feats.append(model.extract_features(images.to(device), pool=pool).float())
        labels.append(y.to(device))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_x, train_y, val_x, val_y, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> float:
    """Cosine kNN with temperature-weighted votes (as DINO's evaluation): percent correct on val."""
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    tx, vx = F.normalize(train_x.float(), dim=1), F.normalize(val_x.float(), dim=1)
    k = min(k, len(tx))
    correct = 0
    for i in range(0, len(vx), chunk):
        sim, idx = (vx[i:i + chunk] @ tx.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=vx.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(dim=1) == val_y[i:i + chunk]).sum().item()
    return 100.0 * correct / len(vx)


def linear_probe_accuracy(train_x, train_y, val_x, val_y, epochs: int = 100, lr: float = 1e-2,
                          weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0) -> float:
    """BatchNorm (no affine) + Linear on frozen features, as MAE's linear probing; percent correct."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    dev = train_x.device
    probe = torch.nn.Sequential(torch.nn.BatchNorm1d(train_x.shape[1], affine=False),
                                torch.nn.Linear(train_x.shape[1], num_classes))
    torch.nn.init.normal_(probe[1].weight, std=0.01, generator=g)
    torch.nn.init.zeros_(probe[1].bias)
    probe = probe.to(dev)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x, y = train_x.float(), train_y
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(dev)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    probe.eval()
    with torch.no_grad():
        return 100.0 * (probe(val_x.float()).argmax(dim=1) == val_y).float().mean().item()


def evaluate_encoder(model, train_loader, val_loader, device, pool: str = "avg", amp_dtype=None,
                     probe: bool = True) -> dict:
    tx, ty = extract_features(model, train_loader, device, pool, amp_dtype)
    vx, vy = extract_features(model, val_loader, device, pool, amp_dtype)
    out = {"knn": knn_accuracy(tx, ty, vx, vy)}
    if probe:
        out["linear_probe"] = linear_probe_accuracy(tx, ty, vx, vy)
    return out
