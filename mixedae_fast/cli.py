"""``mixedae-fast``: the command line.

    mixedae-fast pretrain [--config cpu_tiny] [--section.key=value ...] [--max-steps N]
    mixedae-fast config   [--config NAME] [--section.key=value ...]     # print the resolved config

Overrides take YAML values: ``--mixing.ha=oracle --optim.clip_grad=3.0 --mixing.ha_layers=[0,1]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from mixedae_fast.config import (
    ConfigError,
    available_presets,
    config_to_dict,
    derive,
    load_config,
    save_config,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixedae-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="cpu_tiny",
                        help=f"a preset ({', '.join(available_presets())}) or a YAML file (default cpu_tiny)")
    pre = sub.add_parser("pretrain", parents=[common], help="MixedAE pretraining, then evaluation and a report")
    pre.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    pre.add_argument("--num-train", type=int, default=5000, help="embedded data: training images")
    pre.add_argument("--num-val", type=int, default=1000, help="embedded data: validation images")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("config", parents=[common], help="print the resolved config and derived values")
    return p


def _writable_run_dir(cfg) -> Path:
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to the run directory {run_dir} ({e.strerror}); choose another "
                         "with --run.out_dir=PATH or --run.name=NAME") from None
    return run_dir


def _embedded_data(cfg, device, num_train: int, num_val: int, amp_dtype):
    """The embedded default data: procedurally drawn scenes (pipelines/synthetic.py), in memory."""
    import torch

    from mixedae_fast.pipelines.synthetic import generate_images
    from mixedae_fast.pipelines.torch_loader import TensorBatchLoader

    S, seed = cfg.model.img_size, cfg.run.seed
    train_x, train_y = generate_images(num_train, size=S, seed=seed)
    val_x, val_y = generate_images(num_val, size=S, seed=seed + 1_000_003)
    dtype = amp_dtype or torch.float32
    kw = dict(img_size=S, device=device, dtype=dtype)
    train = TensorBatchLoader(train_x, train_y, cfg.data.batch_size, augment=True, crop_scale=cfg.data.crop_scale,
                              seed=seed, **kw)
    plain = dict(augment=False, shuffle=False, drop_last=False, **kw)
    bank = min(num_train, 2000)  # the kNN / probe training set: a slice of train, without augmentation
    return (train, TensorBatchLoader(train_x[:bank], train_y[:bank], 500, **plain),
            TensorBatchLoader(val_x, val_y, 500, **plain))


def cmd_pretrain(args, overrides) -> int:
    import torch

    from mixedae_fast.engine import StopRequested, Trainer, resolve_device, resolve_precision
    from mixedae_fast.evaluate import evaluate_encoder
    from mixedae_fast.models import build_model

    cfg = load_config(args.config, overrides)
    if cfg.data.path is not None:
        raise ConfigError(f"data.path = {cfg.data.path!r}: image-folder loading is not in this version yet; "
                          "leave data.path unset to pretrain on the embedded data")
    device = resolve_device(cfg.runtime.device)
    amp_dtype = resolve_precision(cfg.runtime.precision, device)
    run_dir = _writable_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    d = derive(cfg)
    print(f"run {run_dir}: MixedAE r={cfg.mixing.group_size} ha={cfg.mixing.ha} hc={cfg.mixing.hc_on} "
          f"(N={d.num_patches}, n={d.n_visible}, K={d.topk}) on {device}, "
          f"precision {amp_dtype or torch.float32}, lr {d.lr:.3g}", flush=True)
    t0 = time.perf_counter()
    train, eval_train, val = _embedded_data(cfg, device, args.num_train, args.num_val, amp_dtype)
    print(f"embedded data: {args.num_train} train / {args.num_val} val images at {cfg.model.img_size}px "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg).to(device)
    trainer = Trainer(cfg, model, train, run_dir, device, max_steps=args.max_steps, progress=not args.no_progress)
    resumed = trainer.maybe_resume()
    if resumed:
        print(f"resumed from {resumed} at step {trainer.step}", flush=True)
    t0 = time.perf_counter()
    try:
        history = trainer.fit()
    except StopRequested:
        return 130  # saved; the message says how to resume
    train_s = time.perf_counter() - t0
    report = {"run_dir": str(run_dir), "device": str(device), "steps": trainer.step, "train_seconds": train_s,
              "final": history[-1] if history else None, "config": config_to_dict(cfg)}
    if cfg.run.eval:
        report["eval"] = {"pretrained": evaluate_encoder(model, eval_train, val, device, amp_dtype=amp_dtype)}
        torch.manual_seed(cfg.run.seed + 1)
        baseline = build_model(cfg).to(device)
        report["eval"]["random_init"] = evaluate_encoder(baseline, eval_train, val, device, amp_dtype=amp_dtype)
    tmp = run_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(run_dir / "report.json")
    _print_summary(report)
    return 0


def _print_summary(report: dict) -> None:
    final = report.get("final") or {}
    print(f"\n{'steps':<22}{report['steps']}\n{'train time':<22}{report['train_seconds']:.1f} s")
    for key in ("loss", "loss_rec", "loss_hc", "recognition"):
        if key in final:
            print(f"{key:<22}{final[key]:.4f}")
    ev = report.get("eval")
    if ev:
        print(f"\n{'evaluation (val)':<22}{'pretrained':>12}{'random init':>14}")
        for metric in ev["pretrained"]:
            print(f"{metric + ' acc %':<22}{ev['pretrained'][metric]:>12.1f}{ev['random_init'][metric]:>14.1f}")
    print(f"\nreport: {report['run_dir']}/report.json")


def cmd_config(args, overrides) -> int:
    cfg = load_config(args.config, overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    print("# derived:", {k: v for k, v in vars(derive(cfg)).items()})
    return 0


def main(argv=None) -> int:
    args, overrides = _parser().parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or not o.lstrip("-")]
    if bad:
        print(f"error: unrecognised arguments {bad}; config overrides look like --section.key=value",
              file=sys.stderr)
        return 2
    try:
        return {"pretrain": cmd_pretrain, "config": cmd_config}[args.command](args, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
