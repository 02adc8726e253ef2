"""Model-step throughput of the plain-PyTorch MixedAE in its modes, on synthetic device tensors.

    python -m mixedae_fast.benchmarks.bench_step --config vit_base --batch 256 --out results.json

Rows: ``mae`` (r=1, ha=none, no HC: MAE's function, the baseline row), ``naive`` (r=4, global
attention), ``oracle``, ``topk`` (r=4, TopK + HC loss; the default MixedAE). One step = forward,
backward, fused AdamW step (the trainer's step: ``mixedae_fast.train.step.TrainStep``), under bf16 autocast on
CUDA (fp32 on CPU). Untimed warm-up, then the median of ``--iters`` steps timed with CUDA events (wall
clock on CPU). Throughput counts source
images per second. The result file carries device, versions, git SHA, date and command.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from mixedae_fast.benchmarks.common import median_ms, result_head, write_json
from mixedae_fast.config import load_config
from mixedae_fast.model.mixedae import build_model
from mixedae_fast.train.device import resolve_precision
from mixedae_fast.train.optim import build_optimizer
from mixedae_fast.train.step import TrainStep

MODES = {
    "mae": ["--mixing.group_size=1", "--mixing.ha=none", "--mixing.hc_weight=0"],
    "naive": ["--mixing.ha=none", "--mixing.hc_weight=0"],
    "oracle": ["--mixing.ha=oracle", "--mixing.hc_weight=0"],
    "topk": [],
}


def time_steps(config: str, overrides: list[str], batch: int, warmup: int, iters: int, device: torch.device) -> dict:
    """One mode's row: the training step (:class:`mixedae_fast.train.step.TrainStep`) on one batch of device tensors."""
    cfg = load_config(config, [*overrides, f"--data.batch_size={batch}"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    amp = resolve_precision(cfg.runtime.precision, device)
    opt, device_skip = build_optimizer(model, cfg, 1e-4, device)
    train_step = TrainStep(model, opt, device, amp, clip_grad=cfg.optim.clip_grad, device_skip=device_skip)
    images = torch.randn(batch, 3, cfg.model.img_size, cfg.model.img_size, device=device)
    if amp is not None:
        images = images.to(amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, last = itertools.count(), {}

    def one_step():
        last["loss"] = train_step.micro(images, next(steps))["loss"]
        train_step.update()

    med = median_ms(one_step, device, warmup, iters)
    row = {"ms_per_step": med, "img_per_s": batch / med * 1e3, "loss": float(last["loss"].detach())}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="vit_base")
    p.add_argument("--batch", type=int, default=256, help="source images per step")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args, extra = p.parse_known_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    result = result_head("model_step", device, ["python", "-m", "mixedae_fast.benchmarks.bench_step"], argv,
                         config=args.config, batch=args.batch, rows={})
    for mode in modes:
        row = time_steps(args.config, MODES[mode] + extra, args.batch, args.warmup, args.iters, device)
        result["rows"][mode] = row
        print(f"{mode:<8}{row['ms_per_step']:>10.1f} ms{row['img_per_s']:>10.0f} img/s"
              + (f"{row['peak_mem_gib']:>8.1f} GiB" if "peak_mem_gib" in row else ""), flush=True)
        if args.out:  # after every row: a run cut short keeps the rows that finished
            write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
