"""Loaders without DALI, with the loader contract every backend keeps:

    for images, labels in loader:   # images [B, 3, S, S] on the training device, normalised;
        ...                          # fp32 on CPU, bf16/fp16 on GPU; labels int64 [B]

Augmentation (RandomResizedCrop + horizontal flip + normalise) runs batched on the device as one
``grid_sample``. Randomness is a pure function of ``(seed, epoch, index in epoch)``: the order of an
epoch and each batch's crops are redrawn from those alone, so a resumed run continues exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _generator(seed: int, *keys: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, *keys)) & ((1 << 63) - 1))
    return g


def random_resized_crop_flip(images: torch.Tensor, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched RandomResizedCrop (torchvision's area/log-ratio sampling, one draw per image; a crop
    that does not fit is clipped to the image) and a horizontal flip with probability 1/2, as one
    bilinear ``grid_sample``. ``images [B, C, H, W]`` float; returns ``[B, C, size, size]``."""
    B, _, H, W = images.shape
    g = generator
    area = torch.empty(B).uniform_(scale[0], scale[1], generator=g)
    log_r = torch.empty(B).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    aspect = log_r.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)          # fractions of the image width / height
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(B, generator=g) * (1 - w) + w / 2) * 2 - 1   # crop centre in [-1, 1]
    cy = (torch.rand(B, generator=g) * (1 - h) + h / 2) * 2 - 1
    flip = torch.where(torch.rand(B, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, [B, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``[B, C, H, W]`` in [0, 1] -> ImageNet-normalised."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


class TensorBatchLoader:
    """Epoch-exact batches from an in-memory uint8 image array ``[M, H, W, 3]``.

    ``augment=True`` applies RandomResizedCrop(crop_scale) + flip, else a plain resize; batches are
    ``batch_size`` (the last partial batch is dropped when ``drop_last``). ``set_epoch`` /
    ``state_dict`` give the data position; iterating from ``start_step`` skips without loading.
    """

    def __init__(self, images, labels, batch_size: int, img_size: int, device="cpu", dtype=torch.float32,
                 augment: bool = True, crop_scale=(0.2, 1.0), seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        self.images = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()   # uint8 [M, 3, H, W]
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        if len(self.images) < batch_size and drop_last:
            raise ValueError(f"{len(self.images)} images are fewer than one batch of {batch_size}")
        self.batch_size, self.img_size = batch_size, img_size
        self.device, self.dtype = torch.device(device), dtype
        self.augment, self.crop_scale, self.seed = augment, tuple(crop_scale), seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.start_step, "seed": self.seed}

    def __iter__(self):
        n = len(self.images)
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, self.epoch))
        else:
            order = torch.arange(n)
        for i in range(self.start_step, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.load(idx, _generator(self.seed, self.epoch, i)), self.labels[idx].to(self.device)
        self.start_step = 0

    def load(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.images[idx].to(self.device, non_blocking=True).to(torch.float32).div_(255)
        if self.augment:
            x = random_resized_crop_flip(x, self.img_size, self.crop_scale, generator=generator)
        elif x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return normalize(x).to(self.dtype)
