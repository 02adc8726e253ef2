"""``mixedae-fast``: the command line.

    mixedae-fast pretrain [--config cpu_tiny] [--section.key=value ...] [--max-steps N]
    mixedae-fast config   [--config NAME] [--section.key=value ...]     # print the resolved config
    mixedae-fast bench    [--config vit_base] [--source synthetic,files] [--compile both] [--out DIR]

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
    sub.add_parser("bench", add_help=False, help="training throughput: MixedAE vs MAE vs the official recipe "
                   "(mixedae-fast bench --help)")
    md = sub.add_parser("make-data", help="write a dataset as JPEGs (ImageFolder layout, train/ and val/), cached")
    md.add_argument("--dataset", default="synthetic", choices=("synthetic", "digits", "lfw", "photos"),
                    help="the embedded scenes (default), or real images shipped with scikit-learn/-image")
    md.add_argument("--out", default=None, help="target folder (default: under $MIXEDAE_CACHE)")
    md.add_argument("--size", type=int, default=32, help="image side in pixels")
    md.add_argument("--num-train", type=int, default=5000, help="synthetic only")
    md.add_argument("--num-val", type=int, default=1000, help="synthetic only")
    md.add_argument("--seed", type=int, default=0)
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


def cmd_pretrain(args, overrides) -> int:
    import torch

    from mixedae_fast.data import build_loaders, write_data_report
    from mixedae_fast.engine import StopRequested, Trainer, resolve_device, resolve_precision
    from mixedae_fast.evaluate import evaluate_encoder
    from mixedae_fast.models import build_model

    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.runtime.device)
    amp_dtype = resolve_precision(cfg.runtime.precision, device)
    run_dir = _writable_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    d = derive(cfg)
    print(f"run {run_dir}: MixedAE r={cfg.mixing.group_size} ha={cfg.mixing.ha} hc={cfg.mixing.hc_on} "
          f"(N={d.num_patches}, n={d.n_visible}, K={d.topk}) on {device}, "
          f"precision {amp_dtype or torch.float32}, lr {d.lr:.3g}", flush=True)
    t0 = time.perf_counter()
    data = build_loaders(cfg, device, amp_dtype or torch.float32, args.num_train, args.num_val,
                         progress=not args.no_progress)
    train, eval_train, val = data.train, data.bank, data.val
    skipped = write_data_report(data, run_dir)
    print(f"data: {data.train_path or 'embedded (in memory)'} via the {data.backend} loader, {len(train)} batches "
          f"an epoch ({time.perf_counter() - t0:.1f}s)" + (f"; {len(data.skipped)} unreadable images skipped, "
                                                            f"listed in {skipped}" if skipped else ""), flush=True)

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
    if cfg.run.eval and val is None:
        print("no validation data (data.val_path): evaluation skipped", flush=True)
    elif cfg.run.eval:
        report["eval"] = {"pretrained": evaluate_encoder(model, eval_train, val, device, amp_dtype=amp_dtype)}
        torch.manual_seed(cfg.run.seed + 1)
        baseline = build_model(cfg).to(device)
        report["eval"]["random_init"] = evaluate_encoder(baseline, eval_train, val, device, amp_dtype=amp_dtype)
    report["pictures"] = _pictures(model, val or train, run_dir, cfg.run.seed)
    tmp = run_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(run_dir / "report.json")
    _print_summary(report)
    return 0


def _pictures(model, val_loader, run_dir: Path, seed: int) -> dict:
    from mixedae_fast.visualize import plot_loss_curve, reconstruction_figure

    out = {}
    if (run_dir / "metrics.csv").exists():
        out["loss_curve"] = str(plot_loss_curve(run_dir / "metrics.csv", run_dir / "loss_curve.png"))
    images, _ = next(iter(val_loader))
    out["reconstruction"] = str(reconstruction_figure(model, images, run_dir / "reconstruction.png", seed=seed))
    return out


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


def cmd_make_data(args, overrides) -> int:
    from mixedae_fast.pipelines.synthetic import default_data_root, write_image_folder

    if overrides:
        print(f"error: make-data takes no config overrides (got {overrides})", file=sys.stderr)
        return 2
    if args.dataset != "synthetic":
        from mixedae_fast.pipelines.offline import write_offline_folder

        print(write_offline_folder(args.dataset, args.out, size=args.size, seed=args.seed))
        return 0
    root = args.out or default_data_root(args.size, args.num_train, args.num_val, args.seed)
    path = write_image_folder(root, args.num_train, args.num_val, size=args.size, seed=args.seed)
    print(path)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser (benchmarks/bench_train.py)
        from mixedae_fast.benchmarks.bench_train import main as bench_main

        return bench_main(argv[1:])
    args, overrides = _parser().parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or not o.lstrip("-")]
    if bad:
        print(f"error: unrecognised arguments {bad}; config overrides look like --section.key=value",
              file=sys.stderr)
        return 2
    try:
        commands = {"pretrain": cmd_pretrain, "config": cmd_config, "make-data": cmd_make_data}
        return commands[args.command](args, overrides)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
