"""The embedded default dataset: procedurally drawn scenes whose class is a texture or shape, never a colour.

Each image is one large object on a plain background. The class (``CLASSES``, ten scene types) fixes
the object's outline and its fill pattern: nine classes are textures (stripes in three orientations,
checks, concentric rings, dots, a mesh, random cells, zigzags) and one is a flat disc, so most
patches of an image show its class. Everything else varies inside a class: extent (60-100% of the
image) and position (inside the image), a small rotation where the pattern allows one, the band
width and phase of the pattern, the hue and lightness of background, object and pattern, a
low-frequency background texture and pixel noise. Colours are muted (saturation <= 0.15) and drawn
independently of the class; lightness contrast, not hue, makes the pattern visible. So colour tells
nothing about the class, and, in mixed pretraining, little about which image a patch came from:
patches are told apart by their texture, which is what the class is.

Why so (a measured choice, ``configs/cpu_tiny.yaml``): with small objects on saturated random-hue
backgrounds (version 1) mean-pooled features of a pretrained tiny ViT were dominated by colour and
kNN stayed at chance; MixedAE's homologous recognition then learned to match patches by colour.

Reproducibility: image ``i`` is a pure function of ``(seed, split, i, size)``. Its parameters come
from ``np.random.default_rng([seed, split, 0, i])`` and do not depend on ``size`` (only the pixel
noise does), so one index draws the same scene at 32 and at 224 px. Labels are balanced in blocks of
``len(classes)`` consecutive indices, each block a permutation drawn from ``[seed, split, 1, block]``;
hence ``generate_images(10)[0][:5] == generate_images(5)[0]``. Rendering is vectorised over the images
of one class in a chunk and uses only correctly rounded float ops (+ - * / sqrt floor, no sin/exp
on pixels), so the bytes do not depend on how images are batched or on numpy's SIMD paths.

    images, labels = generate_images(6000, size=32, seed=0)     # uint8 [6000, 32, 32, 3], int64 [6000]
    root = write_image_folder(default_data_root(), DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL)  # root/{train,val}/<class>/

"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mixedae_fast.choices import EMBEDDED_NUM_TRAIN, EMBEDDED_NUM_VAL
from mixedae_fast.fsutil import cache_root

# Alphabetical, so torchvision's ImageFolder (which sorts folder names) gives the same label indices.
# Nine of the ten classes are a texture that fills a large object, so most patches of an image show
# its class; the tenth ("disc") is the one flat object. Outline and texture go together per class.
CLASSES: tuple[str, ...] = (
    "checkerboard",   # square of checks, rotated up to 10 degrees
    "diagonal",       # disc of +-45 degree stripes
    "disc",           # solid disc
    "dots",           # square of dots on a square lattice, rotated up to 10 degrees
    "grid",           # square of thin lines on a square lattice (a mesh), rotated up to 10 degrees
    "hstripes",       # square of horizontal stripes, rotated up to 10 degrees
    "mosaic",         # square of random two-colour cells, rotated up to 10 degrees
    "ring",           # disc of concentric rings (bands around its centre)
    "vstripes",       # square of vertical stripes, rotated up to 10 degrees
    "zigzag",         # square of zigzag (chevron) stripes, rotated up to 10 degrees
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VERSION = 2
DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL = EMBEDDED_NUM_TRAIN, EMBEDDED_NUM_VAL
SPLITS = {"train": 0, "val": 1}

_NUM_UNIFORMS = 32     # per-image uniform draws; their meaning is fixed by _render
_GRID = 4              # background texture: a 4x4 grid of normals per channel, bilinearly upsampled
_MOSAIC = 16           # mosaic: a 16x16 grid of uniforms per image, for the cells' two colours
_MIN_BAND, _MAX_BAND = 0.065, 0.11   # stripe / check width in image widths (2.1-3.5 px at 32 px)
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
    up = ((u < 0.5) & (v + d <= 0.95)) | (v - d < 0.05)
    return np.clip(np.where(up, v + d, v - d), 0.05, 0.95)


def _bands(t, width, phase):
    """Signed distance (image widths) to the nearest band edge along coordinate ``t``; > 0 in bands A."""
    x = t / (2.0 * width) + phase - 0.25
    h = x - np.floor(x + 0.5)
    return (0.25 - np.abs(h)) * (2.0 * width)


def _lattice(t, period, phase):
    """Distance (image widths) along ``t`` to the nearest point of a lattice with this period."""
    x = t / period + phase
    return np.abs(x - np.floor(x + 0.5)) * period


def _upsample_weights(size: int):
    pos = (np.arange(size) + 0.5) / size * (_GRID - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), _GRID - 2)
    return i0, i0 + 1, (pos - i0).astype(np.float32)


def _render(cls: str, u: np.ndarray, grid: np.ndarray, cells: np.ndarray, noise: np.ndarray,
            size: int) -> np.ndarray:
    """Draw ``b`` scenes of one class. ``u [b, 32]`` and ``cells [b, 16, 16]`` uniforms, ``grid
    [b, 3, 4, 4]`` and ``noise [b, size, size, 3]`` normals. Lengths are in image widths; returns
    float32 [b, size, size, 3] in [0, 1].
    """
    b = len(u)
    col = lambda k: u[:, k].astype(np.float32)[:, None, None]   # noqa: E731 - per-image scalar, broadcast
    coord = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    xs, ys = coord[None, None, :], coord[None, :, None]
    aa = np.float32(size)   # coverage = clip(sd * size + 1/2): a one-pixel linear edge

    # Colours, muted: a greyish background; the object's two colours contrast in lightness with the
    # background and with each other, so the texture (not the hue) is what stands out.
    vb = 0.35 + 0.3 * u[:, 9]
    bg_rgb = _hsv(u[:, 7], 0.12 * u[:, 8], vb)
    h1 = u[:, 10]
    v1 = _contrast(vb, 0.15 + 0.15 * u[:, 12], u[:, 13])
    c1 = _hsv(h1, 0.15 * u[:, 11], v1)
    v2 = _contrast(v1, 0.45 + 0.15 * u[:, 16], u[:, 17])
    c2 = _hsv(np.mod(h1 + 0.5 * (u[:, 14] - 0.5), 1.0), 0.15 * u[:, 15], v2)

    # Background: flat colour + low-frequency texture (bilinear 4x4 grid per channel).
    i0, i1, w = _upsample_weights(size)
    g = grid.astype(np.float32)
    g = g[:, :, i0, :] * (1 - w)[:, None] + g[:, :, i1, :] * w[:, None]          # [b, 3, S, 4]
    g = g[..., i0] * (1 - w) + g[..., i1] * w                                      # [b, 3, S, S]
    amp = (0.03 + 0.05 * u[:, 18]).astype(np.float32)[:, None, None, None]
    img = bg_rgb.astype(np.float32)[:, None, None, :] + amp * g.transpose(0, 2, 3, 1)

    # Object frame: extent s (60-100% of the image), centre with margin s/2, rotation (radians;
    # cos/sin per image only).
    s = 0.6 + 0.4 * col(2)
    cx, cy = s / 2 + (1 - s) * col(0), s / 2 + (1 - s) * col(1)
    max_rot = 0 if cls in ("diagonal", "disc", "ring") else 10
    theta = np.deg2rad(max_rot * (2 * u[:, 3] - 1))
    ct, st = np.cos(theta).astype(np.float32)[:, None, None], np.sin(theta).astype(np.float32)[:, None, None]
    x, y = xs - cx, ys - cy
    xr, yr = ct * x + st * y, ct * y - st * x
    r = np.sqrt(x * x + y * y)
    width = _MIN_BAND + (_MAX_BAND - _MIN_BAND) * col(4)
    phase = col(5)

    half = 0.5 * s
    square = np.minimum(half - np.abs(xr), half - np.abs(yr))
    disc = 0.55 * s - r
    pattern = None
    if cls == "disc":
        sd = disc
    elif cls == "ring":
        sd, pattern = disc, _bands(r, width, phase)
    elif cls == "diagonal":
        sign = np.where(col(6) < 0.5, 1.0, -1.0).astype(np.float32)
        sd, pattern = disc, _bands((x + sign * y) * np.float32(np.sqrt(0.5)), width, phase)
    elif cls == "hstripes":
        sd, pattern = square, _bands(yr, width, phase)
    elif cls == "vstripes":
        sd, pattern = square, _bands(xr, width, phase)
    elif cls == "checkerboard":
        bx, by = _bands(xr, width, phase), _bands(yr, width, col(6))
        sd, pattern = square, np.where(bx * by >= 0, 1, -1) * np.minimum(np.abs(bx), np.abs(by))
    elif cls == "dots":
        period = 3.0 * width
        dx, dy = _lattice(xr, period, phase), _lattice(yr, period, col(6))
        sd, pattern = square, (0.3 + 0.06 * col(26)) * period - np.sqrt(dx * dx + dy * dy)
    elif cls == "grid":
        period = 3.0 * width
        line = (0.1 + 0.04 * col(26)) * period
        dx, dy = _lattice(xr, period, phase), _lattice(yr, period, col(6))
        sd, pattern = square, line - np.minimum(dx, dy)
    elif cls == "zigzag":
        wave = 2.5 * width                                       # zigzag wavelength along x
        t = xr / wave + col(6)
        tri = np.abs(t - np.floor(t + 0.5)) * 2.0                # triangle wave in [0, 1]
        sd, pattern = square, _bands(yr + (0.9 + 0.4 * col(26)) * width * tri, width, phase)
    elif cls == "mosaic":
        cell = 2.0 * width
        ix = np.clip(np.floor(xr / cell + _MOSAIC / 2), 0, _MOSAIC - 1).astype(np.int64)
        iy = np.clip(np.floor(yr / cell + _MOSAIC / 2), 0, _MOSAIC - 1).astype(np.int64)
        v = cells[np.arange(b)[:, None, None], iy, ix]
        sd, pattern = square, np.where(v < 0.5, 1.0, -1.0).astype(np.float32)   # hard cell edges
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
    cells = np.empty((n, _MOSAIC, _MOSAIC))
    noise = np.empty((n, size, size, 3), dtype=np.float32)
    for k in range(n):
        rng = np.random.default_rng([seed, split, 0, start + k])
        u[k] = rng.random(_NUM_UNIFORMS)
        grid[k] = rng.standard_normal((3, _GRID, _GRID))
        cells[k] = rng.random((_MOSAIC, _MOSAIC))
        noise[k] = rng.standard_normal((size, size, 3), dtype=np.float32)
    for c in np.unique(labels):
        sel = np.flatnonzero(labels == c)
        img = _render(CLASSES[c], u[sel], grid[sel], cells[sel], noise[sel], size)
        images[sel] = np.floor(np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return images, labels


def default_data_root(size: int = 32, num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL,
                      seed: int = 0) -> Path:
    """``$MIXEDAE_CACHE`` (default ``~/.cache/mixedae_fast``) /
    ``synthetic-v<VERSION>-<size>px-<num_train>-<num_val>-s<seed>``."""
    return cache_root() / f"synthetic-v{VERSION}-{size}px-{num_train}-{num_val}-s{seed}"


def _check_marker(root: Path, params: dict) -> bool:
    """True if ``root`` holds a finished dataset with ``params``; raises if it holds anything else."""
    marker = root / "DONE.json"
    if not root.exists():
        return False
    if not marker.is_file():
        raise FileExistsError(f"{root} exists but is not a finished dataset folder (no DONE.json); "
                              "delete it or choose another root")
    found = json.loads(marker.read_text())
    if found != params:
        diff = {k: (found.get(k), v) for k, v in params.items() if found.get(k) != v}
        raise FileExistsError(f"{root} holds a dataset with other parameters "
                              f"(found, wanted: {diff}); delete it or choose another root")
    return True


def write_image_folder(root: str | Path, num_train: int, num_val: int, size: int = 32, seed: int = 0,
                       quality: int = 95, progress: bool = True) -> Path:
    """Write ``root/{train,val}/<class name>/<index:06d>.jpg`` (ImageFolder layout) and ``DONE.json``.

    The train and val splits are independent streams of the same seed. The folder appears atomically:
    it is written to ``<root>.tmp-<pid>`` and renamed, with ``DONE.json`` (the parameters) inside. If
    ``root`` already holds the same parameters this returns at once; other contents raise.
    """
    params = {"version": VERSION, "num_train": num_train, "num_val": num_val, "size": size, "seed": seed,
              "quality": quality, "classes": list(CLASSES)}

    def fill(tmp: Path) -> None:
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

    return atomic_dataset_folder(root, params, fill)


def atomic_dataset_folder(root: str | Path, params: dict, fill) -> Path:
    """Make ``root`` appear whole: ``fill(tmp)`` writes into ``<root>.tmp-<pid>``, ``DONE.json``
    (``params``) goes beside it, then one rename. A ``root`` that already holds ``params`` is returned
    at once; other contents raise (:func:`_check_marker`)."""
    root = Path(root).expanduser()
    if _check_marker(root, params):
        return root
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    if tmp.exists():     # left by an earlier process with our pid that died mid-write
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
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
