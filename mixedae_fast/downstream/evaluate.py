"""Frozen-encoder evaluation: weighted kNN and a linear probe on encoder features.

Features are mean-pooled patch tokens after the final norm by default (docs/method.md §8: in mixed
pretraining the CLS token is a group token); ``pool="cls"`` takes the CLS token. The encoder runs
as a plain ViT: unmasked, unmixed images, global attention.

``mixedae-fast eval RUN`` loads a run directory or checkpoint (:func:`load_encoder`), reads a labelled
ImageFolder (``train/`` and ``val/``: the run's own data, an offline real set or any folder; see
:func:`eval_folders`) or, for a run on webdataset shards, the shards its own evaluation read (jobs.py), and
reports kNN and probe accuracy beside the same architecture at random init.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mixedae_fast.choices import OFFLINE_DATASETS

POOLS = ("avg", "cls")
EVAL_DATASETS = ("run", *OFFLINE_DATASETS)  # run: the run's own data


# -- features -------------------------------------------------------------------------------------

@torch.no_grad()
def extract_pooled(model, loader, device, pools: Sequence[str] = ("avg",),
                   amp_dtype=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """All of ``loader``'s images through the encoder once: ``({pool: features fp32 [M, D]}, labels [M])``."""
    bad = [p for p in pools if p not in POOLS]
    if bad:
        raise ValueError(f"pool {bad[0]!r} is not one of {', '.join(POOLS)}; pass one of those (--pool)")
    was_training = model.training
    model.eval()
    feats: dict[str, list] = {p: [] for p in pools}
    labels = []
    for images, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            tokens = model.forward_features(images.to(device))
        for p in pools:  # as model.extract_features, one forward for both poolings
            feats[p].append((tokens[:, 1:].mean(dim=1) if p == "avg" else tokens[:, 0]).float())
        labels.append(y.to(device))
    model.train(was_training)
    return {p: torch.cat(f) for p, f in feats.items()}, torch.cat(labels)


def extract_features(model, loader, device, pool: str = "avg", amp_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``loader``'s images through ``model.extract_features``: ``(features fp32 [M, D], labels [M])``."""
    feats, labels = extract_pooled(model, loader, device, (pool,), amp_dtype)
    return feats[pool], labels


# -- the two evaluations --------------------------------------------------------------------------

@torch.no_grad()
def knn_accuracy(train_x, train_y, val_x, val_y, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> float:
    """Cosine kNN with temperature-weighted votes (as DINO's evaluation): percent correct on val."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
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


def evaluate_features(train_x, train_y, val_x, val_y, k: int = 20, temperature: float = 0.07,
                      probe: bool = True, probe_epochs: int = 100) -> dict:
    out = {"knn": knn_accuracy(train_x, train_y, val_x, val_y, k, temperature)}
    if probe:
        out["linear_probe"] = linear_probe_accuracy(train_x, train_y, val_x, val_y, epochs=probe_epochs)
    return out


def evaluate_encoder(model, train_loader, val_loader, device, pool: str | Sequence[str] = "avg", amp_dtype=None,
                     probe: bool = True, k: int = 20, temperature: float = 0.07, probe_epochs: int = 100) -> dict:
    """kNN (and probe) accuracy on val: ``{"knn": .., "linear_probe": ..}`` for one pool, or
    ``{pool: {...}}`` when ``pool`` is a list."""
    pools = (pool,) if isinstance(pool, str) else tuple(pool)
    tx, ty = extract_pooled(model, train_loader, device, pools, amp_dtype)
    vx, vy = extract_pooled(model, val_loader, device, pools, amp_dtype)
    out = {p: evaluate_features(tx[p], ty, vx[p], vy, k, temperature, probe, probe_epochs) for p in pools}
    return out[pool] if isinstance(pool, str) else out


# -- a run's encoder and labelled data ------------------------------------------------------------

def load_encoder(path, device=None, overrides: Sequence[str] = ()):
    """``(model, cfg, pretrained)``: the MixedAE model of a run directory or checkpoint with its
    weights, on ``device`` (default: ``runtime.device`` of the run), in eval mode. ``overrides``
    (``--runtime.key=value``) may change how it runs, not what it is."""
    from mixedae_fast.config import ConfigError, apply_override, config_from_dict
    from mixedae_fast.model.mixedae import build_model
    from mixedae_fast.train.checkpoint import CheckpointError, load_pretrained
    from mixedae_fast.train.device import resolve_device

    pre = load_pretrained(path)
    d = {s: dict(v or {}) for s, v in pre.config.items()}
    for item in overrides:
        if not item.lstrip("-").startswith("runtime."):
            raise ConfigError(f"override {item!r}: only runtime.* settings can change for a trained model "
                              "(the architecture comes from the run's config)")
        apply_override(d, item)
    cfg = config_from_dict(d)
    device = resolve_device(cfg.runtime.device) if device is None else torch.device(device)
    model = build_model(cfg)
    try:
        model.load_state_dict(pre.model_state)
    except RuntimeError as e:
        raise CheckpointError(f"the weights in {pre.checkpoint} do not fit the model its config describes: "
                              f"{str(e).splitlines()[0]} ...; pass the checkpoint of this run, or restore the "
                              "config.yaml it was trained with") from e
    return model.to(device).eval(), cfg, pre


def eval_folders(dataset: str = "run", cfg=None, data_dir: str | None = None, run_dir: str | Path | None = None,
                 progress: bool = False) -> tuple[str, str, str]:
    """``(train_dir, val_dir, name)`` of a labelled ImageFolder pair.

    ``data_dir``: any folder with ``train/`` and ``val/`` (class subfolders). Else ``dataset``: ``run``
    = the run's data (``data.path`` / ``data.val_path``; else the folders its ``report.json`` names;
    else the embedded default set at the main job's default size), or an offline real set
    (``digits``, ``lfw``, ``photos``; written once at the model's image size, pipelines/offline.py).
    """
    import json

    S = cfg.model.img_size
    if data_dir is not None:
        root = Path(data_dir)
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"{root} has no {' or '.join(missing)}/ folder; an eval folder holds train/ and "
                                    "val/, each with one subfolder per class (ImageFolder layout)")
        return str(root / "train"), str(root / "val"), root.name
    if dataset == "run":
        if cfg.data.path is not None:
            if cfg.data.val_path is None:
                raise FileNotFoundError(f"the run trained on {cfg.data.path} without data.val_path: nothing "
                                        "labelled to evaluate on; pass --data-dir DIR or --dataset digits|lfw|photos")
            if cfg.data.format == "webdataset":  # eval and visualize read them (jobs.py), not as folders
                raise ValueError(f"the run trained on data.format=webdataset ({cfg.data.path}): finetune reads "
                                 "ImageFolders (train/ and val/ of class folders), not shards (eval and visualize "
                                 "read the run's shards); pass --data-dir DIR or --dataset digits|lfw|photos")
            if cfg.data.format != "imagefolder":
                raise ValueError(f"the run trained on data.format={cfg.data.format} ({cfg.data.path}): this command "
                                 "reads ImageFolders (train/ and val/ of class folders); the run's own kNN and probe "
                                 "on its data are in its report.json (pretrain evaluates on data.val_path); pass "
                                 "--data-dir DIR or --dataset digits|lfw|photos")
            return cfg.data.path, cfg.data.val_path, "run"
        report = Path(run_dir or "", "report.json")
        used = json.loads(report.read_text()).get("data", {}) if run_dir and report.is_file() else {}
        if used.get("val_path") and Path(used["val_path"]).is_dir() and Path(used["train_path"]).is_dir():
            return used["train_path"], used["val_path"], "embedded"
        from mixedae_fast.pipelines.synthetic import (
            DEFAULT_NUM_TRAIN,
            DEFAULT_NUM_VAL,
            default_data_root,
            write_image_folder,
        )

        # the main job's embedded set at its default size (mixedae-fast pretrain --num-train/--num-val)
        root = write_image_folder(default_data_root(S, seed=cfg.run.seed), DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL,
                                  size=S, seed=cfg.run.seed, progress=progress)
        return str(root / "train"), str(root / "val"), "embedded"
    if dataset in EVAL_DATASETS:
        from mixedae_fast.pipelines.offline import write_offline_folder

        root = write_offline_folder(dataset, size=S)
        return str(root / "train"), str(root / "val"), dataset
    raise ValueError(f"dataset {dataset!r} is not one of {', '.join(EVAL_DATASETS)}; pass one of those with "
                     "--dataset, or an ImageFolder with --data-dir DIR")


def image_loaders(train_dir: str, val_dir: str, img_size: int, device, batch_size: int = 250,
                  max_train: int | None = None, augment_train: bool = False, crop_scale=(0.2, 1.0),
                  seed: int = 0, num_workers: int = 0, pil_transform=None, shard_id: int = 0, num_shards: int = 1):
    """``(train, val)`` FileImageLoaders over two ImageFolders with the same classes: val unaugmented,
    in order; train the same unless ``augment_train`` (RandomResizedCrop + flip, then ``pil_transform``
    if given, shuffled, full batches; shard ``shard_id`` of ``num_shards`` under DDP). ``max_train`` keeps that
    many train images, spread over the classes."""
    from mixedae_fast.pipelines.torch_loader import FileImageLoader

    common = dict(img_size=img_size, device=device, seed=seed, num_workers=num_workers)
    train = FileImageLoader(train_dir, batch_size=batch_size, augment=augment_train, crop_scale=crop_scale,
                            shuffle=augment_train, drop_last=augment_train, limit=max_train,
                            pil_transform=pil_transform if augment_train else None, shard_id=shard_id,
                            num_shards=num_shards, **common)
    val = FileImageLoader(val_dir, batch_size=batch_size, augment=False, shuffle=False, drop_last=False, **common)
    if train.classes != val.classes:
        raise ValueError(f"{train_dir} and {val_dir} have different class folders ({len(train.classes)} vs "
                         f"{len(val.classes)}; only in one: "
                         f"{', '.join(sorted(set(train.classes) ^ set(val.classes))[:5]) or 'none, another order'}); "
                         "labels would not match: give train/ and val/ the same class subfolders")
    return train, val



def random_init_model(cfg, device):
    """The run's architecture at random init (seed ``run.seed + 1``): the baseline row of pretrain's report
    and of ``eval`` / ``finetune``."""
    from mixedae_fast.model.mixedae import build_model

    torch.manual_seed(cfg.run.seed + 1)
    return build_model(cfg).to(device).eval()
