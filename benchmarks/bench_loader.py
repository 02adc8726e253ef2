"""Data-loader throughput: DaliLoader over a folder of JPEGs (ImageFolder layout), RandomResizedCrop +
flip + normalise, batches delivered on the device.

    python -m mixedae_fast.benchmarks.bench_loader /data/imagenet/train --batch 256 --img-size 224
    python -m mixedae_fast.benchmarks.bench_loader /tmp/synth --make-data 5000 --size 256 --out r.json

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
from mixedae_fast.pipelines.dali import DaliLoader

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="ImageFolder of JPEGs (with --make-data: the dataset root to write; "
                                "its train/ split is read)")
    p.add_argument("--backend", choices=["dali"], default="dali")
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
    path = Path(args.path)
    if args.make_data:
        from mixedae_fast.pipelines.synthetic import write_image_folder

        path = write_image_folder(path, num_train=args.make_data, num_val=0, size=args.size) / "train"
    loader = DaliLoader(path, batch_size=args.batch, img_size=args.img_size, device=device, dtype=dtype,
                        num_threads=args.threads)
    rates = time_loader(loader, device, args.warmup, args.iters, args.window)
    import nvidia.dali

    result = {
        "backend": args.backend, "images_per_s": statistics.median(rates), "windows_images_per_s": rates,
        "batch": args.batch, "img_size": args.img_size, "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads, "num_images": loader.num_samples, "path": str(path),
        **result_head("loader", device, ["python", "-m", "mixedae_fast.benchmarks.bench_loader"], argv,
                      dali=nvidia.dali.__version__),
    }
    print(f"{args.backend}: {result['images_per_s']:,.0f} img/s (median of {len(rates)} windows of "
          f"{args.window}x{args.batch}; {result['dtype']} {args.img_size}px on {result['device']})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
