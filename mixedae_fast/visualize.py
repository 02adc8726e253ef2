"""Pictures: the loss curve and a reconstruction figure (mixed input, each source's reconstruction,
originals). Matplotlib's Agg backend: no display needed."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from mixedae_fast.kernels.patch_mix import patchify, unpatchify
from mixedae_fast.pipelines.torch_loader import IMAGENET_MEAN, IMAGENET_STD


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Loss parts against step from ``metrics.csv``; recognition accuracy on a second axis if logged."""
    rows = list(csv.DictReader(open(metrics_csv, newline="")))
    if not rows:
        raise ValueError(f"{metrics_csv} has no rows to plot")
    plt = _pyplot()
    step = [float(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in ("loss", "loss_rec", "loss_hc"):
        if key in rows[0]:
            ax.plot(step, [float(r[key]) for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    if rows[0].get("recognition"):
        ax2 = ax.twinx()
        ax2.plot(step, [float(r["recognition"]) for r in rows], "k--", label="recognition acc")
        ax2.set_ylabel("recognition accuracy")
        ax2.set_ylim(0, 1)
        more = ax2.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised ``[B, 3, S, S]`` -> ``[B, S, S, 3]`` in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def reconstruction_panels(model, images: torch.Tensor, seed: int = 0, step: int = 0) -> dict[str, torch.Tensor]:
    """One group (the first ``r`` images): ``mixed [S, S, 3]`` (each position shows the patch of the
    source that owns it, dropped positions grey) and per source ``visible``, ``reconstruction``
    (visible patches pasted back, as MAE shows them) and ``original``, ``[r, S, S, 3]`` in [0, 1]."""
    r, P = model.group_size, model.patch_size
    images = images[:r].float()
    was_training = model.training
    model.eval()
    out = model(images, seed=seed, step=step)
    model.train(was_training)
    patches = patchify(images, P)                                   # [r, N, 3P²]
    pred = out["pred"].float()
    if model.norm_pix_loss:  # predictions are per-patch normalised: undo with the true patch statistics
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True, unbiased=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    visible = ~out["loss_mask"][..., None]                          # [r, N, 1]
    grey = torch.full_like(patches, 0.0)                            # 0 = the mean colour after normalising
    ids = out["ids"][0].long().view(r, -1)
    mixed = grey[:1].clone()
    for j in range(r):
        mixed[0, ids[j]] = patches[j, ids[j]]
    return {
        "mixed": _to_rgb(unpatchify(mixed, P))[0],
        "visible": _to_rgb(unpatchify(torch.where(visible, patches, grey), P)),
        "reconstruction": _to_rgb(unpatchify(torch.where(visible, patches, pred), P)),
        "original": _to_rgb(images),
    }


def reconstruction_figure(model, images: torch.Tensor, out_png: str | Path, seed: int = 0, step: int = 0) -> Path:
    """A grid: the mixed encoder input, then one row per source (visible | reconstruction | original)."""
    panels = reconstruction_panels(model, images, seed, step)
    r = panels["original"].shape[0]
    plt = _pyplot()
    fig, axes = plt.subplots(r, 4, figsize=(8, 2 * r + 0.3), dpi=100, squeeze=False)
    for j in range(r):
        row = [panels["mixed"] if j == 0 else None, panels["visible"][j], panels["reconstruction"][j],
               panels["original"][j]]
        for ax, img in zip(axes[j], row):
            ax.axis("off")
            if img is not None:
                ax.imshow(img.numpy(), interpolation="nearest")
    for ax, title in zip(axes[0], ["mixed input", "visible (source)", "reconstruction", "original"]):
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
