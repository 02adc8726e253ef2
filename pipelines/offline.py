"""Real labelled images that ship inside packages installable offline, written as JPEG folders.

    digits  scikit-learn's handwritten digits: 1,797 grey 8×8 images, 10 classes
    lfw     scikit-image's ``lfw_subset``: 200 grey 25×25 crops, faces / non-faces
    photos  scikit-image's bundled photographs: instance recognition, one class per photo, samples
            are random crops (area 10-40%) of that photo

Each is upscaled (bicubic) to ``size`` and split train / val (stratified, seeded), in ImageFolder
layout, for ``mixedae-fast eval`` and the loaders. The folder appears atomically with a
``DONE.json`` of its parameters; a second call with the same parameters returns at once.
:func:`write_dataset` (``mixedae-fast make-data``) writes one of these or the embedded set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mixedae_fast.choices import EMBEDDED, OFFLINE_DATASETS
from mixedae_fast.fsutil import cache_root
from mixedae_fast.pipelines.synthetic import (
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    atomic_dataset_folder,
    default_data_root,
    write_image_folder,
)

PHOTOS = ("astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "coins", "horse", "moon", "brick", "grass", "gravel")
CROPS_PER_PHOTO = 80


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0 * 255).round().astype(np.uint8)
    return images, d.target.astype(np.int64), [str(i) for i in range(10)]


def _lfw():
    import skimage.data

    images = (skimage.data.lfw_subset() * 255).round().astype(np.uint8)
    labels = np.repeat([0, 1], 100)  # skimage documents the first 100 as faces, the rest as not
    return images, labels, ["face", "nonface"]


def _photos(seed: int = 0):
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for c, name in enumerate(PHOTOS):
        img = np.asarray(getattr(skimage.data, name)())
        img = img[..., :3] if img.ndim == 3 else img
        if img.dtype != np.uint8:
            img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1 else img.astype(np.uint8)
        H, W = img.shape[:2]
        for _ in range(CROPS_PER_PHOTO):
            side = int(np.sqrt(rng.uniform(0.1, 0.4) * H * W))
            side = min(side, H, W)
            y, x = rng.integers(0, H - side + 1), rng.integers(0, W - side + 1)
            crop = Image.fromarray(img[y:y + side, x:x + side]).resize((64, 64), Image.BICUBIC)
            crops.append(np.asarray(crop.convert("RGB")))
            labels.append(c)
    return np.stack(crops), np.array(labels, dtype=np.int64), list(PHOTOS)


DATASETS = {name: globals()[f"_{name}"] for name in OFFLINE_DATASETS}  # name -> its loader, _<name> above


def load_offline(name: str):
    """``(images uint8 [M, H, W] or [M, H, W, 3], labels int64 [M], class names)``."""
    if name not in DATASETS:
        raise ValueError(f"unknown offline dataset {name!r}; choose from {', '.join(DATASETS)}")
    try:
        return DATASETS[name]()
    except ImportError as e:
        raise ImportError(f"the {name!r} dataset needs scikit-learn and scikit-image: pip install "
                          f"scikit-learn scikit-image (or the [dev] extra); {e}") from e


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``: per class a seeded shuffle, ``val_fraction`` of it (at least 1) to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(len(idx) * val_fraction)))
        val.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(train), np.sort(val)


def default_offline_root(name: str, size: int) -> Path:
    return cache_root() / f"{name}-{size}px"


def write_offline_folder(name: str, root: str | Path | None = None, size: int = 32, val_fraction: float = 0.25,
                         seed: int = 0, quality: int = 95) -> Path:
    """Write ``root/{train,val}/<class>/<index:06d>.jpg`` for the offline dataset ``name``."""
    from PIL import Image

    root = root if root is not None else default_offline_root(name, size)
    params = {"dataset": name, "size": size, "val_fraction": val_fraction, "seed": seed, "quality": quality}

    def fill(tmp: Path) -> None:
        images, labels, classes = load_offline(name)
        for split, idx in zip(("train", "val"), stratified_split(labels, val_fraction, seed)):
            for c in classes:
                (tmp / split / c).mkdir(parents=True, exist_ok=True)
            for i in idx:
                img = Image.fromarray(images[i]).convert("RGB").resize((size, size), Image.BICUBIC)
                img.save(tmp / split / classes[labels[i]] / f"{i:06d}.jpg", quality=quality)

    return atomic_dataset_folder(root, params, fill)


def write_dataset(name: str, root: str | Path | None = None, size: int = 32, num_train: int = DEFAULT_NUM_TRAIN,
                  num_val: int = DEFAULT_NUM_VAL, seed: int = 0) -> Path:
    """``mixedae-fast make-data``: the embedded set (``embedded``: ``num_train`` / ``num_val`` images) or an
    offline set (``digits``, ``lfw``, ``photos``; the counts do not apply) as an ImageFolder at ``root``
    (default: under ``$MIXEDAE_CACHE``); a folder already written with the same parameters is returned as it is."""
    if name not in EMBEDDED:
        return write_offline_folder(name, root, size=size, seed=seed)
    root = root or default_data_root(size, num_train, num_val, seed)
    return write_image_folder(root, num_train, num_val, size=size, seed=seed)
