"""``mixedae-fast``: the command line.

    mixedae-fast pretrain [--config cpu_tiny] [--section.key=value ...] [--max-steps N]
    mixedae-fast config   [--config NAME] [--section.key=value ...]     # print the resolved config
    mixedae-fast bench    [--config vit_base] [--source synthetic,files] [--compile both] [--out DIR]
    mixedae-fast launch local --nproc N [pretrain options]               # torchrun: N ranks on this node
    mixedae-fast launch slurm --nodes N --gpus-per-node G [--submit] [pretrain options]   # sbatch script

Overrides take YAML values: ``--mixing.ha=oracle --optim.clip_grad=3.0 --mixing.ha_layers=[0,1]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
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
    pretrain_opts = _pretrain_options()
    sub.add_parser("pretrain", parents=[common, pretrain_opts],
                   help="MixedAE pretraining, then evaluation and a report")
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
    _launch_parser(sub, [common, pretrain_opts])
    return p


def _pretrain_options() -> argparse.ArgumentParser:
    """The options of ``pretrain`` besides the config (``launch`` passes them on to every rank)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--num-train", type=int, default=5000, help="embedded data: training images")
    p.add_argument("--num-val", type=int, default=1000, help="embedded data: validation images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _launch_parser(sub, parents) -> None:
    launch = sub.add_parser("launch", help="pretraining on several processes: torchrun here, or SLURM (sbatch)")
    where = launch.add_subparsers(dest="where", required=True)
    loc = where.add_parser("local", parents=parents, help="torchrun --standalone: --nproc ranks on this node")
    loc.add_argument("--nproc", type=int, required=True, help="ranks (one per GPU; CPU: gloo)")
    loc.add_argument("--dry-run", action="store_true", help="print the torchrun command, do not run it")
    sl = where.add_parser("slurm", parents=parents, help="write an sbatch script (torchrun on every node)")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node")
    sl.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU cores per rank (data loading)")
    sl.add_argument("--time", default="24:00:00", help="time limit of one job (it requeues itself)")
    sl.add_argument("--job-name", default=None, help="default: run.name")
    sl.add_argument("--partition", default=None)
    sl.add_argument("--account", default=None)
    sl.add_argument("--qos", default=None)
    sl.add_argument("--mem", default=None, help="memory per node (sbatch --mem); default: the cluster's")
    sl.add_argument("--signal-lead", type=int, default=300,
                    help="seconds before the time limit at which the ranks save and the job requeues")
    sl.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    sl.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                    help="another #SBATCH option, e.g. --sbatch=--constraint=h100 (repeatable)")
    sl.add_argument("--setup", action="append", default=[], metavar="LINE",
                    help="a shell line run before training, e.g. --setup='module load cuda' (repeatable)")
    sl.add_argument("--script", default=None, help="where to write it (default: <run dir>/slurm/pretrain.sbatch)")
    sl.add_argument("--submit", action="store_true", help="submit it with sbatch")


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
    from mixedae_fast.distributed import failure_message, init_distributed, requeue_slurm_job, unwrap
    from mixedae_fast.engine import StopRequested, Trainer, resolve_precision
    from mixedae_fast.evaluate import evaluate_encoder
    from mixedae_fast.models import build_model

    cfg = load_config(args.config, overrides)
    dist = init_distributed(cfg)  # one process: no process group; under torchrun / srun: this rank's
    device = dist.device
    say = print if dist.is_main else (lambda *a, **k: None)  # rank 0 speaks and writes the run folder
    amp_dtype = resolve_precision(cfg.runtime.precision, device)
    run_dir = _writable_run_dir(cfg) if dist.is_main else Path(cfg.run.out_dir) / cfg.run.name
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
    d = derive(cfg, dist.world_size)
    ranks = f" x {dist.world_size} ranks ({dist.backend}), global batch {d.global_batch}" if dist.active else ""
    say(f"run {run_dir}: MixedAE r={cfg.mixing.group_size} ha={cfg.mixing.ha} hc={cfg.mixing.hc_on} "
        f"(N={d.num_patches}, n={d.n_visible}, K={d.topk}) on {device}{ranks}, "
        f"precision {amp_dtype or torch.float32}, lr {d.lr:.3g}", flush=True)
    t0 = time.perf_counter()
    data = build_loaders(cfg, device, amp_dtype or torch.float32, args.num_train, args.num_val,
                         shard_id=dist.rank, num_shards=dist.world_size,
                         progress=not args.no_progress and dist.is_main)
    train, eval_train, val = data.train, data.bank, data.val
    skipped = write_data_report(data, run_dir) if dist.is_main else None
    say(f"data: {data.train_path or 'embedded (in memory)'} via the {data.backend} loader, {len(train)} batches "
        f"an epoch{' per rank' if dist.active else ''} ({time.perf_counter() - t0:.1f}s)"
        + (f"; {len(data.skipped)} unreadable images skipped, listed in {skipped}" if skipped else ""), flush=True)

    torch.manual_seed(cfg.run.seed)
    model = dist.wrap(build_model(cfg).to(device))
    trainer = Trainer(cfg, model, train, run_dir, device, max_steps=args.max_steps, progress=not args.no_progress,
                      dist=dist)
    try:
        resumed = trainer.maybe_resume()
        dist.check_same(trainer.step, "the step to resume from",
                        "Every rank reads the checkpoints: run.out_dir must be on a filesystem all nodes share")
        if resumed:
            say(f"resumed from {resumed} at step {trainer.step}", flush=True)
        t0 = time.perf_counter()
        history = trainer.fit()
    except StopRequested as stop:  # saved; the message says how to resume
        dist.close()
        if str(stop) == "SIGUSR1" and dist.is_main and dist.env.slurm_job_id:
            requeue_slurm_job(dist.env.slurm_job_id)
            print(f"requeued SLURM job {dist.env.slurm_job_id}: it resumes with --run.resume=auto", flush=True)
        return 130
    except Exception as e:
        message = failure_message(e, dist, trainer.ckpt_dir)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        dist.abandon(1)
    train_s = time.perf_counter() - t0
    dist.close()
    if not dist.is_main:
        return 0
    model = unwrap(model)
    report = {"run_dir": str(run_dir), "device": str(device), "ranks": dist.world_size,
              "global_batch": d.global_batch, "steps": trainer.step, "train_seconds": train_s,
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


def _pretrain_argv(args, overrides) -> list[str]:
    """The ``pretrain`` command line of ``args`` (options left at their defaults left out) and ``overrides``."""
    config = args.config
    if config.endswith((".yaml", ".yml")) or os.sep in config:
        config = str(Path(config).resolve())  # the ranks may start elsewhere
    out = ["--config", config]
    for action in _pretrain_options()._actions:
        value = getattr(args, action.dest, action.default)
        if value != action.default:
            out += [action.option_strings[0]] + ([] if isinstance(value, bool) else [str(value)])
    return out + list(overrides)


def cmd_launch(args, overrides) -> int:
    from mixedae_fast.launch import SlurmJob, local_command, sbatch_script

    cfg = load_config(args.config, overrides)  # a bad config fails here, not in every rank
    pretrain = _pretrain_argv(args, overrides)
    world = args.nproc if args.where == "local" else args.nodes * args.gpus_per_node
    d = derive(cfg, world)
    summary = (f"Global batch {d.global_batch} = data.batch_size {cfg.data.batch_size} x {world} ranks x "
               f"optim.accum_steps {cfg.optim.accum_steps}; lr {d.lr:.3g}.")
    try:
        if args.where == "local":
            command = local_command(args.nproc, pretrain)
            print(f"{summary}\n+ {shlex.join(command)}", flush=True)
            return 0 if args.dry_run else subprocess.call(command)
        job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_gpu=args.cpus_per_gpu,
                       time=args.time, job_name=args.job_name or cfg.run.name, partition=args.partition,
                       account=args.account, qos=args.qos, mem=args.mem, signal_lead_s=args.signal_lead,
                       port=args.port, extra_sbatch=args.sbatch, setup=args.setup)
        run_dir = (Path(cfg.run.out_dir) / cfg.run.name).resolve()
        text = sbatch_script(job, pretrain, run_dir / "slurm", Path.cwd(), summary)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    script = Path(args.script) if args.script else run_dir / "slurm" / "pretrain.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)  # SLURM does not create the log folder
    script.write_text(text)
    script.chmod(0o755)
    print(f"{summary}\nwrote {script}", flush=True)
    if not args.submit:
        print(f"submit with: sbatch {shlex.quote(str(script))}")
        return 0
    try:
        done = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        print("error: sbatch not found: run this on a SLURM login node, or submit the script there", file=sys.stderr)
        return 2
    print((done.stdout + done.stderr).strip())
    return done.returncode


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
        commands = {"pretrain": cmd_pretrain, "config": cmd_config, "make-data": cmd_make_data, "launch": cmd_launch}
        return commands[args.command](args, overrides)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
