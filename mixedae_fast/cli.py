"""``mixedae-fast``: the command line.

    mixedae-fast pretrain [--config cpu_tiny] [--section.key=value ...] [--max-steps N]
    mixedae-fast config   [--config NAME] [--section.key=value ...]     # print the resolved config
    mixedae-fast bench    [--config vit_base] [--source synthetic,files] [--compile both] [--out DIR]
    mixedae-fast launch local --nproc N [pretrain options]               # torchrun: N ranks on this node
    mixedae-fast launch slurm --nodes N --gpus-per-node G [--submit] [pretrain options]   # sbatch script
    mixedae-fast eval      RUN [--dataset run|digits|lfw|photos | --data-dir DIR] [--pool avg|cls|both]
    mixedae-fast finetune  RUN [--dataset ... | --data-dir DIR] [--epochs N] [--accum-steps N] [--baseline]
                           [--out DIR] [--resume auto|PATH] [--eval-only]   # checkpoints + timm export in DIR
    mixedae-fast export    RUN [--out DIR] [--pool avg|cls] [--push-to-hub REPO_ID]  # timm, hub layout
    mixedae-fast visualize RUN [--dataset ... | --data-dir DIR] [--query T] [--block B]

RUN is a run directory (runs/<name>, its newest checkpoint) or a checkpoint file; its config.yaml
gives the architecture. eval / finetune / visualize take only --runtime.key=value overrides.

Overrides take YAML values: ``--mixing.ha=oracle --optim.clip_grad=3.0 --mixing.ha_layers=[0,1]``.

Every failure ends in one ``error: ...`` line (what, why, the fix) and a non-zero exit; ``--debug`` (or
``MIXEDAE_DEBUG=1``) prints the traceback too. A run folder belongs to one run (mixedae_fast/train/runs.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml

from mixedae_fast.config import (
    ConfigError,
    available_presets,
    config_to_dict,
    derive,
    load_config,
)
from mixedae_fast.errors import RunFailure, worker_error
from mixedae_fast.train.cpu_threads import prefer_passive_wait


def _parser(shown: tuple[str, list[str]] = ("cpu_tiny", [])) -> argparse.ArgumentParser:
    """The command line; ``shown``: the config (and overrides) whose values ``--help`` lists."""
    p = argparse.ArgumentParser(prog="mixedae-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_Version, help="print the version (and the git commit of a checkout)")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="cpu_tiny",
                        help=f"a preset ({', '.join(available_presets())}) or a YAML file (default cpu_tiny)")
    pretrain_opts = _pretrain_options()
    keys = dict(formatter_class=argparse.RawDescriptionHelpFormatter)
    _list_config_keys(sub.add_parser("pretrain", parents=[common, pretrain_opts], **keys,
                                     help="MixedAE pretraining, then evaluation and a report"), shown)
    _list_config_keys(sub.add_parser("config", parents=[common], **keys,
                                     help="print the resolved config as YAML, the derived values as a commented block"),
                      shown)
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
    _downstream_parsers(sub)
    _study_parser(sub, common)
    return p


class _Version(argparse.Action):
    """``--version``: the installed version, and the commit where this runs from a git checkout (looked up
    only when asked)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        import importlib.metadata

        from mixedae_fast import __version__
        from mixedae_fast.provenance import git_sha

        try:
            version = importlib.metadata.version("mixedae_fast")
        except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
            version = __version__
        sha = git_sha()
        print(f"mixedae-fast {version}" + ("" if sha == "unknown" else f" (git {sha})"))
        parser.exit()


def _shown_config(argv: list[str]) -> tuple[str, list[str]]:
    """The ``--config`` and ``--section.key=value`` overrides of ``argv``: ``--help`` lists their values
    (``--config vit_base --help`` shows ViT-B's), not cpu_tiny's."""
    config, overrides = "cpu_tiny", []
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]:
            overrides.append(a)
    return config, overrides


def _list_config_keys(parser: argparse.ArgumentParser, shown: tuple[str, list[str]]) -> None:
    """``--help`` of ``parser`` ends with every config key (config_docs.py) and its value in ``shown``
    (a config and overrides), built only when help is shown."""
    plain = parser.format_help

    def format_help() -> str:
        from mixedae_fast.config_docs import describe_config  # no torch import there

        config, overrides = shown
        label = f"--config {config}" + "".join(f" {o}" for o in overrides)
        parser.epilog = describe_config(load_config(config, overrides), label)
        return plain()

    parser.format_help = format_help


def _pretrain_options() -> argparse.ArgumentParser:
    """The options of ``pretrain`` besides the config (``launch`` passes them on to every rank)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps; the lr schedule keeps the length optim.epochs gives "
                        "it (warm-up and cosine are not compressed: to train a shorter schedule lower "
                        "optim.epochs / optim.warmup_epochs instead)")
    p.add_argument("--num-train", type=int, default=5000, help="embedded data: training images")
    p.add_argument("--num-val", type=int, default=1000, help="embedded data: validation images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--progress", action="store_true",
                   help="the progress bar even when stderr is not a terminal (by default a redirected log or a "
                        "cluster job gets only the plain log lines)")
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
    sl.add_argument("--force", action="store_true", help="let --script replace a file this command did not write")


def _downstream_parsers(sub) -> None:
    """eval, finetune, export, visualize: they read a trained run."""
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("run", help="a run directory (runs/<name>: its newest checkpoint) or a checkpoint file")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--dataset", default="run", choices=("run", "digits", "lfw", "photos"),
                      help="run = the run's own data (the embedded set by default); digits / lfw / photos = real "
                           "images shipped with scikit-learn/-image, written at the model's image size")
    data.add_argument("--data-dir", default=None, help="any folder with train/ and val/ in ImageFolder layout")
    data.add_argument("--max-train", type=int, default=None, help="use at most this many training images")
    data.add_argument("--out", default=None, help="output file or folder (default: in the run directory)")
    ev = sub.add_parser("eval", parents=[run, data], help="kNN and linear probe on frozen features vs random init")
    ev.add_argument("--pool", default="avg", choices=("avg", "cls", "both"),
                    help="features: mean-pooled patch tokens after the final norm (default), the CLS token, both")
    ev.add_argument("--k", type=int, default=20, help="kNN neighbours")
    ev.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    ev.add_argument("--probe-epochs", type=int, default=100)
    ev.add_argument("--no-probe", action="store_true", help="kNN only")
    ft = sub.add_parser("finetune", parents=[run, data], help="full fine-tuning with layer-wise lr decay")
    # unset options take FinetuneConfig's defaults (mixedae_fast/downstream/finetune.py; no torch import here)
    for name, tp, what in (("epochs", int, "epochs"), ("batch_size", int, "images a step"),
                           ("blr", float, "base lr: lr = blr * batch_size / 256 (default by depth: MAE's 5e-4 "
                                                  "for ViT-B, 1e-3 for ViT-L; 1.6e-2 below 12 blocks)"),
                           ("lr", float, "absolute peak lr"),
                           ("layer_decay", float, "layer-wise lr decay (default by depth: MAE's 0.65 for ViT-B, "
                                                  "0.75 for ViT-L)"),
                           ("weight_decay", float, "AdamW weight decay"), ("warmup_epochs", float, "linear warm-up"),
                           ("min_lr", float, "end of the cosine"),
                           ("recipe", str, "mae (RandAugment, Mixup/CutMix, random erasing, drop path: MAE's "
                                           "recipe; default from 12 blocks) or light (crop + flip; default below)"),
                           ("drop_path", float, "stochastic depth (mae recipe 0.1)"),
                           ("mixup", float, "Mixup alpha (mae recipe 0.8; 0 = off)"),
                           ("cutmix", float, "CutMix alpha (mae recipe 1.0; 0 = off)"),
                           ("auto_augment", str, "timm RandAugment spec (mae recipe rand-m9-mstd0.5-inc1; none = off)"),
                           ("reprob", float, "random erasing probability (mae recipe 0.25)"),
                           ("label_smoothing", float, "label smoothing"), ("seed", int, "seed"),
                           ("accum_steps", int, "batches per optimizer step (gradient accumulation; default 1): "
                                                "global batch = batch size x this x ranks")):
        ft.add_argument("--" + name.replace("_", "-"), type=tp, default=argparse.SUPPRESS, help=what)
    ft.add_argument("--baseline", action="store_true", help="also fine-tune the random-init encoder, same recipe")
    ft.add_argument("--resume", default=None, metavar="auto|PATH",
                    help="continue a fine-tune: auto = the newest checkpoint in --out (a fresh start if there is "
                         "none), or a checkpoint file; the same options are required")
    ft.add_argument("--eval-only", action="store_true",
                    help="evaluate the fine-tuned classifier (--resume's checkpoint, default the newest in --out) on "
                         "val, write nothing")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar (the line per epoch stays)")
    ft.add_argument("--progress", action="store_true",
                    help="the progress bar even when stderr is not a terminal (default: only on a terminal)")
    ex = sub.add_parser("export", parents=[run], help="the encoder as a timm VisionTransformer, in the hub layout")
    ex.add_argument("--out", default=None, help="folder (default RUN/export_timm)")
    ex.add_argument("--pool", default="avg", choices=("avg", "cls"), help="timm global_pool: avg (default) or token")
    ex.add_argument("--no-check", action="store_true", help="skip loading it back through timm to compare features")
    ex.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                    help="also upload the folder to the Hugging Face Hub as model repo REPO_ID (user/name)")
    ex.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    ex.add_argument("--license", default="apache-2.0", help="the model card's licence (a Hub licence id; "
                    "default apache-2.0, the code's: choose one the training data's terms allow)")
    ex.add_argument("--dataset", action="append", default=None, metavar="HUB_ID",
                    help="a Hub data set the encoder was pretrained on, for the card (repeatable)")
    vi = sub.add_parser("visualize", parents=[run, data], help="reconstruction and homologous-attention pictures")
    vi.add_argument("--query", type=int, default=None, help="query patch: index among the group's r*n tokens")
    vi.add_argument("--block", type=int, default=None, help="encoder block (default: the last homologous one)")
    vi.add_argument("--seed", type=int, default=0, help="assignment seed")
    vi.add_argument("--step", type=int, default=0, help="assignment step")


def _study_parser(sub, common) -> None:
    from mixedae_fast.study import add_arguments  # no torch import there

    st = sub.add_parser("study", parents=[common], help="named variants x seeds at one step budget, evaluated, "
                        "one table (mean ± std) and a plot; resumable")
    add_arguments(st)


def cmd_study(args, overrides) -> int:
    from mixedae_fast.study import run_study

    return run_study(args, overrides)  # a StudyError is a ValueError: main() prints its one error line, exit 2


def cmd_pretrain(args, overrides) -> int:
    """Parse, call :func:`mixedae_fast.pretrain.pretrain`, print its summary (rank 0)."""
    from mixedae_fast.pretrain import pretrain
    from mixedae_fast.train.engine import StopRequested

    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps {args.max_steps}: must be >= 1 (optimizer steps); leave it out to train "
                          "optim.epochs epochs")
    cfg = load_config(args.config, overrides)
    named = any(o.lstrip("-").startswith("run.name=") for o in overrides)
    try:
        report = pretrain(cfg, max_steps=args.max_steps, num_train=args.num_train, num_val=args.num_val,
                          progress=not args.no_progress, name_given=named,
                          command=["mixedae-fast", *getattr(args, "argv", [])])
    except StopRequested:  # saved (and requeued under SLURM); the message said how to continue
        return 130
    if report is not None:
        _print_summary(report)
    return 0


def _provenance(args, device=None) -> dict:
    """Where a result came from (mixedae_fast/provenance.py): the command as typed, host, code, versions."""
    from mixedae_fast.provenance import provenance

    return provenance(device, ["mixedae-fast", *getattr(args, "argv", [])])


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
    """The resolved config as YAML (loadable with --config FILE), the derived values after it as a
    commented YAML block."""
    cfg = load_config(args.config, overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    derived = yaml.safe_dump({"derived": {k: list(v) if isinstance(v, tuple) else v
                                          for k, v in vars(derive(cfg)).items()}}, sort_keys=False)
    print("".join(f"# {line}\n" for line in derived.splitlines()), end="")
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


def _our_sbatch(path: Path) -> bool:
    """Whether ``path`` is a script ``launch slurm`` wrote (its second line says so): rewriting it is safe."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "written by `mixedae-fast launch slurm`" in f.readline(200) + f.readline(200)
    except OSError:
        return False


def cmd_launch(args, overrides) -> int:
    from mixedae_fast.train.launch import SlurmJob, local_command, sbatch_script

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
    if script.is_dir() or (script.exists() and not args.force and not _our_sbatch(script)):
        print(f"error: --script {script}: exists and was not written by `mixedae-fast launch slurm`; pass another "
              "path, or --force to replace it" if not script.is_dir() else
              f"error: --script {script}: is a folder; pass a file path", file=sys.stderr)
        return 2
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


# -- eval, finetune, export, visualize: they read a trained run ------------------------------------

def _bad_input(fn):
    """Errors in what the user passed (a run, a checkpoint, a dataset, a setting) end as ``error: ...``,
    exit 2: they raise ValueError (CheckpointError and ConfigError are ValueErrors) or FileNotFoundError
    (which ``main`` reports)."""
    @functools.wraps(fn)
    def wrapper(args, overrides):
        try:
            return fn(args, overrides)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapper


def _load_run(args, overrides):
    from mixedae_fast.downstream.evaluate import load_encoder
    from mixedae_fast.train.device import resolve_precision

    model, cfg, pre = load_encoder(args.run, overrides=overrides)
    device = next(model.parameters()).device
    print(f"{args.run}: {pre.checkpoint.name} (step {pre.step}), ViT {cfg.model.embed_dim} wide x "
          f"{cfg.model.depth} deep, patch {cfg.model.patch_size}, {cfg.model.img_size} px, on {device}", flush=True)
    return model, cfg, pre, device, resolve_precision(cfg.runtime.precision, device)


def _data(args, cfg, pre, device, **kw):
    from mixedae_fast.downstream.evaluate import eval_folders, image_loaders

    if args.max_train is not None and args.max_train < 1:
        raise ValueError(f"--max-train {args.max_train}: must be >= 1")
    train_dir, val_dir, name = eval_folders(args.dataset, cfg, args.data_dir, run_dir=pre.run_dir)
    train, val = image_loaders(train_dir, val_dir, cfg.model.img_size, device, max_train=args.max_train,
                               num_workers=cfg.data.num_workers, **kw)
    print(f"data {name}: {len(train.dataset)} train / {len(val.dataset)} val images, {len(train.classes)} classes "
          f"({train_dir})", flush=True)
    return train, val, name


def _out_file(out: str | None) -> None:
    """``--out`` of eval / finetune is a file: refuse a folder, or a path under a file, before the work."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; --out takes the result file, e.g. --out {path / 'results.json'}")
    _out_parent(path.parent, f"--out {out}")


def _out_dir(out: str | None) -> None:
    """``--out`` of export / visualize is a folder: refuse a file, or a path under a file, before the work."""
    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file; --out takes a folder (it is created if missing)")
    _out_parent(path, f"--out {out}")


def _out_parent(folder: Path, what: str) -> None:
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{what}: {p} is a file, not a folder; choose a path under a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"{what}: {p} is not writable; choose a folder you can write")
            return


@_bad_input
def cmd_eval(args, overrides) -> int:
    from mixedae_fast.downstream.evaluate import evaluate_encoder, random_init_model
    from mixedae_fast.train.checkpoint import atomic_write_json

    _out_file(args.out)
    if args.k < 1 or args.temperature <= 0 or args.probe_epochs < 1:
        raise ValueError(f"--k {args.k}, --temperature {args.temperature}, --probe-epochs {args.probe_epochs}: "
                         "need k >= 1, temperature > 0, probe epochs >= 1")
    model, cfg, pre, device, amp = _load_run(args, overrides)
    train, val, name = _data(args, cfg, pre, device)
    pools = ["avg", "cls"] if args.pool == "both" else [args.pool]
    t0 = time.perf_counter()
    kw = dict(pool=pools, amp_dtype=amp, probe=not args.no_probe, k=args.k, temperature=args.temperature,
              probe_epochs=args.probe_epochs)
    results = {"pretrained": evaluate_encoder(model, train, val, device, **kw),
               "random_init": evaluate_encoder(random_init_model(cfg, device), train, val, device, **kw)}
    report = {"run": str(args.run), "checkpoint": str(pre.checkpoint), "step": pre.step, "dataset": name,
              "num_train": len(train.dataset), "num_val": len(val.dataset), "num_classes": len(train.classes),
              "k": args.k, "temperature": args.temperature,
              "probe_epochs": None if args.no_probe else args.probe_epochs,
              "results": results, "seconds": time.perf_counter() - t0, **_provenance(args, device)}
    out = atomic_write_json(report, args.out or pre.run_dir / f"eval_{name}.json")
    print(f"\n{'val accuracy %':<26}{'pretrained':>12}{'random init':>14}")
    for pool in pools:
        for metric, label in (("knn", f"kNN k={args.k}"), ("linear_probe", "linear probe")):
            if metric in results["pretrained"][pool]:
                print(f"{label + f' ({pool})':<26}{results['pretrained'][pool][metric]:>12.1f}"
                      f"{results['random_init'][pool][metric]:>14.1f}")
    print(f"\nresults: {out}")
    return 0


@_bad_input
def cmd_finetune(args, overrides) -> int:
    """Fine-tune into ``--out`` (default ``RUN/finetune_<dataset>``; finetune_folder.py says what it holds).
    Under torchrun (``torchrun --nproc-per-node=N -m mixedae_fast.cli finetune RUN``) every rank trains its
    shard in DDP; rank 0 prints, holds the folder's lock and writes the checkpoints, export and results."""
    import contextlib

    from mixedae_fast.config import config_to_dict
    from mixedae_fast.downstream import finetune_folder as folder
    from mixedae_fast.downstream.evaluate import eval_folders, image_loaders, random_init_model
    from mixedae_fast.downstream.finetune import FinetuneConfig, RandAugmentPIL, finetune
    from mixedae_fast.train.checkpoint import atomic_write_json
    from mixedae_fast.train.distributed import init_distributed

    fcfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)
                             if hasattr(args, f.name)})
    resume = args.resume or ("auto" if args.eval_only else "none")
    if args.baseline and resume not in ("none", "auto"):
        raise ValueError(f"--resume {resume} names one checkpoint, and --baseline fine-tunes two classifiers; use "
                         "--resume auto (each continues from the newest checkpoint in its folder)")
    if args.max_train is not None and args.max_train < 1:
        raise ValueError(f"--max-train {args.max_train}: must be >= 1")
    _out_dir(args.out)
    model, cfg, pre, device, amp = _load_run(args, overrides)
    dist = init_distributed(cfg)
    if dist.active:
        device = dist.device
        model = model.to(device)
    train_dir, val_dir, name = eval_folders(args.dataset, cfg, args.data_dir, run_dir=pre.run_dir)
    out_dir = Path(args.out) if args.out else pre.run_dir / f"finetune_{name}"
    folders = {"pretrained": out_dir, **({"random_init": out_dir / folder.BASELINE} if args.baseline else {})}
    if args.eval_only:
        return _finetune_eval_only(args, cfg, model, device, amp, val_dir, name, folders, resume, dist)
    folder.check_out_dir(out_dir, resume)  # before the data is read; again under the lock
    spec = fcfg.regularisation(cfg.model.depth)["auto_augment"]
    train, val = image_loaders(train_dir, val_dir, cfg.model.img_size, device, batch_size=fcfg.batch_size,
                               max_train=args.max_train, augment_train=True, crop_scale=fcfg.crop_scale, seed=fcfg.seed,
                               num_workers=cfg.data.num_workers, shard_id=dist.rank, num_shards=dist.world_size,
                               pil_transform=RandAugmentPIL(spec, cfg.model.img_size, fcfg.seed) if spec else None)
    say = print if dist.is_main else (lambda *a, **k: None)
    say(f"data {name}: {len(train.dataset)} train / {len(val.dataset)} val images, {len(train.classes)} classes "
        f"({train_dir}); fine-tune folder {out_dir}", flush=True)
    record = {"model_config": config_to_dict(cfg)["model"], "classes": list(train.classes), "dataset": name,
              "source": {"run": str(args.run), "checkpoint": str(pre.checkpoint), "step": pre.step}}
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    with folder.FinetuneLock(out_dir) if dist.is_main else contextlib.nullcontext():
        folder.check_out_dir(out_dir, resume)
        for label, where in folders.items():
            m = model if label == "pretrained" else random_init_model(cfg, device)
            state = _finetune_resume_state(folder, where, resume, fcfg, record, label, dist, device, say)
            try:
                results[label] = finetune(m, train, val, len(train.classes), device, fcfg, amp,
                                          not args.no_progress and dist.is_main, desc=label.replace("_", " "),
                                          dist=dist if dist.active else None, out_dir=where, resume=state,
                                          record=record)
            except KeyboardInterrupt:
                say(f"fine-tune stopped: the same command with --resume auto continues it after the newest "
                    f"checkpoint in {where / 'checkpoints'}", file=sys.stderr, flush=True)
                raise
        dist.close()
        if not dist.is_main:
            return 0
        report = {"run": str(args.run), "checkpoint": str(pre.checkpoint), "step": pre.step, "dataset": name,
                  "num_train": len(train.dataset), "num_val": len(val.dataset), "num_classes": len(train.classes),
                  "classes": list(train.classes), "ranks": dist.world_size, "out_dir": str(out_dir),
                  "results": results, **_provenance(args, device)}
        out = atomic_write_json(report, out_dir / folder.RESULTS)
    print(f"\n{'fine-tune, val %':<26}" + "".join(f"{k.replace('_', ' '):>14}" for k in results))
    for key, label in (("val_top1", "top-1, last epoch"), ("val_top5", "top-5, last epoch"),
                       ("best_val_top1", "top-1, best epoch"), ("seconds", "time, s")):
        print(f"{label:<26}" + "".join(f"{r[key]:>14.1f}" for r in results.values()))
    first = results["pretrained"]
    reg = first["regularisation"]
    print(f"({fcfg.epochs} epochs, global batch {first['global_batch']} = {fcfg.batch_size} x {fcfg.accum_steps} "
          f"accumulated x {dist.world_size} rank(s), peak lr {first['peak_lr']:.3g}, layer decay "
          f"{first['layer_decay']}, recipe {reg['recipe']}: "
          + ", ".join(f"{k} {v}" for k, v in reg.items() if k != "recipe") + ")")
    for label, r in results.items():
        export = r["export"]
        check = ("kept as it was" if export["parity"] is None else
                 f"loaded back through timm, logits within {export['parity']:.1e} of ours")
        print(f"{label.replace('_', ' ')}: checkpoint {r['checkpoint']}\n  timm export {export['dir']} ({check}); "
              f"load: timm.create_model('local-dir:{export['dir']}', pretrained=True)")
    print(f"results: {out}")
    return 0


def _finetune_resume_state(folder, where: Path, resume: str, fcfg, record: dict, label: str, dist, device, say):
    """The checkpoint ``resume`` names for the classifier fine-tuned in ``where`` (None: a fresh start),
    checked against this fine-tune; on rank 0 the later checkpoints of an abandoned branch move aside."""
    path = folder.find_checkpoint(where, resume)
    state = folder.load_finetune_checkpoint(path, device) if path is not None else None
    if state is not None:
        meta = dict(record, label=label.replace("_", " "), settings=dataclasses.asdict(fcfg),
                    global_batch=fcfg.global_batch(dist.world_size), world_size=dist.world_size)
        for note in folder.check_resume(state, meta):
            say(f"resume note: {note}", flush=True)
        say(f"{label.replace('_', ' ')}: resuming after epoch {state['epoch']} of {fcfg.epochs} from {path}",
            flush=True)
    epoch = int(state["epoch"]) if state is not None else 0
    dist.check_same(epoch, "the epoch to resume after", "every rank must see the same fine-tune folder")
    if state is not None and dist.is_main:
        aside = folder.set_aside_later(where, epoch)
        if aside is not None:
            say(f"resume: the later checkpoints, export and results of the abandoned branch moved to {aside}",
                flush=True)
    return state


def _finetune_eval_only(args, cfg, model, device, amp, val_dir, name, folders, resume, dist) -> int:
    """``finetune --eval-only``: each fine-tuned classifier (its newest checkpoint, or --resume's) scored on
    val; nothing is written."""
    from mixedae_fast.config import config_to_dict
    from mixedae_fast.downstream import finetune_folder as folder
    from mixedae_fast.downstream.evaluate import random_init_model
    from mixedae_fast.downstream.finetune import ViTClassifier, evaluate_classifier
    from mixedae_fast.pipelines.torch_loader import FileImageLoader

    val = FileImageLoader(val_dir, batch_size=250, img_size=cfg.model.img_size, device=device, augment=False,
                          shuffle=False, drop_last=False, num_workers=cfg.data.num_workers)
    for label, where in folders.items():
        path = folder.find_checkpoint(where, resume if label == "pretrained" else "auto")
        if path is None:
            raise ValueError(f"--eval-only: no fine-tune checkpoint in {where / 'checkpoints'}; fine-tune first (the "
                             "same command without --eval-only), or pass --resume PATH")
        state = folder.load_finetune_checkpoint(path, device)
        if state.get("model_config") != config_to_dict(cfg)["model"]:
            raise ValueError(f"{path} fine-tunes another architecture than {args.run}; pass the run it came from "
                             f"({(state.get('source') or {}).get('run')})")
        if list(state.get("classes") or []) != list(val.classes):
            raise ValueError(f"{path} was fine-tuned on other classes than {val_dir} holds ({len(state['classes'])} "
                             f"vs {len(val.classes)}); evaluate it on its own data set "
                             f"({state.get('dataset')})")
        m = model if label == "pretrained" else random_init_model(cfg, device)
        clf = ViTClassifier(m, len(val.classes)).to(device)
        clf.load_state_dict(state["classifier"])
        figures = evaluate_classifier(clf, val, device, amp)
        if dist.is_main:
            print(f"{label.replace('_', ' ')} (eval only) {path}, after epoch {state['epoch']}: val top-1 "
                  f"{figures['top1']:.1f} top-5 {figures['top5']:.1f}, loss {figures['loss']:.4f} "
                  f"({figures['images']} {name} images)", flush=True)
    dist.close()
    return 0


@_bad_input
def cmd_export(args, overrides) -> int:
    from mixedae_fast.downstream.export import PARITY_LIMIT, export_run, push_to_hub
    from mixedae_fast.train.checkpoint import load_pretrained

    if overrides:
        raise ValueError(f"export takes no config overrides (got {overrides})")
    _out_dir(args.out)
    pre = load_pretrained(args.run)
    out = export_run(pre, Path(args.out) if args.out else pre.run_dir / "export_timm", args.pool,
                     check=not args.no_check, license=args.license, datasets=args.dataset)
    print(f"{out['dir']}: config.json, model.safetensors, README.md (timm's hub layout)\n"
          f"load: timm.create_model({'local-dir:' + str(out['dir'])!r}, pretrained=True)")
    if out["parity"] is not None:
        print(f"check: timm loaded it strictly; features ({args.pool}) of 4 random images differ by "
              f"{out['parity']:.2e} (max |ours - timm| / max |ours|, limit {PARITY_LIMIT:g})")
    if args.push_to_hub:
        print(f"pushed to the Hugging Face Hub: {push_to_hub(out['dir'], args.push_to_hub, args.private)}")
    return 0


@_bad_input
def cmd_visualize(args, overrides) -> int:
    from mixedae_fast.downstream.visualize import homologous_figure, pick_group, plot_loss_curve, reconstruction_figure

    _out_dir(args.out)
    model, cfg, pre, device, _ = _load_run(args, overrides)
    _, val, _ = _data(args, cfg, pre, device)
    images, labels = next(iter(val))
    group = pick_group(images, labels, model.group_size)
    out_dir = Path(args.out) if args.out else pre.run_dir / "pictures"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(reconstruction_figure(model, group, out_dir / "reconstruction.png", args.seed, args.step))
    if model.group_size > 1:
        path, sel = homologous_figure(model, group, out_dir / "homologous.png", args.query, args.block, args.seed,
                                      args.step)
        print(f"{path}\nblock {sel['block']}, query token {sel['query']}: of its top-{sel['topk']} keys (itself "
              f"excluded) {sel['query_recognition']:.3f} come from its own source, per head "
              f"{', '.join(f'{v:.2f}' for v in sel['query_recognition_per_head'])}; this block's recognition "
              f"accuracy over the group {sel['block_recognition']:.3f} (chance {sel['chance']:.3f})")
    if (pre.run_dir / "metrics.csv").is_file():
        print(plot_loss_curve(pre.run_dir / "metrics.csv", out_dir / "loss_curve.png"))
    return 0


def main(argv=None) -> int:
    """Every failure ends in one ``error: ...`` line on stderr and a non-zero exit: 2 for bad input (a
    config, a path, a run), 1 for a failure on the way (a full disk, a NaN stop), 130 when stopped.
    ``--debug`` or ``MIXEDAE_DEBUG=1`` prints the traceback before it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("MIXEDAE_DEBUG", "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != "--debug"]
    prefer_passive_wait()  # before torch loads OpenMP (mixedae_fast/train/cpu_threads.py says why)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted (Ctrl-C); a run continues from its newest checkpoint with --run.resume=auto",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every failure is turned into its line
        if debug:
            traceback.print_exc()
        code, message = _error_line(e, debug)
        print(f"error: {message}", file=sys.stderr, flush=True)
        return code


def _error_line(e: Exception, debug: bool) -> tuple[int, str]:
    """``(exit code, message)``: our own errors carry what, why and the fix; others get their first line."""
    import errno

    if (original := worker_error(e)) is not None:  # from a DataLoader worker: its traceback was the message
        return _error_line(original, debug)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (ConfigError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                      IsADirectoryError)):
        return 2, str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.errno and e.strerror and e.strerror != os.strerror(e.errno):
        return (2 if isinstance(e, PermissionError) else 1), e.strerror  # ours: it names the fix
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {e.filename}" if e.filename else ""
        return 1, (f"{e.strerror or first}{where}: the disk is full; free space or write elsewhere "
                   "(run.out_dir, MIXEDAE_CACHE); files already written are intact")
    if isinstance(e, PermissionError):
        return 2, (f"permission denied: {e.filename or first}; choose a folder you can write (run.out_dir, --out, "
                   "MIXEDAE_CACHE)")
    if isinstance(e, OSError):
        return 1, f"{first or e}" + (f" ({e.filename})" if e.filename and str(e.filename) not in first else "")
    if isinstance(e, (FloatingPointError, RunFailure)):
        return 1, first
    hint = "" if debug else "; run again with --debug (or MIXEDAE_DEBUG=1) for the traceback"
    return 1, f"{type(e).__name__}: {first[:500]} (unexpected{hint})"


def cmd_bench(args, overrides) -> int:
    """``mixedae-fast bench``: benchmarks/bench_train.py parses its own options (they import torch, which
    this parser does not), so everything after ``bench`` goes to it as it was typed."""
    from mixedae_fast.benchmarks.bench_train import main as bench_main

    return bench_main(args.argv[args.argv.index("bench") + 1:])


def _progress_where_watched(args) -> None:
    """The progress bar only on a terminal: tqdm draws on stderr, and its frames would fill a redirected log
    or a cluster job's file, so a stderr that is not a terminal turns it off unless ``--progress`` forces it.
    ``launch`` passes the options on as given: each rank decides on its own stderr."""
    if args.command == "launch":
        return
    if hasattr(args, "no_progress") and not args.no_progress and not getattr(args, "progress", False):
        args.no_progress = not sys.stderr.isatty()


def _main(argv: list[str]) -> int:
    args, overrides = _parser(_shown_config(argv)).parse_known_args(argv)
    args.argv = argv
    _progress_where_watched(args)
    if args.command == "bench":
        return cmd_bench(args, overrides)
    bad = [o for o in overrides if "=" not in o or not o.lstrip("-")]
    if bad:
        print(f"error: unrecognised arguments {bad}; config overrides look like --section.key=value",
              file=sys.stderr)
        return 2
    commands = {"pretrain": cmd_pretrain, "config": cmd_config, "make-data": cmd_make_data, "launch": cmd_launch,
                "eval": cmd_eval, "finetune": cmd_finetune, "export": cmd_export, "visualize": cmd_visualize,
                "study": cmd_study}
    return commands[args.command](args, overrides)


if __name__ == "__main__":
    sys.exit(main())
