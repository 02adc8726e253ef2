"""Webdataset shards through the ``webdataset`` library: the torch loader's contract over tar shards
that may be local, behind a URL or produced by a command.

    loader = ShardLoader("data/train-{000000..000127}.tar", batch_size=256, img_size=224, device="cuda",
                         epoch_size=1_281_167)
    loader = ShardLoader("pipe:aws s3 cp s3://bucket/train-{000..127}.tar -", ...)   # any command's stdout
    loader = ShardLoader("https://host/shards/train-{000..127}.tar", ..., labels=False)

A spec is a comma-separated list of shard URLs; each may use brace ranges (``{000..127}``); local
paths may also be a folder (its ``*.tar``) or a glob. A sample is the files sharing a key in a tar:
its image is the first of ``jpg jpeg png webp`` present (any case); its label the integer in
``cls`` (``labels=False``: no label needed, -1 given — pretraining needs none).

Order: each rank takes shards ``rank::num_shards`` (so there must be at least as many shards as
ranks), shuffles their order per epoch with ``(seed, epoch)`` and samples through a shuffle buffer
keyed the same way; with ``num_workers`` > 0 the workers split the rank's shards. An epoch is
``epoch_size // (batch_size * num_shards)`` full batches per rank: ``epoch_size`` (all ranks' samples)
must be given for remote shards; for local ones it is counted from the tar headers. Augmentation is
RandomResizedCrop + flip keyed by (seed, epoch, position in the rank's stream), as the file loader's.
A rank whose shards hold fewer samples than its share makes another (reshuffled) pass to fill the
epoch; a pass that yields no sample at all is an error naming the shards (never an endless loop).
A resume (``set_epoch(epoch, skip)``) replays the epoch's stream and drops the first ``skip``
batches: the same batches again (the workers' streams interleave in a fixed order).
"""
from __future__ import annotations

import glob
import os
import random
import tarfile
from pathlib import Path

import torch

from mixedae_fast.pipelines.torch_loader import ImageFileDataset, normalize

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_spec(spec: str | os.PathLike | list) -> list[str]:
    """Shard URLs of a spec: a list, or a comma-separated string with brace ranges; local folders
    give their ``*.tar`` and local globs their matches, sorted."""
    from braceexpand import braceexpand

    items = [str(s) for s in spec] if isinstance(spec, (list, tuple)) else [s for s in str(spec).split(",") if s]
    urls: list[str] = []
    for item in items:
        for url in braceexpand(item.strip()):
            if url.startswith(("pipe:", "http://", "https://", "gs://", "s3://")):
                urls.append(url)
            elif os.path.isdir(url):
                urls += sorted(str(p) for p in Path(url).glob("*.tar"))
            elif any(c in url for c in "*?["):
                urls += sorted(glob.glob(url))
            else:
                if not os.path.isfile(url):
                    raise ValueError(f"webdataset shard {url!r}: no such file (a spec is paths, globs, brace "
                                     "ranges, http(s):// URLs or pipe:COMMAND, comma-separated)")
                urls.append(url)
    if not urls:
        raise ValueError(f"webdataset spec {str(spec)!r} names no shard")
    return urls


def count_local_samples(urls: list[str]) -> int:
    """Samples (keys with an image) in local tars, from their headers only."""
    total = 0
    for url in urls:
        if not os.path.isfile(url):
            raise ValueError(f"{url}: the sample count of a remote shard cannot be read; pass epoch_size "
                             "(data.epoch_size: the number of samples in all shards)")
        keys = set()
        with tarfile.open(url, "r:*") as tar:
            for member in tar:
                stem, _, ext = member.name.rpartition(".")
                if member.isfile() and ext.lower() in IMAGE_KEYS:
                    keys.add(stem)
        total += len(keys)
    return total


def _image_and_label(sample: dict, labels: bool) -> tuple[bytes, int]:
    lowered = {k.lower(): v for k, v in sample.items()}
    image = next((lowered[k] for k in IMAGE_KEYS if k in lowered), None)
    if image is None:
        raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has no image "
                         f"({', '.join(IMAGE_KEYS)}); it has {sorted(k for k in sample if not k.startswith('__'))}")
    if not labels:
        return image, -1
    if "cls" not in lowered:
        raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has no .cls label; "
                         "for unlabelled shards set data.labels=none")
    return image, int(bytes(lowered["cls"]).decode().strip())


class _Stream(torch.utils.data.IterableDataset):
    """One epoch of one rank's samples: ``(uint8 [3, S, S], label)``."""

    def __init__(self, urls, epoch, seed, img_size, augment, crop_scale, labels, shuffle, buffer):
        self.urls, self.epoch, self.seed, self.labels = urls, epoch, seed, labels
        self.shuffle, self.buffer = shuffle, buffer
        # the file loader's decode + crop + flip, keyed by (seed, epoch, position in this rank's stream)
        self.cropper = ImageFileDataset([], img_size, augment, crop_scale, seed)

    def __iter__(self):
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        i = 0
        # Passes repeat until the loader has its batches: a rank whose shards hold fewer samples than
        # its share still gives a full epoch (each pass reshuffled).
        for rep in range(1 << 30):
            urls = list(self.urls)
            if self.shuffle:
                random.Random(f"{self.seed}:{self.epoch}:{rep}:shards").shuffle(urls)
            urls = urls[wid::nw]
            if not urls:
                return
            stream = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                    empty_check=False)
            if self.shuffle:
                stream = stream.shuffle(self.buffer, rng=random.Random(f"{self.seed}:{self.epoch}:{rep}:{wid}"))
            before = i
            for sample in stream:
                data, label = _image_and_label(sample, self.labels)
                yield self.cropper.crop(data, self.epoch, i * nw + wid), label
                i += 1
            if i == before:
                # Another pass over shards that gave nothing gives nothing again: without this the
                # epoch's refill loop would spin for ever (data.epoch_size set, shards empty).
                raise ValueError(f"webdataset shards {', '.join(urls)}: no sample in them (empty tars, or no "
                                 f"{'/'.join(IMAGE_KEYS)} member); point data.path at shards holding images, or "
                                 "remove the empty ones from the spec")


class ShardLoader:
    """``FileImageLoader``'s contract (``len``, ``set_epoch(epoch, skip)``, batches of normalised
    ``images`` on ``device`` and ``labels``) over webdataset shards; see the module doc."""

    def __init__(self, spec, batch_size: int, img_size: int, device="cpu", dtype=torch.float32,
                 augment: bool = True, crop_scale=(0.2, 1.0), seed: int = 0, shuffle: bool = True,
                 num_workers: int = 0, shard_id: int = 0, num_shards: int = 1, epoch_size: int | None = None,
                 labels: bool = True, shuffle_buffer: int = 1000):
        urls = expand_spec(spec)
        if len(urls) < num_shards:
            raise ValueError(f"{len(urls)} webdataset shards for {num_shards} ranks: every rank needs a shard of "
                             "its own; split the data into more shards")
        self.urls = urls[shard_id::num_shards]
        total = epoch_size if epoch_size is not None else count_local_samples(urls)
        self.num_batches = total // (batch_size * num_shards)
        if self.num_batches == 0:
            raise ValueError(f"{total} samples give rank {shard_id} of {num_shards} no batch of {batch_size}")
        self.device, self.dtype = torch.device(device), dtype
        self.batch_size, self.num_workers = batch_size, num_workers
        self.kw = dict(seed=seed, img_size=img_size, augment=augment, crop_scale=tuple(crop_scale), labels=labels,
                       shuffle=shuffle, buffer=shuffle_buffer)
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        stream = _Stream(self.urls, self.epoch, **self.kw)
        loader = torch.utils.data.DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                                             drop_last=True, pin_memory=self.device.type == "cuda")
        skip, self.start_step = self.start_step, 0
        for b, (images, labels) in enumerate(loader):
            if b >= self.num_batches:
                break
            if b < skip:
                continue
            x = images.to(self.device, non_blocking=True).float().div_(255)
            yield normalize(x).to(self.dtype), labels.to(self.device, non_blocking=True)
