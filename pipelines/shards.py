"""Webdataset shards through the ``webdataset`` library: the one tar reader, for every path that reads
shards (training, validation, the kNN bank, and DALI, which it feeds). Shards may be local, behind a
URL or produced by a command.

    loader = ShardLoader("data/train-{000000..000127}.tar", batch_size=256, img_size=224, device="cuda",
                         epoch_size=1_281_167)
    loader = ShardLoader("pipe:aws s3 cp s3://bucket/train-{000..127}.tar -", ...)   # any command's stdout
    loader = ShardLoader("https://host/shards/val-{000..007}.tar", ..., single_pass=True)   # val: each sample once

A spec is a comma-separated list of shard URLs; each may use brace ranges (``{000..127}``); local
paths may also be a folder (its ``*.tar``) or a glob. A sample is the files sharing a key in a tar:
its image is the first of ``jpg jpeg png webp`` present (any case); its label the integer in
``cls`` (``labels=False``: no label needed, -1 given — pretraining needs none).

Training order: each rank takes shards ``rank::num_shards`` (so there must be at least as many shards
as ranks), shuffles their order per epoch with ``(seed, epoch)`` and samples through a shuffle buffer
keyed the same way; with ``num_workers`` > 0 the workers split the rank's shards. An epoch is
``epoch_size // (batch_size * num_shards)`` full batches per rank: ``epoch_size`` (all ranks' samples)
must be given for remote shards; for local ones it is counted from the tar headers. Augmentation is
RandomResizedCrop + flip keyed by (seed, epoch, position in the rank's stream), as the file loader's.
A rank whose shards hold fewer samples than its share makes another (reshuffled) pass to fill the
epoch; a pass that yields no sample at all is an error naming the shards (never an endless loop).
A resume (``set_epoch(epoch, skip)``) replays the epoch's stream and drops the first ``skip``
batches: the same batches again (the workers' streams interleave in a fixed order).

``single_pass=True`` (validation, the kNN bank): every sample once, in shard order, unshuffled, the
last batch partial; ``limit`` keeps the first ``limit`` samples (the bank).

Bad samples. A sample whose image does not decode (not an image, empty, truncated), or that has no
image at all, is skipped, counted and recorded with its shard and key in a :class:`SkipLog` (the run
folder's ``skipped_images.json``). A pass stops with one error once its bad samples exceed
``max_bad_fraction`` of the samples read: checked against ``max(read, 1000)`` while it runs (a few bad
samples early on do not stop it) and against the samples read at its end. A shard that cannot be
read at all (a failing command, a missing URL) is an error naming it.
"""
from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from mixedae_fast.errors import worker_error
from mixedae_fast.fsutil import atomic_write_text
from mixedae_fast.pipelines.torch_loader import ImageFileDataset, UnreadableImage, normalize

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://")
RATE_WINDOW = 1000       # while a pass runs, its bad rate is judged over at least this many samples
DEFAULT_MAX_BAD_FRACTION = 0.01
_SPEC_HINT = "a spec is paths, folders, globs, brace ranges, http(s):// URLs or pipe:COMMAND, comma-separated"


def expand_spec(spec: str | os.PathLike | list) -> list[str]:
    """Shard URLs of a spec: a list, or a comma-separated string with brace ranges; local folders
    give their ``*.tar`` and local globs their matches, sorted."""
    from braceexpand import braceexpand

    items = [str(s) for s in spec] if isinstance(spec, (list, tuple)) else [s for s in str(spec).split(",") if s]
    urls: list[str] = []
    for item in items:
        for url in braceexpand(item.strip()):
            if url.startswith(REMOTE):
                urls.append(url)
                continue
            url = os.path.expanduser(url)
            if os.path.isdir(url):
                urls += sorted(str(p) for p in Path(url).glob("*.tar") if not p.name.startswith("."))
            elif any(c in url for c in "*?["):
                urls += sorted(glob.glob(url))
            elif os.path.isfile(url):
                urls.append(url)
            else:
                raise ValueError(f"webdataset shard {url!r} (from data.path / data.val_path {str(spec)!r}): no such "
                                 f"file; point the spec at existing shards ({_SPEC_HINT})")
    if not urls:
        raise ValueError(f"webdataset spec {str(spec)!r} names no shard (an empty folder or a glob that matches "
                         f"nothing); {_SPEC_HINT}")
    return urls


def count_local_samples(urls: list[str]) -> int:
    """Samples (keys with an image) in local tars, from their headers only."""
    total = 0
    for url in urls:
        if not os.path.isfile(url):
            raise ValueError(f"{url}: the sample count of a remote shard cannot be read; pass epoch_size "
                             "(data.epoch_size: the number of samples in all shards)")
        keys = set()
        try:
            with tarfile.open(url, "r:*") as tar:
                for member in tar:
                    stem, _, ext = member.name.rpartition(".")
                    if member.isfile() and ext.lower() in IMAGE_KEYS:
                        keys.add(stem)
        except tarfile.TarError as e:
            raise ValueError(f"webdataset shard {url}: not a readable tar ({e}); rewrite it with `tar -cf`, or "
                             "remove it from the spec") from None
        total += len(keys)
    return total


class SkipLog:
    """Samples skipped as unreadable, each once: ``(shard, key) -> reason``. Shared by a run's loaders;
    once :meth:`write_to` names a file (the run folder's ``skipped_images.json``), every new entry
    rewrites it (atomically), so the list is on disk even when the run stops on the bad rate."""

    def __init__(self, files: list | None = None):
        self.files = list(files or [])       # (file, reason): found by verifying a folder or file list
        self.samples: dict[tuple[str, str], str] = {}
        self.path: Path | None = None

    def __len__(self) -> int:
        return len(self.files) + len(self.samples)

    def add(self, records) -> None:
        new = [(url, key, why) for url, key, why in records if (url, key) not in self.samples]
        for url, key, why in new:
            self.samples[(url, key)] = why
        if new and self.path is not None:
            self._write()

    def write_to(self, path) -> Path | None:
        """Write the list to ``path`` now (when it is not empty) and after every new entry. A list already
        there (a resumed run's) is kept: its entries are merged in."""
        self.path = Path(path)
        try:
            earlier = json.loads(self.path.read_text())
        except (OSError, ValueError):
            earlier = []
        for e in earlier if isinstance(earlier, list) else []:
            if isinstance(e, dict) and "shard" in e and "key" in e:
                self.samples.setdefault((str(e["shard"]), str(e["key"])), str(e.get("reason", "")))
            elif isinstance(e, dict) and "file" in e and e["file"] not in {str(f) for f, _ in self.files}:
                self.files.append((str(e["file"]), str(e.get("reason", ""))))
        return self._write() if len(self) else None

    def entries(self) -> list[dict]:
        return ([{"file": str(f), "reason": r} for f, r in self.files]
                + [{"shard": u, "key": k, "reason": r} for (u, k), r in self.samples.items()])

    def _write(self) -> Path:
        return atomic_write_text(self.path, json.dumps(self.entries(), indent=1))


def check_encoded(data: bytes) -> None:
    """A cheap check that ``data`` is an image a decoder can take (for DALI, which cannot skip one):
    PIL identifies it and verifies its structure (PNG checksums); a JPEG must hold its end marker (a
    cut one does not). Raises :class:`UnreadableImage`."""
    from PIL import Image

    from mixedae_fast.pipelines.torch_loader import _decoding

    if not data:
        raise UnreadableImage("empty image (0 bytes)")
    with _decoding():
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
    if fmt == "JPEG" and b"\xff\xd9" not in data[-4096:]:
        raise UnreadableImage("JPEG cut short (no end marker)")


def _image_and_label(sample: dict, labels: bool) -> tuple[bytes, int]:
    lowered = {k.lower(): v for k, v in sample.items()}
    image = next((lowered[k] for k in IMAGE_KEYS if k in lowered), None)
    if labels:
        if "cls" not in lowered:
            raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has no .cls label; "
                             "for unlabelled shards set data.labels=none")
        text = bytes(lowered["cls"]).decode(errors="replace").strip()
        try:
            label = int(text)
        except ValueError:
            raise UnreadableImage(f".cls holds {text[:20]!r}, not an integer label") from None
    else:
        label = -1
    if image is None:
        raise UnreadableImage(f"no image ({', '.join(IMAGE_KEYS)}); it has "
                              f"{sorted(k for k in sample if not k.startswith('__'))}")
    return image, label


def _shard_error(e: Exception, urls: list[str]) -> ValueError:
    """A shard the library could not read (it appends the URL to the error's args), as one line."""
    url = next((a for a in reversed(getattr(e, "args", ())) if isinstance(a, str) and a in urls), None)
    why = next((str(a) for a in e.args if isinstance(a, str) and a != url), "") or type(e).__name__
    status = re.search(r"exit (\d+)", why)
    if url and url.startswith("pipe:") and status:
        why = f"the command exited with status {status.group(1)}"
    where = f"webdataset shard {url!r}" if url else f"webdataset shards {', '.join(urls[:3])}"
    return ValueError(f"{where} could not be read ({type(e).__name__}: {why.splitlines()[0][:200]}); check that it "
                      "exists and that its command or URL works on its own (e.g. `curl -s URL | tar t`), or remove it "
                      "from the spec")


class _Batch:
    """What a worker hands over: up to ``batch_size`` samples, the bad samples met since the last batch
    ``(shard, key, reason)`` and how many samples that is in all."""

    def __init__(self, items, labels, keys, bad, raw):
        self.images = items if raw else (torch.stack(items) if items else torch.empty(0, dtype=torch.uint8))
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.keys, self.bad = keys, bad
        self.read = len(labels) + len(bad)

    def pin_memory(self):    # DataLoader(pin_memory=True) calls it on what the workers hand over
        if isinstance(self.images, torch.Tensor):
            self.images = self.images.pin_memory()
        self.labels = self.labels.pin_memory()
        return self


class _Stream(torch.utils.data.IterableDataset):
    """One epoch of one rank's samples, batched: :class:`_Batch` of ``uint8 [3, S, S]`` crops (``raw``:
    the encoded bytes, checked with :func:`check_encoded`)."""

    def __init__(self, urls, epoch, seed, img_size, augment, crop_scale, labels, shuffle, buffer, batch_size,
                 single_pass, raw):
        self.urls, self.epoch, self.seed, self.labels = urls, epoch, seed, labels
        self.shuffle, self.buffer, self.batch_size = shuffle, buffer, batch_size
        self.single_pass, self.raw = single_pass, raw
        # the file loader's decode + crop + flip, keyed by (seed, epoch, position in this rank's stream)
        self.cropper = ImageFileDataset([], img_size, augment, crop_scale, seed)

    def _samples(self, urls, rep, wid):
        import webdataset as wds

        stream = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                empty_check=False)
        if self.shuffle:
            stream = stream.shuffle(self.buffer, rng=random.Random(f"{self.seed}:{self.epoch}:{rep}:{wid}"))
        it = iter(stream)
        while True:
            try:
                sample = next(it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - a shard the library could not open or read
                raise _shard_error(e, urls) from None
            yield sample

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        i = 0
        items, labels, keys, bad = [], [], [], []
        # Passes repeat until the loader has its batches: a rank whose shards hold fewer samples than
        # its share still gives a full epoch (each pass reshuffled). A single pass is one.
        for rep in range(1 if self.single_pass else 1 << 30):
            urls = list(self.urls)
            if self.shuffle:
                random.Random(f"{self.seed}:{self.epoch}:{rep}:shards").shuffle(urls)
            urls = urls[wid::nw]
            if not urls:
                break
            before, bad_before = i, len(bad)
            for sample in self._samples(urls, rep, wid):
                url, key = str(sample.get("__url__")), str(sample.get("__key__"))
                try:
                    data, label = _image_and_label(sample, self.labels)
                    if self.raw:
                        check_encoded(data)
                        item = np.frombuffer(data, dtype=np.uint8).copy()
                    else:
                        item = self.cropper.crop(data, self.epoch, i * nw + wid)
                except UnreadableImage as e:    # the sample, not our code: skipped, and counted by the loader
                    bad.append((url, key, re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))))
                    continue
                items.append(item)
                labels.append(label)
                keys.append((url, key))
                i += 1
                if len(items) == self.batch_size:
                    yield _Batch(items, labels, keys, bad, self.raw)
                    items, labels, keys, bad = [], [], [], []
            if i == before and not self.single_pass:
                if len(bad) > bad_before:
                    break    # every sample bad: the loader stops on the bad rate, naming them
                # Another pass over shards that gave nothing gives nothing again: without this the
                # epoch's refill loop would spin for ever (data.epoch_size set, shards empty).
                raise ValueError(f"webdataset shards {', '.join(urls)}: no sample in them (empty tars, or no "
                                 f"{'/'.join(IMAGE_KEYS)} member); point data.path at shards holding images, or "
                                 "remove the empty ones from the spec")
        if items or bad:    # the partial last batch (training drops it), and bad samples not yet handed over
            yield _Batch(items, labels, keys, bad, self.raw)


def _as_is(batch):
    return batch


class ShardLoader:
    """``FileImageLoader``'s contract (``len``, ``set_epoch(epoch, skip)``, batches of normalised
    ``images`` on ``device`` and ``labels``) over webdataset shards; see the module doc. ``skip_log``:
    where skipped samples are recorded (:class:`SkipLog`, shared by a run's loaders); ``self.skipped``:
    this loader's bad samples in all passes so far."""

    def __init__(self, spec, batch_size: int, img_size: int, device="cpu", dtype=torch.float32,
                 augment: bool = True, crop_scale=(0.2, 1.0), seed: int = 0, shuffle: bool = True,
                 num_workers: int = 0, shard_id: int = 0, num_shards: int = 1, epoch_size: int | None = None,
                 labels: bool = True, shuffle_buffer: int = 1000, single_pass: bool = False,
                 limit: int | None = None, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                 skip_log: SkipLog | None = None):
        urls = expand_spec(spec)
        if len(urls) < num_shards:
            raise ValueError(f"{len(urls)} webdataset shards for {num_shards} ranks: every rank needs a shard of "
                             "its own; split the data into more shards")
        self.spec, self.urls = str(spec), urls[shard_id::num_shards]
        self.single_pass, self.limit = single_pass, limit
        self.device, self.dtype = torch.device(device), dtype
        self.batch_size, self.num_workers = batch_size, num_workers
        self.max_bad_fraction = max_bad_fraction
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        self.skipped = 0
        self.kw = dict(seed=seed, img_size=img_size, augment=augment, crop_scale=tuple(crop_scale), labels=labels,
                       shuffle=shuffle and not single_pass, buffer=shuffle_buffer, batch_size=batch_size,
                       single_pass=single_pass)
        self.epoch, self.start_step = 0, 0
        if single_pass:
            local = all(os.path.isfile(u) for u in self.urls)
            total = count_local_samples(self.urls) if local else epoch_size
            if limit is not None:
                total = limit if total is None else min(total, limit)
            self.num_batches = None if total is None else -(-total // batch_size)
            return
        total = epoch_size if epoch_size is not None else count_local_samples(urls)
        self.num_batches = total // (batch_size * num_shards)
        if self.num_batches == 0:
            raise ValueError(f"{total} samples give rank {shard_id} of {num_shards} no batch of {batch_size}"
                             "; lower data.batch_size, use fewer ranks, or add samples")

    def __bool__(self) -> bool:    # a loader is there even where the length of its pass is unknown
        return True

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"the length of one pass over the remote shards {self.spec!r} is unknown: give "
                            "data.epoch_size, or iterate it")
        return self.num_batches

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def raw_batches(self):
        """One pass of batches (``.images``: encoded images as uint8 arrays, checked with
        :func:`check_encoded`; ``.labels`` int64 ``[n]``; ``.keys`` ``[(shard, key)]``): what DALI decodes.
        Skips, counts, limits and stops on the bad rate as ``__iter__``."""
        yield from self._batches(raw=True)

    def __iter__(self):
        for b in self._batches(raw=False):
            x = b.images.to(self.device, non_blocking=True).float().div_(255)
            yield normalize(x).to(self.dtype), b.labels.to(self.device, non_blocking=True)

    def _batches(self, raw: bool):
        stream = _Stream(self.urls, self.epoch, raw=raw, **self.kw)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_as_is, pin_memory=self.device.type == "cuda" and not raw)
        skip, self.start_step = self.start_step, 0
        read = bad = given = b = 0
        batches = iter(loader)
        while self.single_pass or b < self.num_batches:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:
                original = worker_error(e)  # a worker's error arrives with its traceback as the message
                if original is None:
                    raise
                raise original from e
            read, bad = read + batch.read, bad + len(batch.bad)
            if batch.bad:
                self.skipped += len(batch.bad)
                self.skip_log.add(batch.bad)
                self._check_rate(bad, read, batch.bad[0], ended=False)
            n = len(batch.labels)
            if self.limit is not None:
                n = min(n, self.limit - given)
            if n == 0 or (n < self.batch_size and not self.single_pass):
                continue    # only bad samples, or a worker's partial last batch (training keeps full ones)
            given += n
            if b >= skip:
                if n < len(batch.labels):
                    batch.images, batch.labels, batch.keys = batch.images[:n], batch.labels[:n], batch.keys[:n]
                yield batch
            b += 1
            if self.limit is not None and given >= self.limit:
                break
        if bad:
            self._check_rate(bad, read, None, ended=True)
        if not self.single_pass and b < self.num_batches:
            raise ValueError(f"webdataset shards {self.spec!r}: an epoch gave {b} of its {self.num_batches} batches "
                             f"({bad} of {read} samples read were unreadable); fix or drop those shards")

    def _check_rate(self, bad: int, read: int, example, ended: bool) -> None:
        if bad <= self.max_bad_fraction * (read if ended else max(read, RATE_WINDOW)):
            return
        where = f"listed in {self.skip_log.path}" if self.skip_log.path else "listed in skipped_images.json"
        first = ""
        if example is None and self.skip_log.samples:
            example = (*next(iter(self.skip_log.samples)), next(iter(self.skip_log.samples.values())))
        if example is not None:
            first = f" (e.g. {example[0]} key {example[1]!r}: {example[2][:120]})"
        raise ValueError(f"{bad} of {read} samples read from the webdataset shards {self.spec!r} "
                         f"({'this epoch' if not self.single_pass else 'in one pass'}) are unreadable "
                         f"({100 * bad / max(read, 1):.1f}%), more than data.max_bad_fraction = "
                         f"{self.max_bad_fraction:g} allows{first}; all are {where}. Fix or drop those shards, or "
                         f"raise the limit (--data.max_bad_fraction={_raised(bad / max(read, 1))}; a stopped run "
                         "continues with --run.resume=auto)")


def _raised(rate: float) -> str:
    """A limit above ``rate``, rounded up to a readable value."""
    for v in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        if v > rate:
            return f"{v:g}"
    return "1"
