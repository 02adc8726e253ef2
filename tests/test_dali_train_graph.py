"""DALI's train graph (random crop fused into the decoder, resize, mirror, normalise) on the CPU: at the
full crop scale a square image comes out whole, so each train image is the eval graph's image or its
mirror image, and over a batch both occur. (Crop areas at the default scale: test_crop_distribution.py.)"""
import pytest
import torch
from tolerances import tol

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'mixedae_fast[dali-cu13]')")

from mixedae_fast.pipelines.dali import DaliLoader  # noqa: E402


def _all(loader):
    return torch.cat([images for images, _ in loader])


@pytest.mark.parametrize("seed", [0, 1])
def test_full_scale_train_image_is_the_eval_image_or_its_mirror(image_folder, seed):
    folder = image_folder(10, 20, size=40) / "val"   # 20 square images of 40 px (the embedded scenes, 10 classes)
    evals = _all(DaliLoader(folder, batch_size=20, img_size=40, augment=False, shuffle=False))
    train = _all(DaliLoader(folder, batch_size=20, img_size=40, crop_scale=(1.0, 1.0), shuffle=False, seed=seed))
    assert train.shape == evals.shape == (20, 3, 40, 40)
    # no scene is its own mirror image, so "same" and "mirrored" cannot both hold
    assert ((evals - evals.flip(-1)).abs().amax(dim=(1, 2, 3)) > 0.1).all()
    same = [torch.allclose(t, e, **tol(torch.float32)) for t, e in zip(train, evals)]
    mirrored = [torch.allclose(t, e.flip(-1), **tol(torch.float32)) for t, e in zip(train, evals)]
    assert all(s or m for s, m in zip(same, mirrored))      # RGB as the eval graph, no other change
    assert 0 < sum(mirrored) < 20                           # the coin is flipped per image
