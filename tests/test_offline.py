"""Offline real datasets written as JPEG folders: layout, counts, stratified split, caching."""
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn", reason="scikit-learn is not installed (the [dev] extra)")
pytest.importorskip("skimage", reason="scikit-image is not installed (the [dev] extra)")

from mixedae_fast.pipelines.files import scan_image_folder  # noqa: E402
from mixedae_fast.pipelines.offline import (  # noqa: E402
    CROPS_PER_PHOTO,
    PHOTOS,
    load_offline,
    stratified_split,
    write_offline_folder,
)


@pytest.mark.parametrize("name, count, classes", [("digits", 1797, 10), ("lfw", 200, 2),
                                                  ("photos", CROPS_PER_PHOTO * len(PHOTOS), len(PHOTOS))])
def test_load_offline(name, count, classes):
    images, labels, names = load_offline(name)
    assert len(images) == len(labels) == count and images.dtype == np.uint8
    assert len(names) == classes and sorted(set(labels.tolist())) == list(range(classes))


def test_stratified_split_is_disjoint_and_keeps_every_class():
    labels = np.repeat(np.arange(5), [3, 10, 10, 20, 1])
    train, val = stratified_split(labels, 0.25, seed=0)
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)
    assert set(labels[val]) == set(range(5))
    assert np.array_equal(stratified_split(labels, 0.25, seed=0)[1], val)


def test_write_digits_folder(tmp_path):
    root = write_offline_folder("digits", tmp_path / "digits", size=16)
    paths, labels, classes = scan_image_folder(root / "train")
    vpaths, _, _ = scan_image_folder(root / "val")
    assert classes == [str(i) for i in range(10)] and len(paths) + len(vpaths) == 1797
    with Image.open(paths[0]) as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    stamp = (root / "DONE.json").stat().st_mtime_ns
    assert write_offline_folder("digits", tmp_path / "digits", size=16) == root
    assert (root / "DONE.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="delete it"):
        write_offline_folder("digits", tmp_path / "digits", size=24)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="choose from digits, lfw, photos"):
        load_offline("mnist")
