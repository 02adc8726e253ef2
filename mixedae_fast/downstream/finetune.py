"""Full fine-tuning of the pretrained encoder, as MAE's fine-tuning recipe does it, with timm's parts.

The encoder runs as a plain ViT (global attention, every block trained) with a Linear head on the
mean-pooled patch tokens after the final norm (the probe features, docs/method.md §8). Layer-wise lr
decay: block ``i`` of ``depth`` gets ``lr · decay^(depth - i)``, the patch embedding and CLS token
``lr · decay^(depth + 1)``, the final norm and head the full ``lr`` (MAE: 0.65 for ViT-B, 0.75 for
ViT-L). AdamW without weight decay on biases, norms and the CLS token; linear warm-up then a
half-cycle cosine per step (``optim.lr_at``).

The regularisation is MAE's, through timm: RandAugment ``rand-m9-mstd0.5-inc1`` (per sample, in the
loader's workers), Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 (``timm.data.Mixup`` and
``SoftTargetCrossEntropy``), random erasing 0.25 (``timm.data.RandomErasing``), stochastic depth 0.1.
``recipe="mae"`` turns all of it on; ``recipe="light"`` keeps RandomResizedCrop + flip and label
smoothing only. The default is by depth: ``mae`` from 12 blocks (ViT-B and up, what MAE fine-tunes
for 100 epochs), ``light`` for the small CPU models, where a few epochs of mixed labels learn little.
Each part can be set on its own and overrides the recipe.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mixedae_fast.train.optim import lr_at

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
    drop_path: float | None = None  # stochastic depth, rising linearly to this in the last block (MAE: 0.1 ViT-B)
    label_smoothing: float = 0.1
    recipe: str | None = None  # "mae" | "light"; None: "mae" from 12 blocks, "light" below (see the module doc)
    mixup: float | None = None  # Mixup alpha (MAE 0.8); 0 = off
    cutmix: float | None = None  # CutMix alpha (MAE 1.0); 0 = off
    auto_augment: str | None = None  # timm RandAugment spec (MAE "rand-m9-mstd0.5-inc1"); "none" = off
    reprob: float | None = None  # random erasing probability (MAE 0.25); 0 = off
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range (+ flip)
    seed: int = 0
    accum_steps: int = 1  # batches per optimizer step (gradient accumulation): global batch = batch x this x ranks

    def __post_init__(self):
        errors = []

        def refuse(name: str, rule: str) -> None:
            flag = "" if name in ("betas", "crop_scale") else f" (--{name.replace('_', '-')})"  # no CLI option
            errors.append(f"{name} = {getattr(self, name)!r}{flag}: {rule}")

        def number(name: str, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
                   fix: str = "") -> None:
            """A finite number (or None where None means a default) in the range: inf or nan here would
            train to chance and exit 0."""
            value = getattr(self, name)
            if value is None:
                return
            ok = (isinstance(value, (int, float)) and math.isfinite(value) and (lo < value if lo_open else lo <= value)
                  and (value < hi if hi_open else value <= hi))
            if not ok:
                span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
                refuse(name, (f"must be a finite number > {lo:g}" if hi == math.inf and lo_open else
                              f"must be a finite number >= {lo:g}" if hi == math.inf else f"must be in {span}")
                       + (f" ({fix})" if fix else ""))

        if self.epochs < 1:
            refuse("epochs", "must be >= 1")
        if self.batch_size < 2:
            refuse("batch_size", "must be >= 2 (images a step on each rank)")
        if self.accum_steps < 1:
            refuse("accum_steps", "must be >= 1 (batches per optimizer step; 1 = no accumulation)")
        number("blr", 0, lo_open=True, fix="e.g. --blr 5e-4 as MAE's ViT-B, or leave it out for the default by depth")
        number("lr", 0, lo_open=True, fix="e.g. --lr 1e-3, or leave it out for blr x global batch / 256")
        number("layer_decay", 0, 1, lo_open=True, fix="1 = no decay, MAE: 0.65 for ViT-B, 0.75 for ViT-L")
        number("weight_decay", 0, fix="MAE: 0.05, 0 = none")
        number("warmup_epochs", 0, fix="MAE: 5")
        number("min_lr", 0, fix="MAE: 1e-6")
        number("drop_path", 0, 1, hi_open=True, fix="MAE: 0.1 for ViT-B")
        number("label_smoothing", 0, 1, hi_open=True, fix="MAE: 0.1")
        number("mixup", 0, fix="MAE: 0.8, 0 = off")
        number("cutmix", 0, fix="MAE: 1.0, 0 = off")
        number("reprob", 0, 1, fix="MAE: 0.25, 0 = off")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            refuse("betas", "must be two numbers in [0, 1)")
        if self.recipe not in (None, *RECIPES):
            refuse("recipe", f"one of {', '.join(RECIPES)}")
        if self.auto_augment not in (None, "none") and not str(self.auto_augment).startswith("rand"):
            refuse("auto_augment", "a timm RandAugment spec such as 'rand-m9-mstd0.5-inc1', or 'none'")
        lo, hi = self.crop_scale
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 1):
            refuse("crop_scale", "must be (lo, hi) with 0 < lo <= hi <= 1")
        if errors:
            raise ValueError("fine-tune settings: " + "; ".join(errors))

    def regularisation(self, depth: int) -> dict:
        """The recipe's settings for a ``depth``-block encoder, each explicitly set field winning."""
        recipe = self.recipe or ("mae" if depth >= 12 else "light")
        out = dict(RECIPES[recipe], recipe=recipe)
        for key in ("drop_path", "mixup", "cutmix", "auto_augment", "reprob"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if out["auto_augment"] == "none":
            out["auto_augment"] = None
        return out

    def global_batch(self, world_size: int = 1) -> int:
        """Images an optimizer step: ``batch_size`` (per rank, as MAE's) x ``accum_steps`` x ranks."""
        return self.batch_size * self.accum_steps * world_size

    def peak_lr(self, depth: int, world_size: int = 1) -> float:
        """``lr``, else ``blr`` x global batch / 256 (MAE's ``eff_batch_size``)."""
        if self.lr is not None:
            return self.lr
        return (self.blr if self.blr is not None else default_blr(depth)) * self.global_batch(world_size) / 256


RECIPES = {
    "mae": dict(drop_path=0.1, mixup=0.8, cutmix=1.0, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25),
    "light": dict(drop_path=0.0, mixup=0.0, cutmix=0.0, auto_augment=None, reprob=0.0),
}


class RandAugmentPIL:
    """timm's RandAugment for the torch loader's workers: a picklable ``(image, epoch, index) -> image``
    whose draws are keyed by (seed, epoch, index), so a sample's augmentation does not depend on the
    worker, the order or a resume. timm draws from the global ``random`` (magnitudes, probabilities)
    and ``numpy.random`` (which ops): both are seeded per sample and restored afterwards. Its posterize
    ops run :func:`posterize` (timm's hands Pillow a bit count Pillow 13 refuses)."""

    def __init__(self, spec: str, img_size: int, seed: int = 0):
        from timm.data.auto_augment import rand_augment_transform

        from mixedae_fast.pipelines.torch_loader import IMAGENET_MEAN

        self.spec, self.seed = spec, seed
        self.transform = rand_augment_transform(spec, {"translate_const": int(img_size * 0.45),
                                                       "img_mean": tuple(round(255 * x) for x in IMAGENET_MEAN)})
        for op in self.transform.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize

    def __repr__(self) -> str:
        return f"RandAugmentPIL({self.spec!r}, seed={self.seed})"

    def __call__(self, image, epoch: int, index: int):
        key = ((self.seed * 1_000_003 + epoch) * 1_000_003 + index) % 2 ** 32
        state, np_state = random.getstate(), np.random.get_state()
        random.seed(key)
        np.random.seed(key)
        try:
            return self.transform(image)
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


def posterize(image, bits_to_keep: int, **_):
    """Keep the ``bits_to_keep`` high bits of every channel, for every count timm's RandAugment levels give
    (0 to 8). The increasing specs (MAE's ``rand-m9-mstd0.5-inc1``) keep ``4 - int(m * 0.4)`` bits: 0 where
    the magnitude draw (9 +- 0.5) reaches its cap of 10, 2.3% of the draws, ~0.15% of samples. Pillow 13's
    ``ImageOps.posterize`` refuses 0 bits (ValueError); older Pillow masked every bit off, as TensorFlow's
    RandAugment does: a black image, which is what 0 bits gives here."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point(lambda _: 0)
    return ImageOps.posterize(image, bits_to_keep)


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
    """The encoder of a :class:`~mixedae_fast.model.mixedae.MixedAutoencoderViT` (its pretraining-only parts
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
def evaluate_classifier(model: nn.Module, loader, device, amp_dtype=None) -> dict:
    """``{"top1", "top5", "loss", "images"}`` of ``model`` on ``loader``: percent of images whose label is the
    top logit / among the top five (top-``num_classes`` when there are fewer), mean cross entropy."""
    was_training = model.training
    model.eval()
    top1 = top5 = loss = torch.zeros((), dtype=torch.float64, device=device)
    total = 0
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images.to(device)).float()
        labels = labels.to(device)
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 = top1 + (best[:, 0] == labels).sum()
        top5 = top5 + (best == labels[:, None]).any(dim=1).sum()
        loss = loss + F.cross_entropy(logits, labels, reduction="sum").double()
        total += len(labels)
    model.train(was_training)
    n = max(total, 1)
    return {"top1": 100.0 * top1.item() / n, "top5": 100.0 * top5.item() / n, "loss": loss.item() / n,
            "images": total}


def epoch_line(desc: str, row: dict, epochs: int) -> str:
    """The line printed after every epoch (with or without the progress bar)."""
    return (f"{desc} epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}, val top-1 "
            f"{row['val_top1']:.1f} top-5 {row['val_top5']:.1f}, lr {row['lr']:.3g}, {row['img_per_s']:.0f} img/s")


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed the generators the training draws from (Mixup/CutMix: numpy; random erasing: random and torch;
    drop path: torch) from (seed, epoch, rank), so an epoch draws the same whether it follows the previous
    one or a resume."""
    key = hash((seed, epoch, rank)) & (2 ** 63 - 1)
    torch.manual_seed(key)
    np.random.seed(key % 2 ** 32)
    random.seed(key)


def finetune(model: nn.Module, train_loader, val_loader, num_classes: int, device, fcfg: FinetuneConfig,
             amp_dtype=None, progress: bool = True, desc: str = "finetune", dist=None, out_dir=None,
             resume: dict | None = None, record: dict | None = None, epoch_lines: bool = True) -> dict:
    """Fine-tune ``model``'s encoder (taken over, see :class:`ViTClassifier`) on ``train_loader``; val top-1
    and top-5 after every epoch, and one line saying so (``epoch_lines``, rank 0). Returns the figures and
    the per-epoch history.

    ``fcfg.accum_steps`` batches make an optimizer step (their gradients averaged; the last step of an
    epoch takes what is left); the lr follows the global batch (:meth:`FinetuneConfig.peak_lr`).

    ``out_dir`` (rank 0 writes it; finetune_folder.py): after every epoch a checkpoint
    ``out_dir/checkpoints/ckpt-<epoch>.pt`` (atomic, the last two kept), and after the last one the
    classifier as a timm model in ``out_dir/export_timm``. ``resume``: such a checkpoint, loaded
    (:func:`~mixedae_fast.downstream.finetune_folder.load_finetune_checkpoint`): training continues after its epoch and
    computes what an uninterrupted run computes (the loaders and the generators are keyed by epoch).
    ``record``: what checkpoints and export keep besides (``model_config``, ``classes``, ``source``...).

    ``dist`` (a :class:`~mixedae_fast.train.distributed.Dist` of several ranks, under torchrun): the
    classifier trains in DDP, ``train_loader`` is this rank's shard, the lr follows the global batch,
    the train loss is averaged over ranks; every rank scores the whole val set (the same weights give
    the same figure), so only rank 0 needs to report."""
    from mixedae_fast.downstream.finetune_folder import export_classifier, save_finetune_checkpoint
    from mixedae_fast.errors import RunFailure

    if out_dir is not None and not {"model_config", "classes"} <= set(record or {}):
        raise ValueError("finetune(out_dir=...) needs record={'model_config': <the run's model section>, 'classes': "
                         "[...], ...}: the checkpoints and the export keep them")
    torch.manual_seed(fcfg.seed)  # the head's init
    depth = len(model.blocks)
    reg = fcfg.regularisation(depth)
    clf = ViTClassifier(model, num_classes, reg["drop_path"]).to(device)
    mix, criterion = _mixing(reg, fcfg.label_smoothing, num_classes)
    if mix is not None and fcfg.batch_size % 2:
        raise ValueError(f"batch_size = {fcfg.batch_size}: Mixup/CutMix pair the images of a batch and need an even "
                         "batch size; pass an even --batch-size or --mixup 0 --cutmix 0")
    erase = _random_erasing(reg["reprob"], device)
    decay = fcfg.layer_decay if fcfg.layer_decay is not None else default_layer_decay(depth)
    world = dist.world_size if dist is not None else 1
    rank = dist.rank if dist is not None else 0
    main = rank == 0
    peak = fcfg.peak_lr(depth, world)
    opt = torch.optim.AdamW(layer_decay_groups(clf, depth, fcfg.weight_decay, decay), lr=peak,
                            betas=tuple(fcfg.betas))
    history, start = [], 0
    if resume is not None:
        clf.load_state_dict(resume["classifier"])
        opt.load_state_dict(resume["optimizer"])
        history, start = [dict(r) for r in resume["history"]], int(resume["epoch"])
    train_clf = dist.wrap(clf) if dist is not None else clf
    batches = len(train_loader)
    accum = fcfg.accum_steps
    steps_per_epoch = -(-batches // accum)
    step, t_start = start * steps_per_epoch, time.perf_counter()
    meta = dict(record or {}, settings=dataclasses.asdict(fcfg), regularisation=reg, peak_lr=peak, layer_decay=decay,
                global_batch=fcfg.global_batch(world), world_size=world, num_classes=num_classes, label=desc)
    ckpt = resume.get("path") if resume is not None else None  # the newest good checkpoint
    bar = tqdm(total=(fcfg.epochs - start) * batches, disable=not progress, desc=desc, unit="batch",
               dynamic_ncols=True)
    say = (bar.write if progress else lambda line: print(line, flush=True)) if epoch_lines and main else None
    try:
        for epoch in range(start, fcfg.epochs):
            _seed_epoch(fcfg.seed, epoch, rank)
            train_loader.set_epoch(epoch)
            train_clf.train()
            loss_sum, seen, t0 = torch.zeros((), device=device), 0, time.perf_counter()
            opt.zero_grad(set_to_none=True)
            for i, (images, labels) in enumerate(train_loader):
                k, j = divmod(i, accum)
                if j == 0:  # the first batch of an optimizer step: its lr, and how many batches it averages
                    micro = min(accum, batches - k * accum)
                    lr = lr_at(step / steps_per_epoch, peak, fcfg.warmup_epochs, fcfg.epochs, fcfg.min_lr)
                    for group in opt.param_groups:
                        group["lr"] = lr * group["lr_scale"]
                if mix is not None:
                    images, targets = mix(images, labels)
                else:
                    targets = labels
                if erase is not None:
                    images = erase(images)
                last = j == micro - 1
                with dist.no_sync(train_clf, not last) if dist is not None else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                        enabled=amp_dtype is not None):
                        logits = train_clf(images)
                    loss = criterion(logits.float(), targets)
                    (loss / micro if micro > 1 else loss).backward()
                if last:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                loss_sum += loss.detach() * len(labels)
                seen += len(labels)
                bar.update(1)
            mean_loss = loss_sum / max(seen, 1)
            if dist is not None:
                mean_loss = dist.mean_over_ranks({"loss": mean_loss})[0]["loss"]
            train_loss = mean_loss.item()
            seconds = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                good = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint of this fine-tune was written"
                raise RunFailure(f"fine-tuning diverged: the mean train loss of epoch {epoch + 1} is {train_loss} "
                                 f"(peak lr {peak:.3g}); no checkpoint was written for it ({good}). Fine-tune again "
                                 "with a lower --lr / --blr into a new --out")
            val = evaluate_classifier(clf, val_loader, device, amp_dtype)
            row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": lr, "val_top1": val["top1"],
                   "val_top5": val["top5"], "val_loss": val["loss"], "img_per_s": seen * world / max(seconds, 1e-9),
                   "seconds": seconds}
            history.append(row)
            if say is not None:
                say(epoch_line(desc, row, fcfg.epochs))
            if out_dir is not None and main:
                ckpt = save_finetune_checkpoint(out_dir, clf, opt, row["epoch"], step, history, meta)
    finally:
        bar.close()
    export = None
    if out_dir is not None and main and history:
        export = export_classifier(clf, out_dir, meta, history)
    result = {"val_top1": history[-1]["val_top1"] if history else None,
              "val_top5": history[-1]["val_top5"] if history else None,
              "best_val_top1": max((r["val_top1"] for r in history), default=None),
              "seconds": time.perf_counter() - t_start, "steps": step, "epochs_trained": fcfg.epochs - start,
              "resumed_after_epoch": start if resume is not None else None, "history": history,
              **{k: meta[k] for k in ("settings", "regularisation", "peak_lr", "layer_decay", "global_batch",
                                      "world_size")}}
    if out_dir is not None and main:
        result.update(checkpoint=str(ckpt) if ckpt else None, export=export)
    return result


def _mixing(reg: dict, label_smoothing: float, num_classes: int):
    """``(mixup or None, loss)``: timm's Mixup/CutMix with soft targets when either alpha is > 0, else a
    plain label-smoothed cross entropy."""
    if reg["mixup"] > 0 or reg["cutmix"] > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mix = Mixup(mixup_alpha=reg["mixup"], cutmix_alpha=reg["cutmix"], prob=1.0, switch_prob=0.5, mode="batch",
                    label_smoothing=label_smoothing, num_classes=num_classes)
        return mix, SoftTargetCrossEntropy()
    return None, lambda logits, labels: F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def _random_erasing(prob: float, device):
    if prob <= 0:
        return None
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=prob, mode="pixel", max_count=1, num_splits=0, device=str(device))
