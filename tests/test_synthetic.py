"""The embedded synthetic dataset: shapes, determinism, balance, colour-blind classes, ImageFolder writing."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mixedae_fast.pipelines import synthetic
from mixedae_fast.pipelines.synthetic import (
    CLASSES,
    IMAGENET_MEAN,
    SyntheticTensors,
    default_data_root,
    generate_images,
    write_image_folder,
)


def _nearest_centroid_accuracy(f_train, y_train, f_test, y_test) -> float:
    centroids = np.stack([f_train[y_train == c].mean(0) for c in range(len(CLASSES))])
    pred = ((f_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((pred == y_test).mean())


def _power_spectrum(images: np.ndarray) -> np.ndarray:
    """Log power spectrum of the contrast-normalised grayscale image: invariant to position (a shift
    only changes phase) and to the colours up to contrast, so it sees shape and texture only."""
    g = images.astype(np.float32).mean(-1)
    g = (g - g.mean((1, 2), keepdims=True)) / (g.std((1, 2), keepdims=True) + 1e-3)
    return np.log1p(np.abs(np.fft.fft2(g)) ** 2).reshape(len(images), -1)


def test_classes_are_sorted_for_imagefolder():
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10
    assert tuple(sorted(CLASSES)) == CLASSES   # ImageFolder sorts folder names: same label indices


@pytest.mark.parametrize("size", [32, 64, 96, 224])
def test_shapes_and_dtypes(size):
    images, labels = generate_images(12, size=size, seed=3)
    assert images.shape == (12, size, size, 3) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(CLASSES)
    assert images.std() > 10   # not blank


def test_deterministic_and_prefix():
    a, la = generate_images(37, seed=5)
    b, lb = generate_images(37, seed=5)
    assert a.tobytes() == b.tobytes() and np.array_equal(la, lb)
    c, lc = generate_images(13, seed=5)
    assert np.array_equal(a[:13], c) and np.array_equal(la[:13], lc)


def test_prefix_across_chunks_at_224():
    # 224 px renders in chunks of 20 images: a prefix must not depend on the chunking
    a, la = generate_images(23, size=224, seed=1)
    b, lb = generate_images(3, size=224, seed=1)
    assert np.array_equal(a[:3], b) and np.array_equal(la[:3], lb)


def test_seeds_and_splits_differ():
    a, _ = generate_images(20, seed=0)
    b, _ = generate_images(20, seed=1)
    v, _ = generate_images(20, seed=0, split="val")
    assert not np.array_equal(a, b) and not np.array_equal(a, v)
    assert all(not np.array_equal(a[i], b[i]) for i in range(20))


def test_balanced_and_class_subset():
    _, labels = generate_images(1000, seed=2)
    assert np.bincount(labels, minlength=10).tolist() == [100] * 10
    _, labels = generate_images(1003, seed=2)
    counts = np.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    assert not np.array_equal(labels[:10], labels[10:20])   # shuffled, not i % 10
    _, labels = generate_images(30, seed=2, classes=[1, 4, 7])
    assert sorted(set(labels.tolist())) == [1, 4, 7] and np.bincount(labels).max() == 10
    with pytest.raises(ValueError, match="classes"):
        generate_images(4, classes=[10])
    with pytest.raises(ValueError, match="split"):
        generate_images(4, split="test")


def test_colour_does_not_determine_class_but_shape_does():
    x_train, y_train = generate_images(1000, seed=0)
    x_test, y_test = generate_images(500, seed=0, split="val")
    mean_rgb = lambda x: x.reshape(len(x), -1, 3).mean(1)
    colour_acc = _nearest_centroid_accuracy(mean_rgb(x_train), y_train, mean_rgb(x_test), y_test)
    assert colour_acc < 0.35, colour_acc   # chance is 0.10; measured 0.11 (seeds 0, 1)
    shape_acc = _nearest_centroid_accuracy(_power_spectrum(x_train), y_train, _power_spectrum(x_test), y_test)
    assert shape_acc > 0.75, shape_acc     # measured 0.92-0.93 (seeds 0, 1): texture classes


def test_synthetic_tensors():
    ds = SyntheticTensors(20, size=32, seed=4)
    assert len(ds) == 20 and ds.images.shape == (20, 32, 32, 3) and ds.images.dtype == np.uint8
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
    expect = (ds.images[3, 0, 0, 0] / 255 - IMAGENET_MEAN[0]) / 0.229
    assert x[0, 0, 0].item() == pytest.approx(expect, abs=1e-5)
    assert np.array_equal(ds.images, generate_images(20, 32, 4)[0])


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXEDAE_CACHE", str(tmp_path))
    assert default_data_root(32, 100, 20, seed=1) == tmp_path / f"synthetic-v{synthetic.VERSION}-32px-100-20-s1"


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_cache_variable_counts_as_unset(monkeypatch, tmp_path, empty):
    """``MIXEDAE_CACHE=`` (set, empty) put the data sets in whatever folder the command ran in."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MIXEDAE_CACHE", empty)
    root = default_data_root(32, 100, 20, seed=1)
    assert root.is_absolute() and root.parent == tmp_path / ".cache" / "mixedae_fast"


def _files(root):
    return sorted(p for p in root.rglob("*.jpg"))


def test_write_image_folder_layout_and_cache(tmp_path):
    root = tmp_path / "data"
    assert write_image_folder(root, 30, 20, size=32, seed=0, progress=False) == root
    train, val = _files(root / "train"), _files(root / "val")
    assert len(train) == 30 and len(val) == 20
    assert {p.parent.name for p in train} == set(CLASSES)
    images, labels = generate_images(30, 32, 0)
    for p in train[:5]:
        i = int(p.stem)
        assert p.parent.name == CLASSES[labels[i]]
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"
            decoded = np.asarray(im, dtype=np.float32)
        assert np.abs(decoded - images[i]).mean() < 12   # JPEG q95 of the same image
    marker = json.loads((root / "DONE.json").read_text())
    assert marker["num_train"] == 30 and marker["num_val"] == 20 and marker["classes"] == list(CLASSES)

    mtimes = {p: p.stat().st_mtime_ns for p in _files(root)}
    assert write_image_folder(root, 30, 20, size=32, seed=0, progress=False) == root   # cache hit
    assert {p: p.stat().st_mtime_ns for p in _files(root)} == mtimes
    with pytest.raises(FileExistsError, match="delete it or choose another root"):
        write_image_folder(root, 31, 20, size=32, seed=0, progress=False)
    assert not list(tmp_path.glob("data.tmp-*"))


def test_write_image_folder_refuses_foreign_folder(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(FileExistsError, match="DONE.json"):
        write_image_folder(tmp_path / "data", 10, 10, progress=False)


def test_interrupted_write_leaves_no_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    stale = tmp_path / f"data.tmp-{os.getpid()}"
    (stale / "train" / "junk").mkdir(parents=True)   # left by a dead process with our pid
    real_draw, calls = synthetic._draw, []

    def failing_draw(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:   # the val split: train was already written
            raise KeyboardInterrupt
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_draw", failing_draw)
    with pytest.raises(KeyboardInterrupt):
        write_image_folder(root, 20, 10, progress=False)
    assert not root.exists() and not stale.exists()
    monkeypatch.setattr(synthetic, "_draw", real_draw)
    write_image_folder(root, 20, 10, progress=False)
    assert len(_files(root)) == 30 and not (root / "train" / "junk").exists()
