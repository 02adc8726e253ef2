"""The embedded default dataset: procedurally drawn scenes whose class is a shape or texture, never a colour.

Each image is one object on a textured background. The class (``CLASSES``, ten scene types) fixes
the object's outline and its fill pattern; everything else varies inside a class: position (anywhere,
with a margin), extent (30-70% of the image), a small rotation where the shape allows one, the hues
and lightness of background, object and pattern, a low-frequency background texture, pixel noise,
and (half the time) a small soft blob as a distractor behind the object. Colours are drawn
independently of the class, so a model has to learn shape and texture to tell classes apart.

Reproducibility: image ``i`` is a pure function of ``(seed, split, i, size)``. Its parameters come
from ``np.random.default_rng([seed, split, 0, i])`` and do not depend on ``size`` (only the pixel
noise does), so one index draws the same scene at 32 and at 224 px. Labels are balanced in blocks of
``len(classes)`` consecutive indices, each block a permutation drawn from ``[seed, split, 1, block]``;
hence ``generate_images(10)[0][:5] == generate_images(5)[0]``. Rendering is vectorised over the images
of one class in a chunk and uses only correctly rounded float ops (+ - * / sqrt floor, no sin/exp
on pixels), so the bytes do not depend on how images are batched or on numpy's SIMD paths.

    images, labels = generate_images(6000, size=32, seed=0)     # uint8 [6000, 32, 32, 3], int64 [6000]
    root = write_image_folder(default_data_root(), 5000, 1000)  # root/{train,val}/<class>/<i>.jpg
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Alphabetical, so torchvision's ImageFolder (which sorts folder names) gives the same label indices.
CLASSES: tuple[str, ...] = (
    "checkerboard",   # square patch, checkerboard fill
    "concentric",     # disc of concentric bands
    "cross",          # solid plus sign, rotated up to 15 degrees
    "diagonal",       # disc filled with +-45 degree stripes
    "disc",           # solid disc
    "hstripes",       # square patch, horizontal stripes
    "ring",           # hollow annulus
    "square",         # solid square, rotated up to 20 degrees
    "triangle",       # solid equilateral triangle pointing up, rotated up to 20 degrees
    "vstripes",       # square patch, vertical stripes
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VERSION = 1
DEFAULT_NUM_TRAIN = 5000
DEFAULT_NUM_VAL = 1000
SPLITS = {"train": 0, "val": 1}

_NUM_UNIFORMS = 32     # per-image uniform draws; their meaning is fixed by _render
_GRID = 4              # background texture: a 4x4 grid of normals per channel, bilinearly upsampled
_MIN_BAND = 0.07       # narrowest stripe, in image widths (2.2 px at 32 px), so patterns survive patch 4
_PIXEL_NOISE = 0.02
_CHUNK_PIXELS = 1 << 20


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split]


def _labels(start: int, stop: int, seed: int, split: int, classes: np.ndarray) -> np.ndarray:
    """Labels of indices ``start..stop-1``, balanced: each block of ``len(classes)`` consecutive indices
    (from 0) holds every class once, in an order drawn from ``[seed, split, 1, block]``."""
    c = len(classes)
    first, last = start // c, -(-stop // c)
    blocks = [np.random.default_rng([seed, split, 1, b]).permutation(c) for b in range(first, last)]
    order = np.concatenate(blocks)[start - first * c:stop - first * c] if blocks else np.zeros(0, np.int64)
    return classes[order].astype(np.int64)


def _hsv(h, s, v):
    """HSV in [0, 1] -> RGB [..., 3], with basic float ops only."""
    k = np.mod(np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0, 6.0)
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _contrast(v, d, u):
    """A lightness ``d`` away from ``v``: up or down at random (``u``), the other way if out of range."""
    up = ((u < 0.5) & (v + d <= 1.0)) | (v - d < 0.05)
    return np.clip(np.where(up, v + d, v - d), 0.05, 1.0)


def _bands(t, width, phase):
    """Signed distance (image widths) to the nearest band edge along coordinate ``t``; > 0 in bands A."""
    x = t / (2.0 * width) + phase - 0.25
    h = x - np.floor(x + 0.5)
    return (0.25 - np.abs(h)) * (2.0 * width)


def _upsample_weights(size: int):
    pos = (np.arange(size) + 0.5) / size * (_GRID - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), _GRID - 2)
    return i0, i0 + 1, (pos - i0).astype(np.float32)


def _render(cls: str, u: np.ndarray, grid: np.ndarray, noise: np.ndarray, size: int) -> np.ndarray:
    """Draw ``b`` scenes of one class. ``u [b, 32]`` uniforms, ``grid [b, 3, 4, 4]`` and ``noise
    [b, size, size, 3]`` normals. Lengths are in image widths; returns float32 [b, size, size, 3] in [0, 1].
    """
    b = len(u)
    col = lambda k: u[:, k].astype(np.float32)[:, None, None]   # noqa: E731 - per-image scalar, broadcast
    coord = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    xs, ys = coord[None, None, :], coord[None, :, None]
    aa = np.float32(size)   # coverage = clip(sd * size + 1/2): a one-pixel linear edge

    # Colours: background, object (hue far from the background's, lightness contrasting), pattern.
    vb = 0.15 + 0.75 * u[:, 9]
    bg_rgb = _hsv(u[:, 7], 0.25 + 0.6 * u[:, 8], vb)
    h1 = np.mod(u[:, 7] + 0.2 + 0.6 * u[:, 10], 1.0)
    v1 = _contrast(vb, 0.35 + 0.35 * u[:, 12], u[:, 13])
    c1 = _hsv(h1, 0.4 + 0.6 * u[:, 11], v1)
    v2 = _contrast(v1, 0.3 + 0.3 * u[:, 16], u[:, 17])
    c2 = _hsv(np.mod(h1 + 0.25 + 0.5 * u[:, 14], 1.0), 0.4 + 0.6 * u[:, 15], v2)

    # Background: flat colour + low-frequency texture (bilinear 4x4 grid per channel).
    i0, i1, w = _upsample_weights(size)
    g = grid.astype(np.float32)
    g = g[:, :, i0, :] * (1 - w)[:, None] + g[:, :, i1, :] * w[:, None]          # [b, 3, S, 4]
    g = g[..., i0] * (1 - w) + g[..., i1] * w                                      # [b, 3, S, S]
    amp = (0.04 + 0.08 * u[:, 18]).astype(np.float32)[:, None, None, None]
    img = bg_rgb.astype(np.float32)[:, None, None, :] + amp * g.transpose(0, 2, 3, 1)

    # Distractor: a soft polynomial blob, half the time, behind the object.
    dx, dy = xs - (0.05 + 0.9 * col(19)), ys - (0.05 + 0.9 * col(20))
    rho = 0.06 + 0.06 * col(21)
    blob = np.clip(1.0 - (dx * dx + dy * dy) / (rho * rho), 0.0, 1.0)
    blob = 0.85 * blob * blob * (col(22) < 0.5)
    blob_rgb = _hsv(u[:, 23], 0.5 + 0.5 * u[:, 24], 0.2 + 0.8 * u[:, 25]).astype(np.float32)
    img += blob[..., None] * (blob_rgb[:, None, None, :] - img)

    # Object frame: extent s, centre with margin s/2, rotation (radians; cos/sin per image only).
    s = 0.3 + 0.4 * col(2)
    cx, cy = s / 2 + (1 - s) * col(0), s / 2 + (1 - s) * col(1)
    max_rot = {"square": 20, "triangle": 20, "cross": 15, "hstripes": 10, "vstripes": 10,
               "checkerboard": 10}.get(cls, 0)
    theta = np.deg2rad(max_rot * (2 * u[:, 3] - 1))
    ct, st = np.cos(theta).astype(np.float32)[:, None, None], np.sin(theta).astype(np.float32)[:, None, None]
    x, y = xs - cx, ys - cy
    xr, yr = ct * x + st * y, ct * y - st * x
    r = np.sqrt(x * x + y * y)
    width = np.maximum(s / (5.0 + 3.0 * col(4)), _MIN_BAND)
    phase = col(5)

    half = 0.425 * s   # half side of squares: the rotated square stays about inside the margin
    square = np.minimum(half - np.abs(xr), half - np.abs(yr))
    pattern = None
    if cls == "disc":
        sd = s / 2 - r
    elif cls == "ring":
        thick = (0.3 + 0.15 * col(6)) * s / 2
        sd = thick / 2 - np.abs(r - (s / 2 - thick / 2))
    elif cls == "square":
        sd = square
    elif cls == "cross":
        arm = (0.28 + 0.12 * col(6)) * s / 2
        sd = np.maximum(np.minimum(s / 2 - np.abs(xr), arm - np.abs(yr)),
                        np.minimum(arm - np.abs(xr), s / 2 - np.abs(yr)))
    elif cls == "triangle":
        circum = 1.05 * s / np.sqrt(np.float32(3.0))
        yt = yr - circum / 4          # centre the bounding box, not the centroid
        k = np.float32(np.sqrt(3.0) / 2)
        sd = np.minimum(np.minimum(circum / 2 - yt, circum / 2 - (k * xr - 0.5 * yt)),
                        circum / 2 - (-k * xr - 0.5 * yt))
    elif cls == "hstripes":
        sd, pattern = square, _bands(yr, width, phase)
    elif cls == "vstripes":
        sd, pattern = square, _bands(xr, width, phase)
    elif cls == "checkerboard":
        bx, by = _bands(xr, width, phase), _bands(yr, width, col(6))
        sd, pattern = square, np.where(bx * by >= 0, 1, -1) * np.minimum(np.abs(bx), np.abs(by))
    elif cls == "diagonal":
        sign = np.where(col(6) < 0.5, 1.0, -1.0).astype(np.float32)
        sd = s / 2 - r
        pattern = _bands((x + sign * y) * np.float32(np.sqrt(0.5)), width, phase)
    elif cls == "concentric":
        sd, pattern = s / 2 - r, _bands(r, width, 0.0)
    else:
        raise ValueError(f"unknown class {cls!r}")

    c1 = c1.astype(np.float32)[:, None, None, :]
    if pattern is None:
        obj = np.broadcast_to(c1, img.shape)
    else:
        p = np.clip(pattern * aa + 0.5, 0.0, 1.0)[..., None]
        c2 = c2.astype(np.float32)[:, None, None, :]
        obj = c2 + p * (c1 - c2)
    cover = np.clip(sd * aa + 0.5, 0.0, 1.0)[..., None]
    img += cover * (obj - img)
    img += np.float32(_PIXEL_NOISE) * noise
    assert img.shape == (b, size, size, 3) and img.dtype == np.float32
    return img


def generate_images(num: int, size: int = 32, seed: int = 0, classes: Sequence[int] | None = None, *,
                    split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``num`` scenes at ``size`` px: ``(uint8 [num, size, size, 3] RGB, int64 labels [num])``.

    ``classes`` restricts the scene types (indices into ``CLASSES``; labels keep those indices).
    ``split`` picks an independent stream ("train" or "val") for the same seed. Image ``i`` depends
    only on ``(seed, split, i, size)``; labels are balanced (exactly when ``num`` is a multiple of the
    number of classes, else within one).
    """
    if num < 0 or size < 8:
        raise ValueError(f"need num >= 0 and size >= 8, got num={num}, size={size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    cls_ids = np.arange(len(CLASSES)) if classes is None else np.asarray(list(classes), dtype=np.int64)
    if cls_ids.size == 0 or cls_ids.min() < 0 or cls_ids.max() >= len(CLASSES):
        raise ValueError(f"classes must be indices into CLASSES (0..{len(CLASSES) - 1}), got {classes}")
    sid = _split_id(split)
    images = np.empty((num, size, size, 3), dtype=np.uint8)
    labels = np.empty(num, dtype=np.int64)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, num, chunk):
        stop = min(num, start + chunk)
        images[start:stop], labels[start:stop] = _draw(start, stop, size, seed, sid, cls_ids)
    return images, labels


def _draw(start: int, stop: int, size: int, seed: int, split: int, classes: np.ndarray):
    """Images and labels ``start..stop-1`` of the stream ``(seed, split)``, drawing only those."""
    labels = _labels(start, stop, seed, split, classes)
    n = stop - start
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    u = np.empty((n, _NUM_UNIFORMS))
    grid = np.empty((n, 3, _GRID, _GRID))
    noise = np.empty((n, size, size, 3), dtype=np.float32)
    for k in range(n):
        rng = np.random.default_rng([seed, split, 0, start + k])
        u[k] = rng.random(_NUM_UNIFORMS)
        grid[k] = rng.standard_normal((3, _GRID, _GRID))
        noise[k] = rng.standard_normal((size, size, 3), dtype=np.float32)
    for c in np.unique(labels):
        sel = np.flatnonzero(labels == c)
        img = _render(CLASSES[c], u[sel], grid[sel], noise[sel], size)
        images[sel] = np.floor(np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return images, labels


def default_data_root(size: int = 32, num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL,
                      seed: int = 0) -> Path:
    """``$MIXEDAE_CACHE`` (default ``~/.cache/mixedae_fast``) /
    ``synthetic-v1-<size>px-<num_train>-<num_val>-s<seed>``."""
    cache = Path(os.environ.get("MIXEDAE_CACHE", "~/.cache/mixedae_fast")).expanduser()
    return cache / f"synthetic-v{VERSION}-{size}px-{num_train}-{num_val}-s{seed}"


def _check_marker(root: Path, params: dict) -> bool:
    """True if ``root`` holds a finished dataset with ``params``; raises if it holds anything else."""
    marker = root / "DONE.json"
    if not root.exists():
        return False
    if not marker.is_file():
        raise FileExistsError(f"{root} exists but is not a finished synthetic dataset (no DONE.json); "
                              "delete it or choose another root")
    found = json.loads(marker.read_text())
    if found != params:
        diff = {k: (found.get(k), v) for k, v in params.items() if found.get(k) != v}
        raise FileExistsError(f"{root} holds a synthetic dataset with other parameters "
                              f"(found, wanted: {diff}); delete it or choose another root")
    return True


def write_image_folder(root: str | Path, num_train: int, num_val: int, size: int = 32, seed: int = 0,
                       quality: int = 95, progress: bool = True) -> Path:
    """Write ``root/{train,val}/<class name>/<index:06d>.jpg`` (ImageFolder layout) and ``DONE.json``.

    The train and val splits are independent streams of the same seed. The folder appears atomically:
    it is written to ``<root>.tmp-<pid>`` and renamed, with ``DONE.json`` (the parameters) inside. If
    ``root`` already holds the same parameters this returns at once; other contents raise.
    """
    root = Path(root).expanduser()
    params = {"version": VERSION, "num_train": num_train, "num_val": num_val, "size": size, "seed": seed,
              "quality": quality, "classes": list(CLASSES)}
    if _check_marker(root, params):
        return root
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    if tmp.exists():     # left by an earlier process with our pid that died mid-write
        shutil.rmtree(tmp)
    try:
        from PIL import Image
        from tqdm import tqdm

        with tqdm(total=num_train + num_val, desc=f"synthetic {size}px", unit="img",
                  disable=not progress) as bar:
            for split, num in (("train", num_train), ("val", num_val)):
                for name in CLASSES:
                    (tmp / split / name).mkdir(parents=True, exist_ok=True)
                chunk = max(1, _CHUNK_PIXELS // (size * size))   # bounded memory at 224 px
                for start in range(0, num, chunk):
                    images, labels = _draw(start, min(num, start + chunk), size, seed, SPLITS[split],
                                           np.arange(len(CLASSES)))
                    for k, (img, lab) in enumerate(zip(images, labels, strict=True)):
                        path = tmp / split / CLASSES[lab] / f"{start + k:06d}.jpg"
                        Image.fromarray(img).save(path, quality=quality)
                    bar.update(len(images))
        (tmp / "DONE.json").write_text(json.dumps(params, indent=1))
        try:
            tmp.rename(root)
        except OSError:
            # Another process finished first: accept its folder if it is the same dataset.
            if not _check_marker(root, params):
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


class SyntheticTensors:
    """In-memory synthetic scenes for quick runs and tests.

    ``ds[i]`` is ``(float32 [3, size, size] ImageNet-normalised, int label)``; ``ds.images`` is the
    uint8 ``[num, size, size, 3]`` array and ``ds.labels`` the int64 labels.
    """

    def __init__(self, num: int, size: int = 32, seed: int = 0, split: str = "train",
                 classes: Sequence[int] | None = None):
        self.images, self.labels = generate_images(num, size, seed, classes, split=split)
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        import torch  # here, not at the top: generating and writing data needs numpy only

        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std, int(self.labels[i])
