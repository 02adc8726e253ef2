"""Loaders without DALI, with the loader contract every backend keeps:

    for images, labels in loader:   # images [B, 3, S, S] on the training device, normalised;
        ...                          # fp32 on CPU, bf16/fp16 on GPU; labels int64 [B]

``TensorBatchLoader`` (in-memory uint8 arrays): augmentation (RandomResizedCrop + horizontal flip +
normalise) runs batched on the device as one ``grid_sample``. ``FileImageLoader`` (images in files,
see files.py): a ``DataLoader`` whose workers decode and crop each image with PIL (or, with
``gpu_decode``, ship the bytes for nvJPEG), normalised on the device. In both, randomness is a pure
function of ``(seed, epoch, index)``: the order of an epoch and every crop are redrawn from those
alone, so a resumed run continues exactly. ``FileImageLoader``'s workers run on across epoch
boundaries (:class:`EpochStream`): the next epoch's first batches are decoded while the current
epoch's last ones are consumed, as long as the caller names the next epoch (``set_epoch(e + 1)``).
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from mixedae_fast.errors import RunFailure, worker_error
from mixedae_fast.pipelines.files import (
    describe,
    open_source,
    read_bytes,
    to_rgb,
    verify_sources,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def spread_subset(items: list, limit: int | None) -> list:
    """At most ``limit`` items spread evenly over the list (sorted class folders keep every class)."""
    if limit is None or len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def shard_batches(num: int, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                  drop_last: bool = True) -> list[tuple[int, slice]]:
    """Shard ``shard_id``'s batches of an epoch of ``num`` samples: ``(global batch index, slice of the
    epoch's order)``. Global batch ``j`` (positions ``[j*B, (j+1)*B)``) goes to shard ``j % num_shards``,
    so the i-th batches of all shards are consecutive in the order and the samples of an optimizer step
    (``accum_steps`` batches on each of ``num_shards`` ranks) are the same set however one global batch
    is split. Shards are disjoint and equally long (as ``DistributedSampler``'s): only whole rounds of
    ``num_shards`` batches are dealt; without ``drop_last`` the rest, cut to a multiple of
    ``num_shards``, is dealt sample by sample as one last, partial batch."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
    rounds = num // (batch_size * num_shards)
    out = []
    for r in range(rounds):
        j = r * num_shards + shard_id
        out.append((j, slice(j * batch_size, (j + 1) * batch_size)))
    start = rounds * num_shards * batch_size
    tail = (num - start) // num_shards
    if tail and not drop_last:
        out.append((rounds * num_shards + shard_id, slice(start + shard_id, start + tail * num_shards, num_shards)))
    return out


def _generator(seed: int, *keys: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, *keys)) & ((1 << 63) - 1))
    return g


def random_resized_crop_flip(images: torch.Tensor, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched RandomResizedCrop and a horizontal flip with probability 1/2, as one bilinear
    ``grid_sample``. The crop is drawn as torchvision's: ten tries of area and log-ratio, the first
    that fits the image, else the whole image clipped to ``ratio`` (clipping each draw instead would
    make crops larger: mean area 0.59 instead of 0.54 at scale 0.2-1). ``images [B, C, H, W]`` float;
    returns ``[B, C, size, size]``."""
    B, _, H, W = images.shape
    g = generator
    area = torch.empty(B, 10).uniform_(scale[0], scale[1], generator=g)
    log_r = torch.empty(B, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    aspect = log_r.exp()
    w_try = (area * aspect * H / W).sqrt()               # fractions of the image width / height
    h_try = (area / aspect * W / H).sqrt()
    fits = (w_try <= 1) & (h_try <= 1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)          # the first try that fits
    r = min(max(W / H, ratio[0]), ratio[1])                           # fallback: whole image, ratio clipped
    found = fits.any(dim=1)
    w = torch.where(found, w_try.gather(1, first)[:, 0], torch.tensor(min(1.0, r * H / W)))
    h = torch.where(found, h_try.gather(1, first)[:, 0], torch.tensor(min(1.0, W / (r * H))))
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
    ``shard_id`` of ``num_shards``: this rank's batches (:func:`shard_batches`); a batch's augmentation
    is keyed by its global index, so the shards together draw what one unsharded loader draws.
    """

    def __init__(self, images, labels, batch_size: int, img_size: int, device="cpu", dtype=torch.float32,
                 augment: bool = True, crop_scale=(0.2, 1.0), seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, shard_id: int = 0, num_shards: int = 1):
        self.images = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()   # uint8 [M, 3, H, W]
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self._batches = shard_batches(len(self.images), batch_size, shard_id, num_shards, drop_last)
        if not self._batches:
            raise ValueError(f"{len(self.images)} images are fewer than one batch of {batch_size}"
                             + (f" for each of {num_shards} shards" if num_shards > 1 else "")
                             + "; lower data.batch_size, use fewer ranks, or add images")
        self.batch_size, self.img_size = batch_size, img_size
        self.device, self.dtype = torch.device(device), dtype
        self.augment, self.crop_scale, self.seed = augment, tuple(crop_scale), seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return len(self._batches)

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
        for j, part in self._batches[self.start_step:]:
            idx = order[part]
            yield self.load(idx, _generator(self.seed, self.epoch, j)), self.labels[idx].to(self.device)
        self.start_step = 0

    def load(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.images[idx].to(self.device, non_blocking=True).to(torch.float32).div_(255)
        if self.augment:
            x = random_resized_crop_flip(x, self.img_size, self.crop_scale, generator=generator)
        elif x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return normalize(x).to(self.dtype)


# -- files on disk ----------------------------------------------------------------------------------
#
# FileImageLoader keeps the contract above for images in files (ImageFolder, file list, webdataset;
# see files.py). A sample's augmentation is a pure function of (seed, epoch, sample index): the
# crop box and flip come from a generator seeded by those three, so the batches do not depend on
# the number of workers, and a run resumed at (epoch, step) sees bitwise the same batches.

def random_resized_crop_params(height: int, width: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                               generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """``(top, left, h, w)``: torchvision's ``RandomResizedCrop.get_params`` draw for draw (ten tries
    of area and log-ratio, then a centre crop clipped to ``ratio``), from ``generator``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(seed: int, epoch: int, index: int, height: int, width: int, augment: bool = True,
                  scale=(0.2, 1.0)) -> tuple[tuple[int, int, int, int], bool]:
    """``((top, left, h, w), flip)`` of sample ``index`` in ``epoch``. ``augment=False``: the centred
    square of the shorter side (resize shorter side + centre crop), no flip."""
    if not augment:
        side = min(height, width)
        return ((height - side) // 2, (width - side) // 2, side, side), False
    g = _generator(seed, epoch, index)
    box = random_resized_crop_params(height, width, scale, generator=g)
    return box, bool(torch.rand(1, generator=g).item() < 0.5)


def resized_crop_tensor(image: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """uint8 ``[3, H, W]`` (any device) -> float ``[3, size, size]`` in [0, 1]: crop ``box``, bilinear
    antialiased resize, optional horizontal flip. The device-decode twin of ``ImageFileDataset.crop``."""
    top, left, h, w = box
    x = image[:, top:top + h, left:left + w].unsqueeze(0).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.squeeze(0).clamp_(0, 255).div_(255)
    return x.flip(-1) if flip else x


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(epoch, index)`` keys, a pure function of ``(seed, epoch)`` and the shard: the
    epoch's ``randperm`` dealt to ``num_shards`` shards a batch at a time (:func:`shard_batches`:
    disjoint, equal lengths, the same samples per optimizer step however the global batch is split);
    iteration starts at ``start_step``."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 shard_id: int = 0, num_shards: int = 1):
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = n, batch_size, seed, shuffle, drop_last
        self.shard_id, self.num_shards = shard_id, num_shards
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=_generator(self.seed, epoch)) if self.shuffle else torch.arange(self.n)

    def indices(self, epoch: int) -> torch.Tensor:
        """This shard's sample indices for ``epoch``, in order (the partial last batch included)."""
        order = self._order(epoch)
        parts = shard_batches(self.n, self.batch_size, self.shard_id, self.num_shards, drop_last=False)
        return torch.cat([order[p] for _, p in parts]) if parts else order[:0]

    def __len__(self) -> int:
        return len(shard_batches(self.n, self.batch_size, self.shard_id, self.num_shards, self.drop_last))

    def __iter__(self):
        yield from self._epoch(self.epoch, self.start_step)

    def _epoch(self, epoch: int, start_step: int):
        order = self._order(epoch)
        parts = shard_batches(self.n, self.batch_size, self.shard_id, self.num_shards, self.drop_last)
        for _, part in parts[start_step:]:
            yield [(epoch, j) for j in order[part].tolist()]


class EpochStream(torch.utils.data.Sampler):
    """``sampler``'s batches from ``(epoch, start_step)`` on, then the following epochs from step 0, without
    end: one DataLoader iterator over it keeps its workers busy across epoch boundaries (they prepare the
    next epoch's first batches while the current epoch's last ones are consumed). ``dealt`` is the
    ``(epoch, step)`` of the last batch handed to the workers."""

    def __init__(self, sampler: EpochBatchSampler):
        self.sampler, self.dealt = sampler, None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch, step = self.sampler.epoch, self.sampler.start_step
        while True:
            for batch in self.sampler._epoch(epoch, step):
                self.dealt = (epoch, step)
                yield batch
                step += 1
            epoch, step = epoch + 1, 0


class ImageFileDataset(torch.utils.data.Dataset):
    """``samples [(source, label)]``; item ``(epoch, index)`` -> ``(image, label, index, failed)``.

    ``image`` is uint8 ``[3, S, S]``, decoded and cropped with PIL (``raw=True``: the encoded bytes,
    uint8 ``[nbytes]``, for decoding on the device). A sample that fails to load (a file gone bad
    since verification) is replaced by the next one that loads, with the same crop key, and
    ``failed`` is its index (else -1) so the main process can count it: a bad file never stops an
    epoch. JPEGs are decoded at the smallest DCT scale (1/1..1/8) that keeps the crop at least
    ``S`` px (``jpeg_draft``), which is what makes large photos cheap on the CPU.
    """

    def __init__(self, samples, img_size: int, augment: bool = True, crop_scale=(0.2, 1.0), seed: int = 0,
                 raw: bool = False, jpeg_draft: bool = True, pil_transform=None):
        self.samples, self.img_size, self.augment = list(samples), img_size, augment
        self.crop_scale, self.seed, self.raw, self.jpeg_draft = tuple(crop_scale), seed, raw, jpeg_draft
        self.pil_transform = pil_transform  # (image, epoch, index) -> image after crop + flip (fine-tune RandAugment)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key
        return self.item(epoch, index, self.raw)

    def item(self, epoch: int, index: int, raw: bool):
        n, last = len(self.samples), None
        for attempt in range(min(n, 16)):
            source, label = self.samples[(index + attempt) % n]
            try:
                data = _read(source)
                image = torch.frombuffer(bytearray(data), dtype=torch.uint8) if raw else self.crop(data, epoch, index)
            except UnreadableImage as e:  # the file, not our code: replaced, and counted by the caller
                last = e
                continue
            except AugmentationError as e:
                raise AugmentationError(f"the augmentation {self.pil_transform!r} failed on {describe(source)} "
                                        f"(sample {index}, epoch {epoch}): {e}. The file decoded: this is a bug in "
                                        "the augmentation, not bad data") from e.__cause__
            return image, label, index, (index if attempt else -1)
        raise RunFailure(f"{min(n, 16)} samples in a row failed to load after verification, from "
                         f"{describe(self.samples[index][0])} on (the last: {last}): the data changed or became "
                         "unreachable during the run (deleted, overwritten, unmounted, its permissions changed); "
                         "restore it and run again (a run continues from its newest checkpoint: --run.resume=auto, "
                         "fine-tuning --resume auto)")

    def crop(self, data: bytes, epoch: int, index: int) -> torch.Tensor:
        from PIL import Image

        S = self.img_size
        with _decoding():
            im = Image.open(io.BytesIO(data))
            width, height = im.size
        with im:
            (top, left, h, w), flip = sample_params(self.seed, epoch, index, height, width, self.augment,
                                                    self.crop_scale)
            box = (left, top, left + w, top + h)
            with _decoding():
                if self.jpeg_draft and im.format == "JPEG":
                    im.draft("RGB", (-(-width * S // w), -(-height * S // h)))
                    sx, sy = im.size[0] / width, im.size[1] / height
                    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
                im = to_rgb(im).resize((S, S), Image.BILINEAR, box=box)
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if self.pil_transform is not None:
            try:
                im = self.pil_transform(im, epoch, index)
            except Exception as e:  # noqa: BLE001 - named as the augmentation's failure, whatever it raised
                raise AugmentationError(f"{type(e).__name__}: {str(e).strip()[:300]}") from e
        # numpy's transposing copy: torch's strided uint8 copy is ~50x slower on CPU
        return torch.from_numpy(np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)))


class UnreadableImage(Exception):
    """A sample's file could not be read or decoded (gone, truncated, corrupt since verification)."""


class AugmentationError(RuntimeError):
    """A sample's file decoded, but the augmentation applied to it failed: a bug, named as one (the
    sample is not replaced: every sample would fail the same way)."""


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file it cannot read or decode: OSError (unidentified, truncated, I/O),
    SyntaxError / ValueError / EOFError / struct.error from format plugins on malformed headers and
    chunks, zlib's error on a broken PNG stream, and the decompression-bomb guard."""
    import struct
    import zlib

    from PIL import Image

    return OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError


@contextlib.contextmanager
def _decoding():
    """Turns a decode failure of the file into :class:`UnreadableImage` (anything else passes through)."""
    from PIL import UnidentifiedImageError

    try:
        yield
    except UnidentifiedImageError as e:  # its message names an in-memory buffer, not the file
        raise UnreadableImage("not an image PIL can read") from e
    except _decode_errors() as e:
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e


def _read(source) -> bytes:
    try:
        return read_bytes(source)
    except OSError as e:
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e


def _collate(items):
    images, labels, index, failed = zip(*items)
    images = torch.stack(images) if images[0].dim() == 3 else list(images)
    return images, torch.tensor(labels, dtype=torch.int64), torch.tensor(index), torch.tensor(failed)


def _worker_init(_):
    torch.set_num_threads(1)   # workers run PIL; torch threads would only oversubscribe the cores


def decode_images(blobs: list[torch.Tensor], device) -> list[torch.Tensor | None]:
    """uint8 ``[3, H, W]`` RGB on ``device`` per encoded image: JPEGs through ``torchvision.io.decode_jpeg``
    as one batch (nvJPEG on CUDA), per image if the batch fails; None where it cannot (PNG, CMYK, corrupt)."""
    from mixedae_fast._compat import ensure_torchvision

    ensure_torchvision()
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(blobs)
    jpeg = [i for i, b in enumerate(blobs) if len(b) > 2 and b[0] == 0xFF and b[1] == 0xD8]
    try:
        for i, img in zip(jpeg, decode_jpeg([blobs[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)):
            out[i] = img
    except RuntimeError:
        for i in jpeg:
            try:
                out[i] = decode_jpeg(blobs[i], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                pass
    return out


class FileImageLoader:
    """``TensorBatchLoader``'s contract for images in files: ``path`` read as ``fmt`` (imagefolder |
    filelist | webdataset), checked up front (``verify``: undecodable files are skipped, listed in
    ``self.bad`` and warned about; images smaller than ``img_size`` are counted in ``self.num_small``),
    then decoded and cropped in ``num_workers`` DataLoader workers (uint8), normalised on ``device``.

    Order: ``EpochBatchSampler`` (shard ``shard_id`` of ``num_shards``); augmentation: per-sample
    RandomResizedCrop(``crop_scale``, 3/4-4/3) + flip keyed by (seed, epoch, index), or with
    ``augment=False`` the centre square resized to ``img_size``. ``gpu_decode=True`` (CUDA only) ships
    the encoded bytes and decodes JPEGs in batches with nvJPEG, cropping on the device with the same
    boxes. Files that fail after verification are replaced by another sample and counted in
    ``self.substituted``.
    """

    def __init__(self, path, batch_size: int, img_size: int, device="cpu", dtype=torch.float32,
                 augment: bool = True, crop_scale=(0.2, 1.0), seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, *, fmt: str = "imagefolder", num_workers: int = 0, shard_id: int = 0,
                 num_shards: int = 1, gpu_decode: bool = False, verify: bool | str = True, cache=True,
                 jpeg_draft: bool = True, prefetch_factor: int = 2, limit: int | None = None, pil_transform=None,
                 labels: bool = True):
        self.device, self.dtype = torch.device(device), dtype
        if gpu_decode and self.device.type != "cuda":
            raise ValueError(f"gpu_decode=True decodes with nvJPEG and needs a CUDA device, got {self.device}")
        if gpu_decode and pil_transform is not None:
            raise ValueError("pil_transform runs on PIL images in the workers; it cannot follow gpu_decode=True")
        samples, self.classes = open_source(path, fmt, labels)  # labels=False: any images, labels -1
        self.bad: list[tuple[str, str]] = []
        self.num_small: int | None = None
        self.verify_rate: str | None = None  # "verified ...: N images decoded in T s (R images/s) ..."
        mode = {True: "full", False: "off"}.get(verify, verify)  # data.verify: full | sample | off
        keep, self.bad, checked, cost = verify_sources([s for s, _ in samples], mode, seed, cache,
                                                       f" of {str(path)!r}")
        if checked:
            self.verify_rate = cost.rate_line(str(path))
            self.num_small = sum(min(r[1:]) < img_size for r in checked.values())
            if self.num_small:
                warnings.warn(f"{self.num_small} images smaller than {img_size} px were upscaled "
                              f"(of {len(checked)} checked in {str(path)!r})", stacklevel=2)
            samples = [samples[i] for i in keep]
        samples = spread_subset(samples, limit)
        self.sampler = EpochBatchSampler(len(samples), batch_size, seed, shuffle, drop_last, shard_id, num_shards)
        if len(self.sampler) == 0:
            raise ValueError(f"{len(samples)} usable images in {str(path)!r} give shard {shard_id} of {num_shards} "
                             f"no batch of {batch_size}; lower data.batch_size, use fewer ranks, or add images")
        self.dataset = ImageFileDataset(samples, img_size, augment, crop_scale, seed, gpu_decode, jpeg_draft,
                                        pil_transform)
        self.batch_size, self.img_size, self.seed, self.gpu_decode = batch_size, img_size, seed, gpu_decode
        self.epoch, self.start_step, self.substituted = 0, 0, 0
        self.failed: dict[str, int] = {}
        self.stream = EpochStream(self.sampler)
        self._batches, self._resumes_at = None, None    # the open stream and the (epoch, step) it is at
        self.streams_started = 0                          # > 1 only after resumes or repeats: prefetch thrown away
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.stream, num_workers=num_workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            worker_init_fn=_worker_init if num_workers > 0 else None,
            # its own generator: a DataLoader iterator draws its base seed when it starts (a resume starts one
            # where a continuing run does not), and from the global generator that would shift the caller's draws
            generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.start_step, "seed": self.seed}

    def report(self) -> dict:
        """What was skipped or changed, for the run folder."""
        return {"samples": len(self.dataset), "bad": [list(b) for b in self.bad], "num_small": self.num_small,
                "substituted": self.substituted, "failed_after_verification": dict(self.failed)}

    def __iter__(self):
        # Continue the open stream where it stands (the common case: the epoch after a finished one, its
        # first batches already prepared); anything else (a resume, a repeat) starts one at the position.
        if self._batches is None or self._resumes_at != (self.epoch, self.start_step):
            self.sampler.set_epoch(self.epoch, self.start_step)
            self._batches = iter(self._loader)
            self.streams_started += 1
        self._resumes_at = None                          # mid-epoch until the pass is finished
        for _ in range(len(self) - self.start_step):
            try:
                images, labels, index, failed = next(self._batches)
            except Exception as e:
                original = worker_error(e)   # a worker's error arrives with its traceback as the message
                if original is None:
                    raise
                self._stop_workers()
                raise original from e
            if self.gpu_decode:
                x = self._device_crops(images, labels, index, failed)
            else:
                x = images.to(self.device, non_blocking=True).float().div_(255)
            self._count(failed)
            yield normalize(x).to(self.dtype), labels.to(self.device, non_blocking=True)
        self._resumes_at, self.start_step = (self.epoch + 1, 0), 0

    def _stop_workers(self) -> None:
        """Ends the open stream's workers now. Left to the garbage collector (the raised error's traceback
        holds the stream), they would wait 5 s each: by then the queue that tells them to stop may be closed."""
        batches, self._batches = self._batches, None
        getattr(batches, "_shutdown_workers", lambda: None)()

    def _count(self, failed: torch.Tensor) -> None:
        for i in failed[failed >= 0].tolist():
            self.substituted += 1
            name = describe(self.dataset.samples[i][0])
            if name not in self.failed:
                warnings.warn(f"{name} failed to load after verification; replaced by another sample", stacklevel=3)
            self.failed[name] = self.failed.get(name, 0) + 1

    def _device_crops(self, blobs, labels, index, failed) -> torch.Tensor:
        """Decode ``blobs`` on the device and crop each with its sample's box; what nvJPEG refuses goes
        through the PIL path (same box) with its substitution (``labels``/``failed`` updated in place)."""
        out = []
        for k, (img, i) in enumerate(zip(decode_images(blobs, self.device), index.tolist())):
            if img is None:
                img, labels[k], _, failed[k] = self.dataset.item(self.epoch, i, raw=False)
                out.append(img.to(self.device, non_blocking=True).float().div_(255))
                continue
            box, flip = sample_params(self.seed, self.epoch, i, img.shape[1], img.shape[2], self.dataset.augment,
                                      self.dataset.crop_scale)
            out.append(resized_crop_tensor(img, box, flip, self.img_size))
        return torch.stack(out)
