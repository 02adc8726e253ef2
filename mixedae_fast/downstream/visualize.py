"""Pictures: the loss curve, the reconstruction figure (the mixed input, each source's visible
patches, reconstruction and original) and the homologous-attention figure (for one query patch,
the keys its TopK attention selected, coloured by their true source). Matplotlib's Agg backend: no
display needed. ``training_pictures`` renders the last two as arrays for TensorBoard.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from mixedae_fast.kernels.patch_mix import patchify, unpatchify
from mixedae_fast.pipelines.torch_loader import IMAGENET_MEAN, IMAGENET_STD

SOURCE_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Loss parts against step from ``metrics.csv``; recognition accuracy on a second axis if logged."""
    rows = list(csv.DictReader(open(metrics_csv, newline="")))
    if not rows:
        raise ValueError(f"{metrics_csv} has no rows to plot: the run stopped before its first log line; train it "
                         "on (--run.resume=auto with its --run.name) past run.log_every steps")
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
    return _save(fig, out_png)


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised ``[B, 3, S, S]`` -> ``[B, S, S, 3]`` in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def _mixed_picture(patches: torch.Tensor, ids: torch.Tensor, n_visible: int, patch_size: int) -> torch.Tensor:
    """What the encoder sees, as one picture ``[S, S, 3]``: each position shows the patch of the source
    that owns it (``ids [r*n]`` source-major, ``patches [r, N, 3P²]``), dropped positions grey."""
    pos = ids.long()
    src = torch.arange(len(pos), device=pos.device) // n_visible
    mixed = torch.zeros_like(patches[:1])                           # 0 = the mean colour after normalising
    mixed[0, pos] = patches[src, pos]
    return _to_rgb(unpatchify(mixed, patch_size))[0]


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
    return {
        "mixed": _mixed_picture(patches, out["ids"][0], model.n_visible, P),
        "visible": _to_rgb(unpatchify(torch.where(visible, patches, grey), P)),
        "reconstruction": _to_rgb(unpatchify(torch.where(visible, patches, pred), P)),
        "original": _to_rgb(images),
    }


def _reconstruction_fig(panels: dict):
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
    return fig


def reconstruction_figure(model, images: torch.Tensor, out_png: str | Path, seed: int = 0, step: int = 0) -> Path:
    """A grid, 800 × (200·r + 30) px: the mixed encoder input, then one row per source (visible |
    reconstruction | original)."""
    return _save(_reconstruction_fig(reconstruction_panels(model, images, seed, step)), out_png)


def _save(fig, out_png: str | Path) -> Path:
    from mixedae_fast.fsutil import atomic_write

    try:
        return atomic_write(out_png, lambda f: fig.savefig(f, format="png"))
    finally:
        _pyplot().close(fig)


def _array(fig) -> np.ndarray:
    """The figure as ``uint8 [H, W, 3]`` (for TensorBoard)."""
    fig.canvas.draw()
    out = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    _pyplot().close(fig)
    return out


def pick_group(images: torch.Tensor, labels: torch.Tensor | None, r: int) -> torch.Tensor:
    """``r`` images for one group, of distinct labels where the batch has that many (a batch read in
    folder order is one class long), else the first ``r``."""
    if labels is None or len(images) < r:
        return images[:r]
    first = {}
    for i, y in enumerate(labels.tolist()):
        first.setdefault(y, i)
    idx = list(first.values())[:r]
    idx += [i for i in range(len(images)) if i not in idx][: r - len(idx)]
    return images[idx]


# -- homologous attention: which keys a query selected --------------------------------------------

@torch.no_grad()
def homologous_selection(model, images: torch.Tensor, query: int | None = None, block: int | None = None,
                         seed: int = 0, step: int = 0) -> dict:
    """TopK selections of one query patch in one encoder block, for the first group (``images[:r]``).

    ``query``: the query's index among the group's ``r·n`` patch tokens (source-major; default the
    middle token of source 0); ``block``: an encoder block (default the last homologous-attention
    block, else the last block). Keys are kept as the TopK attention keeps them (``topk_keep_mask``
    on the block's fp32 scores, per head). Returns a dict: ``keep [H, r·n]`` bool, ``positions [r·n]``
    (image position of each token), ``sources [r·n]``, ``query``, ``block``, per head and pooled the
    fraction of the query's kept keys (other than itself) from its own source (``query_recognition``,
    ``query_recognition_per_head``), the block's recognition accuracy and its heads' selection overlap
    (mean pairwise Jaccard of their TopK sets) over the whole group as the trainer logs them
    (``attention.topk_stats``: ``block_recognition``, ``block_jaccard``), ``chance`` and the ``mixed``
    input picture.
    """
    from mixedae_fast.kernels.homologous_attention import qk_scores, topk_keep_mask
    from mixedae_fast.model.attention import topk_stats

    r, n = model.group_size, model.n_visible
    if r < 2:
        raise ValueError("the homologous-attention picture needs mixing.group_size > 1 (this model is MAE, r = 1); "
                         "pass a run trained with mixing.group_size >= 2")
    depth = len(model.blocks)
    block = (model.ha_layers[-1] if model.ha_layers else depth - 1) if block is None else block
    if not -depth <= block < depth:
        raise ValueError(f"block {block} out of range for an encoder of {depth} blocks; pass --block in "
                         f"[{-depth}, {depth}), or leave it out for the last homologous block")
    block %= depth
    query = n // 2 if query is None else query
    if not 0 <= query < r * n:
        raise ValueError(f"query {query} out of range: a group has r*n = {r * n} patch tokens; pass --query in "
                         f"[0, {r * n}), or leave it out for the middle one")
    images = images[:r].float()
    was_training = model.training
    model.eval()
    ids = model.assign(1, seed, step, device=images.device)
    mixed, _, _ = model.mix(images, ids)
    captured = {}
    attn = model.blocks[block].attn
    handle = attn.qkv.register_forward_hook(lambda mod, inp, out: captured.update(qkv=out))
    try:
        layout = model.make_layout(hc=False)
        model.forward_encoder(mixed, ids, layout)
    finally:
        handle.remove()
        model.train(was_training)
    qkv = captured["qkv"]
    q, k, v = attn.split_heads(qkv.float())
    src = layout.source_ids(images.device)
    with torch.no_grad():  # the block's own selection, per head on q·k
        keep_all = topk_keep_mask(qk_scores(q, k)[..., 1:, 1:], model.topk)
    keep = keep_all[0, :, query]                                                   # [H, r*n]
    others = keep.clone()
    others[:, query] = False
    same = (src == src[query])[None] & others
    per_head = same.sum(1).float() / others.sum(1).clamp_min(1)
    pos = ids[0].long()
    block_stats = topk_stats(q, k, v, src, model.topk)
    return {
        "keep": keep.cpu(), "positions": pos.cpu(), "sources": src.cpu(), "query": query, "block": block,
        "query_recognition": same.sum().item() / max(others.sum().item(), 1),
        "query_recognition_per_head": per_head.cpu().tolist(),
        "block_recognition": block_stats["recognition"].item(), "block_jaccard": block_stats["jaccard"].item(),
        "chance": model.recognition_chance, "topk": model.topk, "ha": model.ha, "grid": model.grid,
        "patch_size": model.patch_size,
        "mixed": _mixed_picture(patchify(images, model.patch_size), ids[0], n, model.patch_size),
    }


def _homologous_fig(sel: dict):
    import matplotlib.patches as mpatches

    plt = _pyplot()
    keep, pos, src, qi = sel["keep"], sel["positions"], sel["sources"], sel["query"]
    H, P, grid = keep.shape[0], sel["patch_size"], sel["grid"]
    fig, axes = plt.subplots(1, H + 1, figsize=(2.5 * (H + 1), 3.0), dpi=100, squeeze=False)
    mixed = sel["mixed"].numpy()
    faded = 0.35 * mixed + 0.65

    def box(ax, p, colour, fill=False, lw=1.0, alpha=1.0):
        row, col = divmod(int(p), grid)
        ax.add_patch(mpatches.Rectangle((col * P - 0.5, row * P - 0.5), P, P, fill=fill, edgecolor=colour,
                                        facecolor=colour, linewidth=lw, alpha=alpha))

    def mark_query(ax):
        row, col = divmod(int(pos[qi]), grid)
        ax.plot(col * P + (P - 1) / 2, row * P + (P - 1) / 2, marker="*", markersize=9, color="white",
                markeredgecolor="black", markeredgewidth=0.8)

    ax = axes[0, 0]
    ax.imshow(mixed, interpolation="nearest")
    for t in range(len(pos)):
        box(ax, pos[t], SOURCE_COLOURS[int(src[t]) % len(SOURCE_COLOURS)], fill=True, lw=0.8, alpha=0.3)
    mark_query(ax)
    ax.set_title("mixed input, true sources", fontsize=8)
    for h in range(H):
        ax = axes[0, h + 1]
        ax.imshow(faded, interpolation="nearest")
        for t in torch.nonzero(keep[h]).flatten().tolist():
            if t != qi:
                box(ax, pos[t], SOURCE_COLOURS[int(src[t]) % len(SOURCE_COLOURS)], fill=True, lw=1.0, alpha=0.7)
        mark_query(ax)
        ax.set_title(f"head {h}: {sel['query_recognition_per_head'][h]:.2f} from its source", fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    r = int(src.max()) + 1
    handles = [mpatches.Patch(color=SOURCE_COLOURS[j % len(SOURCE_COLOURS)], label=f"source {j}") for j in range(r)]
    row, col = divmod(int(pos[qi]), grid)
    fig.legend(handles=handles, loc="lower center", ncol=r, fontsize=7, frameon=False)
    note = "" if sel["ha"] == "topk" else f" (ha={sel['ha']}: top-K by score, not applied)"
    fig.suptitle(f"block {sel['block']}, query ★ = source {int(src[qi])} patch ({row},{col}); its top-{sel['topk']} "
                 f"keys{note}: {sel['query_recognition']:.2f} from its own source (chance {sel['chance']:.2f}); "
                 f"block recognition {sel['block_recognition']:.2f}, heads' TopK overlap (Jaccard) "
                 f"{sel['block_jaccard']:.2f}", fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 0.93))
    return fig


def homologous_figure(model, images: torch.Tensor, out_png: str | Path, query: int | None = None,
                      block: int | None = None, seed: int = 0, step: int = 0) -> tuple[Path, dict]:
    """One panel of the mixed input with each patch outlined in its true source's colour, then one per
    head with the query's selected keys filled in their source's colour; ``250·(H+1) × 300`` px.
    Returns the path and :func:`homologous_selection`'s figures (without tensors)."""
    sel = homologous_selection(model, images, query, block, seed, step)
    path = _save(_homologous_fig(sel), out_png)
    return path, {k: v for k, v in sel.items() if not isinstance(v, torch.Tensor)}


def training_pictures(model, images: torch.Tensor, seed: int = 0, step: int = 0) -> dict[str, np.ndarray]:
    """The reconstruction and (for r > 1) homologous-attention figures as ``uint8 [H, W, 3]`` arrays."""
    out = {"reconstruction": _array(_reconstruction_fig(reconstruction_panels(model, images, seed, step)))}
    if model.group_size > 1:
        out["homologous"] = _array(_homologous_fig(homologous_selection(model, images, seed=seed, step=step)))
    return out
