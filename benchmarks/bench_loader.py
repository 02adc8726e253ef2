"""Data-loader throughput: RandomResizedCrop + flip + normalise, batches delivered on the device, from a
folder of JPEGs (ImageFolder layout) or from webdataset shards of the same images.

    python -m mixedae_fast.benchmarks.bench_loader /data/imagenet/train --batch 256 --img-size 224
    python -m mixedae_fast.benchmarks.bench_loader /tmp/synth --make-data 5000 --size 256 --out r.json
    python -m mixedae_fast.benchmarks.bench_loader /tmp/synth/train --backend dali,dali-shards,torch-shards

Backends: ``dali`` (DaliLoader over the folder), ``dali-shards`` (DaliShardLoader: pipelines/shards.py
reads the tars and feeds DALI's decode and augmentation through ``external_source``), ``torch-shards``
(ShardLoader: the same reader, PIL decode in workers). The shard backends read shards written once from
the folder (``--shard-dir``, default ``<path>.shards``; ``--per-shard`` images each), so every backend
reads the same images.

Untimed warm-up batches, then ``--iters`` batches timed in windows of ``--window`` batches (the device
synchronised at each window's end, so a window counts work finished, not queued); the figure is the
median of the windows' images/s. Epochs roll over inside the timing (their rebuild is part of the
loader's cost). The only backend for now is ``dali``. The result file carries device, versions,
git SHA, date and command.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mixedae_fast.benchmarks.common import batches, result_head
from mixedae_fast.pipelines.dali import DaliLoader, DaliShardLoader
from mixedae_fast.pipelines.files import scan_image_folder
from mixedae_fast.pipelines.shards import ShardLoader

BACKENDS = ("dali", "dali-shards", "torch-shards")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def time_loader(loader, device: torch.device, warmup: int, iters: int, window: int) -> list[float]:
    """images/s of each window of ``window`` batches, after ``warmup`` untimed batches."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    it = batches(loader)
    for _ in range(warmup):
        next(it)
    sync()
    rates = []
    for _ in range(max(1, iters // window)):
        start, n = time.perf_counter(), 0
        for _ in range(window):
            n += len(next(it)[0])
        sync()
        rates.append(n / (time.perf_counter() - start))
    return rates


def folder_to_shards(folder: Path, out: Path, per_shard: int) -> str:
    """The images of ImageFolder ``folder`` as webdataset shards ``out/shard-NNNNN.tar`` (``KEY.jpg`` +
    ``KEY.cls``), written once (kept when ``out`` already holds them); the brace spec of the shards."""
    import io
    import tarfile

    paths, labels, _ = scan_image_folder(folder)
    count = -(-len(paths) // per_shard)
    spec = str(out / f"shard-{{00000..{count - 1:05d}}}.tar")
    if (out / f"shard-{count - 1:05d}.tar").is_file():
        return spec
    out.mkdir(parents=True, exist_ok=True)
    for s in range(count):
        part = out / f"shard-{s:05d}.tar.part"
        with tarfile.open(part, "w") as tar:
            for i in range(s * per_shard, min(len(paths), (s + 1) * per_shard)):
                ext = Path(paths[i]).suffix.lstrip(".").lower()
                for suffix, data in ((ext, Path(paths[i]).read_bytes()), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        part.rename(out / f"shard-{s:05d}.tar")
    return spec


def build_loader(backend: str, path: Path, args, device: torch.device, dtype: torch.dtype):
    common = dict(batch_size=args.batch, img_size=args.img_size, device=device, dtype=dtype)
    if backend == "dali":
        return DaliLoader(path, num_threads=args.threads, **common)
    spec = folder_to_shards(path, Path(args.shard_dir or f"{path}.shards"), args.per_shard)
    if backend == "dali-shards":
        return DaliShardLoader(spec, num_threads=args.threads, num_workers=args.workers, **common)
    return ShardLoader(spec, num_workers=args.workers, **common)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="ImageFolder of JPEGs (with --make-data: the dataset root to write; "
                                "its train/ split is read)")
    p.add_argument("--backend", default="dali",
                   help=f"comma-separated, each timed in turn: {', '.join(BACKENDS)} (default dali)")
    p.add_argument("--shard-dir", default=None, help="where the shard backends' tars are written (default "
                                                     "<path>.shards)")
    p.add_argument("--per-shard", type=int, default=1000, help="images a shard (default 1000)")
    p.add_argument("--workers", type=int, default=2, help="the shard reader's worker processes (default 2)")
    p.add_argument("--make-data", type=int, default=0, metavar="N", help="first write N synthetic train JPEGs")
    p.add_argument("--size", type=int, default=256, help="side of the synthetic JPEGs")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if not backends or unknown:
        raise SystemExit(f"error: --backend {args.backend!r}: give some of {', '.join(BACKENDS)}")
    path = Path(args.path)
    if args.make_data:
        from mixedae_fast.pipelines.synthetic import write_image_folder

        path = write_image_folder(path, num_train=args.make_data, num_val=0, size=args.size) / "train"
    import nvidia.dali

    rows = []
    for backend in backends:
        loader = build_loader(backend, path, args, device, dtype)
        rates = time_loader(loader, device, args.warmup, args.iters, args.window)
        rows.append({"backend": backend, "images_per_s": statistics.median(rates), "windows_images_per_s": rates,
                     "batches_an_epoch": len(loader)})
        print(f"{backend}: {rows[-1]['images_per_s']:,.0f} img/s (median of {len(rates)} windows of "
              f"{args.window}x{args.batch}; {str(dtype).removeprefix('torch.')} {args.img_size}px on {device})",
              flush=True)
    result = {
        **rows[0], "rows": rows,
        "batch": args.batch, "img_size": args.img_size, "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads, "workers": args.workers, "path": str(path),
        **result_head("loader", device, ["python", "-m", "mixedae_fast.benchmarks.bench_loader"], argv,
                      dali=nvidia.dali.__version__),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
