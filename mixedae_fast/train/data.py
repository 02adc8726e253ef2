"""Which loader feeds a run: config -> (train loader, evaluation bank, validation loader).

``data.backend``: ``dali`` (pipelines/dali.py), ``torch`` (pipelines/torch_loader.py, PIL or nvJPEG),
``embedded`` (the embedded scenes drawn in memory, no files; ``synthetic``, its old spelling, too),
``auto`` = DALI on a CUDA device when it is importable, else the torch loader. On CPU ``auto`` takes
the torch loader: its randomness is a pure function of (seed, epoch, index), which makes a resumed run
bitwise exact; DALI's CPU graph is there when asked for and is tested on its own.

With ``data.path`` unset the embedded dataset is written once as JPEGs (ImageFolder layout, cached
under ``$MIXEDAE_CACHE``) and read through the chosen loader like any other folder.

``data.format=webdataset``: every loader (training, validation, the kNN bank; torch or DALI) reads the
shards through ``pipelines/shards.py`` (the one tar reader), so a spec (local, brace ranges, ``pipe:``,
URLs) means the same everywhere. Unreadable samples are skipped and recorded in one :class:`SkipLog`
shared by the run's loaders (``skipped_images.json``); past ``data.max_bad_fraction`` the run stops.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mixedae_fast.choices import DATA_BACKENDS, EMBEDDED, EMBEDDED_NUM_TRAIN, EMBEDDED_NUM_VAL
from mixedae_fast.pipelines.files import open_source, verify_sources
from mixedae_fast.pipelines.shards import ShardLoader, SkipLog
from mixedae_fast.pipelines.synthetic import default_data_root, generate_images, write_image_folder
from mixedae_fast.pipelines.torch_loader import FileImageLoader, TensorBatchLoader, spread_subset

EVAL_BANK = 2000  # kNN / probe training images (from the train split, unaugmented)


@dataclass
class Loaders:
    train: object
    bank: object | None      # evaluation: labelled features to fit kNN / the probe on
    val: object | None
    backend: str
    train_path: str | None
    val_path: str | None
    skipped: list            # (file, reason) for unreadable images, as found by verification
    verify_rate: str | None = None  # what verification cost (images/s), when it decoded anything
    skips: SkipLog | None = None    # those, and the shard samples skipped while streaming (skipped_images.json)


def dali_importable() -> bool:
    try:
        from mixedae_fast.pipelines.dali import dali_available
    except ImportError:
        return False
    return dali_available()


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "dali" if device.type == "cuda" and dali_importable() else "torch"
    return backend


def build_loaders(cfg, device: torch.device, dtype: torch.dtype, num_train: int = EMBEDDED_NUM_TRAIN,
                  num_val: int = EMBEDDED_NUM_VAL, shard_id: int = 0, num_shards: int = 1,
                  progress: bool = True) -> Loaders:
    d, S, seed = cfg.data, cfg.model.img_size, cfg.run.seed
    backend = resolve_backend(d.backend, device)
    common = dict(batch_size=d.batch_size, img_size=S, device=device, dtype=dtype)
    if backend in EMBEDDED:
        tx, ty = generate_images(num_train, size=S, seed=seed)
        vx, vy = generate_images(num_val, size=S, seed=seed, split="val")
        plain = dict(common, batch_size=500, augment=False, shuffle=False, drop_last=False)
        n = min(EVAL_BANK, num_train)
        train = TensorBatchLoader(tx, ty, augment=True, crop_scale=d.crop_scale, seed=seed, shard_id=shard_id,
                                  num_shards=num_shards, **common)
        return Loaders(train, TensorBatchLoader(tx[:n], ty[:n], **plain), TensorBatchLoader(vx, vy, **plain),
                       backend, None, None, [], skips=SkipLog())
    if d.path is None:
        root = default_data_root(S, num_train, num_val, seed)
        try:
            root = write_image_folder(root, num_train, num_val, size=S, seed=seed, progress=progress)
        except OSError as e:
            raise OSError(e.errno, f"cannot write the embedded dataset under {root} ({e.strerror or e}); set "
                          "MIXEDAE_CACHE to a writable folder, or data.path to existing images", e.filename) from e
        train_path, val_path, fmt = str(root / "train"), str(root / "val"), "imagefolder"
    else:
        train_path, val_path, fmt = d.path, d.val_path, d.format
    skips = SkipLog()
    train = _loader(backend, train_path, fmt, d, common, augment=True, shard_id=shard_id, num_shards=num_shards,
                    seed=seed, labels=d.labels != "none", skips=skips)
    skips.files = list(getattr(train, "bad", []))
    bank = val = None
    if val_path is not None:
        bank, val = eval_loaders(cfg, device, dtype, train_path, val_path, fmt, backend=backend, skips=skips)
    return Loaders(train, bank, val, backend, train_path, val_path, list(skips.files),
                   getattr(train, "verify_rate", None), skips)


def eval_loaders(cfg, device: torch.device, dtype: torch.dtype, train_path: str, val_path: str, fmt: str, *,
                 backend: str | None = None, skips: SkipLog | None = None, limit: int | None = None):
    """``(bank, val)``: the loaders of pretrain's final evaluation — val, and the first ``limit`` (default
    :data:`EVAL_BANK`) training images (spread over the classes for a folder or list; the first in shard order
    for shards), unaugmented, in batches of 250, through ``backend`` (default: ``data.backend`` resolved on
    ``device``). ``mixedae-fast eval RUN`` on a run's shards reads them here too, so it gives the figures of the
    run's ``report.json``."""
    plain = dict(batch_size=250, img_size=cfg.model.img_size, device=device, dtype=dtype)
    backend = backend or resolve_backend(cfg.data.backend, device)
    seed, limit = cfg.run.seed, EVAL_BANK if limit is None else limit
    val = _loader(backend, val_path, fmt, cfg.data, plain, augment=False, seed=seed, skips=skips)
    bank = _loader(backend, train_path, fmt, cfg.data, plain, augment=False, seed=seed, limit=limit, skips=skips)
    return bank, val


def _loader(backend, path, fmt, d, common, augment, seed, shard_id=0, num_shards=1, limit=None, labels=True,
            skips=None):
    shuffle = augment
    if fmt == "webdataset" and backend in ("torch", "dali"):
        # one reader for every path: training shuffles, val and the bank read each sample once (the bank: the
        # first EVAL_BANK); DALI decodes what the reader hands it
        kw = dict(augment=augment, crop_scale=d.crop_scale, seed=seed, num_workers=d.num_workers, labels=labels,
                  max_bad_fraction=d.max_bad_fraction, skip_log=skips, **common)
        if augment:
            kw.update(shuffle=True, shard_id=shard_id, num_shards=num_shards, epoch_size=d.epoch_size)
        else:
            kw.update(shuffle=False, single_pass=True, limit=limit)
        if backend == "dali":
            from mixedae_fast.pipelines.dali import DaliShardLoader

            return DaliShardLoader(path, num_threads=max(d.num_workers, 1), **kw)
        return ShardLoader(path, **kw)
    if backend == "dali":
        from mixedae_fast.pipelines.dali import DaliLoader

        # DALI stops on an undecodable file: verify once (cached) and hand it the good ones
        # the one discovery (pipelines/files.py), then the good files to DALI
        samples, _ = open_source(path, fmt, labels)
        paths = [p for p, _ in samples]
        good, bad, checked, cost = verify_sources(paths, d.verify, seed, where=f" of {path!r}")
        pairs = spread_subset([(paths[i], max(samples[i][1], 0)) for i in good], limit)
        files, file_labels = [p for p, _ in pairs], [lab for _, lab in pairs]
        loader = DaliLoader(path, fmt, augment=augment, crop_scale=d.crop_scale, seed=seed, shuffle=shuffle,
                            drop_last=augment, shard_id=shard_id, num_shards=num_shards,
                            num_threads=max(d.num_workers, 1), files=files, labels=file_labels, **common)
        loader.bad = bad
        loader.verify_rate = cost.rate_line(path) if checked else None
        return loader
    if backend == "torch":
        return FileImageLoader(path, augment=augment, crop_scale=d.crop_scale, seed=seed, shuffle=shuffle,
                               drop_last=augment, fmt=fmt, num_workers=d.num_workers, shard_id=shard_id,
                               num_shards=num_shards, limit=limit, labels=labels, verify=d.verify, **common)
    raise ValueError(f"data.backend = {backend!r} is not one of {', '.join(DATA_BACKENDS)}")


def write_data_report(loaders: Loaders, run_dir: Path) -> Path | None:
    """Unreadable images, each with the reason (``skipped_images.json``: ``{"file", "reason"}`` for a file
    found by verification, ``{"shard", "key", "reason"}`` for a shard sample): written now when some are
    known, and again whenever a loader skips another (shards are read as they stream)."""
    skips = loaders.skips if loaders.skips is not None else SkipLog(loaders.skipped)
    return skips.write_to(Path(run_dir) / "skipped_images.json")
