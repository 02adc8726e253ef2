"""RandomResizedCrop's crop-area distribution, the same in every loader: the in-memory loader's batched
``random_resized_crop_flip`` and DALI's train graph against torchvision's ``RandomResizedCrop`` (the
crops MAE trains on), by a two-sample Kolmogorov-Smirnov distance over 2,000 draws with fixed seeds.

The crop is read off the output: the input is a ramp (red = 4·x, green = 4·y), which a bilinear
resize keeps linear inside the crop, so the ramp's slope in the output gives the crop's width and
height. With 2,000 draws per side, two samples of one distribution lie within KS 0.062 of each other
at p = 0.001; the ruler adds about 0.02 (measured: torchvision's outputs read this way against its
own drawn boxes). Clipping each draw to the image instead of retrying, as the in-memory loader once
did, is KS 0.13 from torchvision.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from mixedae_fast.pipelines.torch_loader import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_flip

W, S, DRAWS, KS_MAX = 64, 16, 2000, 0.07
SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


def ramp() -> torch.Tensor:
    """``[3, W, W]`` float: red 4·x, green 4·y, blue 0 (0..252, exact in uint8)."""
    y, x = torch.meshgrid(torch.arange(W), torch.arange(W), indexing="ij")
    return torch.stack([x, y, torch.zeros_like(x)]).float() * 4


def crop_areas(out: torch.Tensor) -> np.ndarray:
    """Area fractions of the crops behind ``out [B, 3, S, S]`` (ramp units): the slope between output
    columns (rows) 3 and S-4, away from the borders a resize filter clamps; a mirror flips its sign."""
    a, b = 3, S - 4
    inner = slice(a, b + 1)
    width = (out[:, 0, inner, b] - out[:, 0, inner, a]).abs().mean(1) / (b - a) / 4 * S / W
    height = (out[:, 1, b, inner] - out[:, 1, a, inner]).mean(1) / (b - a) / 4 * S / W
    return (width * height).numpy()


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, x, "right") / len(a) - np.searchsorted(b, x, "right") / len(b)).max())


@pytest.fixture(scope="module")
def torchvision_areas() -> np.ndarray:
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    image = torch.zeros(3, W, W)
    boxes = [RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(DRAWS)]
    return np.array([h * w / (W * W) for _, _, h, w in boxes])


def test_the_ruler_reads_known_crops():
    """Fixed area and ratio 1: the ruler reads back the area (to 1%), mirrored or not."""
    images = ramp()[None].expand(64, -1, -1, -1)
    for area in (0.25, 0.6, 1.0):
        out = random_resized_crop_flip(images, S, scale=(area, area), ratio=(1.0, 1.0),
                                       generator=torch.Generator().manual_seed(0))
        assert crop_areas(out) == pytest.approx(np.full(64, area), rel=0.01)


def test_in_memory_loader_crops_as_torchvision(torchvision_areas):
    out = random_resized_crop_flip(ramp()[None].expand(DRAWS, -1, -1, -1), S, SCALE, RATIO,
                                   generator=torch.Generator().manual_seed(1))
    assert ks_distance(crop_areas(out), torchvision_areas) < KS_MAX


def test_dali_train_graph_crops_as_torchvision(torchvision_areas, tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from mixedae_fast.pipelines.dali import DaliLoader

    (tmp_path / "c").mkdir()
    Image.fromarray(ramp().permute(1, 2, 0).numpy().astype(np.uint8)).save(tmp_path / "c" / "ramp.png")
    loader = DaliLoader(tmp_path, batch_size=250, img_size=S, crop_scale=SCALE, files=["c/ramp.png"] * DRAWS,
                        labels=[0] * DRAWS, seed=0, num_threads=2)
    out = torch.cat([images for images, _ in loader])
    assert out.shape[0] == DRAWS
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    assert ks_distance(crop_areas(out * std + mean), torchvision_areas) < KS_MAX

