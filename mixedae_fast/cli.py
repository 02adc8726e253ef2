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
import os
import sys
import traceback
from pathlib import Path

from mixedae_fast.choices import EMBEDDED, EMBEDDED_NUM_TRAIN, EMBEDDED_NUM_VAL, OFFLINE_DATASETS
from mixedae_fast.config import ConfigError, available_presets, load_config
from mixedae_fast.config_docs import describe_config, resolved_yaml
from mixedae_fast.errors import error_line
from mixedae_fast.provenance import version_line
from mixedae_fast.study import add_arguments as add_study_arguments
from mixedae_fast.study import run_study
from mixedae_fast.train.cpu_threads import prefer_passive_wait
from mixedae_fast.train.launch import SlurmJob, launch_local, launch_slurm

# A command whose job loads torch (or numpy) imports it inside its function, in one place: `--help`,
# `--version`, `config` and `launch` stay fast, and main() sets the OpenMP wait policy before torch loads.


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
    pt = sub.add_parser("pretrain", parents=[common, pretrain_opts], **keys,
                        help="MixedAE pretraining, then evaluation and a report")
    pt.add_argument("--run.name", dest="run_name", default=None, metavar="NAME", help="the run folder's name "
                    "(config key run.name): a taken one is refused; unnamed, a rerun takes the next free <name>-1")
    _list_config_keys(pt, shown)
    _list_config_keys(sub.add_parser("config", parents=[common], **keys,
                                     help="print the resolved config as YAML, the derived values as a commented block"),
                      shown)
    bench = sub.add_parser("bench", add_help=False, prefix_chars="\0", help="training throughput: MixedAE vs MAE vs "
                           "the official recipe (mixedae-fast bench --help)")
    # benchmarks/bench_train.py builds its own options (importing torch): every word after `bench` is one of
    # them, passed on as typed (no char of this parser's prefix_chars starts a command-line word)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    md = sub.add_parser("make-data", help="write a dataset as JPEGs (ImageFolder layout, train/ and val/), cached")
    md.add_argument("--dataset", default=EMBEDDED[0], choices=(*EMBEDDED, *OFFLINE_DATASETS),
                    help="the embedded scenes (default), or real images shipped with scikit-learn/-image")
    md.add_argument("--out", default=None, help="target folder (default: under $MIXEDAE_CACHE)")
    md.add_argument("--size", type=int, default=32, help="image side in pixels")
    md.add_argument("--num-train", type=int, default=EMBEDDED_NUM_TRAIN, help="embedded only")
    md.add_argument("--num-val", type=int, default=EMBEDDED_NUM_VAL, help="embedded only")
    md.add_argument("--seed", type=int, default=0)
    _launch_parser(sub, [common, pretrain_opts])
    _downstream_parsers(sub)
    add_study_arguments(sub.add_parser("study", parents=[common], help="named variants x seeds at one step budget, "
                                       "evaluated, one table (mean ± std) and a plot; resumable"))
    return p


class _Version(argparse.Action):
    """``--version``: provenance.version_line, looked up only when asked (it runs git)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def _shown_config(argv: list[str]) -> tuple[str, list[str]]:
    """The ``--config`` and ``--section.key=value`` overrides of ``argv``: ``--help`` lists their values
    (``--config vit_base --help`` shows ViT-B's), not cpu_tiny's. Read before the command line's parser is
    built, as its help needs them."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--config", default="cpu_tiny")
    try:
        given, rest = pre.parse_known_args(argv)
    except argparse.ArgumentError:  # --config without its value: the command line's parser says so
        return "cpu_tiny", []
    return given.config, [a for a in rest if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]]


def _list_config_keys(parser: argparse.ArgumentParser, shown: tuple[str, list[str]]) -> None:
    """``--help`` of ``parser`` ends with every config key (config_docs.py) and its value in ``shown``
    (a config and overrides), built only when help is shown."""
    plain = parser.format_help

    def format_help() -> str:
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
    p.add_argument("--num-train", type=int, default=EMBEDDED_NUM_TRAIN, help="embedded data: training images")
    p.add_argument("--num-val", type=int, default=EMBEDDED_NUM_VAL, help="embedded data: validation images")
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
    data.add_argument("--dataset", default="run", choices=("run", *OFFLINE_DATASETS),
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
    for name, tp, what in _FINETUNE_OPTIONS:
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


# fine-tune options: an option left out takes FinetuneConfig's default (mixedae_fast/downstream/finetune.py)
_FINETUNE_OPTIONS = (
    ("epochs", int, "epochs"), ("batch_size", int, "images a step"),
    ("blr", float, "base lr: lr = blr * batch_size / 256 (default by depth: MAE's 5e-4 for ViT-B, 1e-3 for ViT-L; "
                   "1.6e-2 below 12 blocks)"),
    ("lr", float, "absolute peak lr"),
    ("layer_decay", float, "layer-wise lr decay (default by depth: MAE's 0.65 for ViT-B, 0.75 for ViT-L)"),
    ("weight_decay", float, "AdamW weight decay"), ("warmup_epochs", float, "linear warm-up"),
    ("min_lr", float, "end of the cosine"),
    ("recipe", str, "mae (RandAugment, Mixup/CutMix, random erasing, drop path: MAE's recipe; default from 12 "
                    "blocks) or light (crop + flip; default below)"),
    ("drop_path", float, "stochastic depth (mae recipe 0.1)"),
    ("mixup", float, "Mixup alpha (mae recipe 0.8; 0 = off)"),
    ("cutmix", float, "CutMix alpha (mae recipe 1.0; 0 = off)"),
    ("auto_augment", str, "timm RandAugment spec (mae recipe rand-m9-mstd0.5-inc1; none = off)"),
    ("reprob", float, "random erasing probability (mae recipe 0.25)"),
    ("label_smoothing", float, "label smoothing"), ("seed", int, "seed"),
    ("accum_steps", int, "batches per optimizer step (gradient accumulation; default 1): global batch = batch "
                         "size x this x ranks"),
)


# -- the commands: each converts its options into one call and prints what it returns ------------------

def cmd_pretrain(args, overrides, command) -> int:
    from mixedae_fast.pretrain import pretrain, summary
    from mixedae_fast.train.engine import StopRequested

    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps {args.max_steps}: must be >= 1 (optimizer steps); leave it out to train "
                          "optim.epochs epochs")
    named = args.run_name is not None
    cfg = load_config(args.config, [*overrides, *([f"--run.name={args.run_name}"] if named else [])])
    try:
        report = pretrain(cfg, max_steps=args.max_steps, num_train=args.num_train, num_val=args.num_val,
                          progress=not args.no_progress, name_given=named, command=command)
    except StopRequested:  # saved (and requeued under SLURM); the message said how to continue
        return 130
    if report is not None:  # None: a rank other than 0 under torchrun
        print(summary(report))
    return 0


def cmd_config(args, overrides, command) -> int:
    print(resolved_yaml(load_config(args.config, overrides)), end="")
    return 0


def cmd_bench(args, overrides, command) -> int:
    from mixedae_fast.benchmarks.bench_train import main as bench_main

    return bench_main(args.bench_args)


def cmd_make_data(args, overrides, command) -> int:
    from mixedae_fast.pipelines.offline import write_dataset

    if overrides:
        raise ValueError(f"make-data takes no config overrides (got {' '.join(overrides)}): it only writes a data "
                         "set; pass them to pretrain or finetune, see mixedae-fast make-data --help for its options")
    for flag, value, least in (("--size", args.size, 8), ("--num-train", args.num_train, 1),
                               ("--num-val", args.num_val, 1), ("--seed", args.seed, 0)):
        if value < least:
            raise ValueError(f"make-data {flag} {value}: must be >= {least}; pass {flag} {least} or more, or leave "
                             "it out for its default")
    print(write_dataset(args.dataset, args.out, args.size, args.num_train, args.num_val, args.seed))
    return 0


def cmd_launch(args, overrides, command) -> int:
    cfg = load_config(args.config, overrides)  # a bad config fails here, not in every rank
    pretrain = _pretrain_argv(args, overrides)
    if args.where == "local":
        return launch_local(cfg, args.nproc, pretrain, dry_run=args.dry_run)
    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_gpu=args.cpus_per_gpu,
                   time=args.time, job_name=args.job_name or cfg.run.name, partition=args.partition,
                   account=args.account, qos=args.qos, mem=args.mem, signal_lead_s=args.signal_lead,
                   port=args.port, extra_sbatch=args.sbatch, setup=args.setup)
    return launch_slurm(cfg, job, pretrain, script=args.script, force=args.force, submit=args.submit)


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


def _data_options(args) -> dict:
    """The options of eval / finetune / visualize that name the labelled data and the output."""
    return dict(dataset=args.dataset, data_dir=args.data_dir, max_train=args.max_train, out=args.out)


def cmd_eval(args, overrides, command) -> int:
    from mixedae_fast.downstream.jobs import eval_summary, run_eval

    print(eval_summary(run_eval(args.run, overrides, **_data_options(args), pool=args.pool, k=args.k,
                                temperature=args.temperature, probe_epochs=args.probe_epochs,
                                probe=not args.no_probe, command=command)))
    return 0


def cmd_finetune(args, overrides, command) -> int:
    from mixedae_fast.downstream.jobs import finetune_summary, run_finetune

    settings = {name: getattr(args, name) for name, _, _ in _FINETUNE_OPTIONS if hasattr(args, name)}
    report = run_finetune(args.run, overrides, settings, **_data_options(args), baseline=args.baseline,
                          resume=args.resume, eval_only=args.eval_only, progress=not args.no_progress,
                          command=command)
    if report is not None:  # None: a rank other than 0 under torchrun
        print(finetune_summary(report))
    return 0


def cmd_export(args, overrides, command) -> int:
    from mixedae_fast.downstream.jobs import export_summary, run_export

    print(export_summary(run_export(args.run, overrides, out=args.out, pool=args.pool, check=not args.no_check,
                                    license=args.license, datasets=args.dataset, hub_repo=args.push_to_hub,
                                    private=args.private)))
    return 0


def cmd_visualize(args, overrides, command) -> int:
    from mixedae_fast.downstream.jobs import run_visualize, visualize_summary

    print(visualize_summary(run_visualize(args.run, overrides, **_data_options(args), query=args.query,
                                          block=args.block, seed=args.seed, step=args.step)))
    return 0


def cmd_study(args, overrides, command) -> int:
    return run_study(args, overrides, command)  # a StudyError is a ValueError: main() prints its one error line, exit 2


COMMANDS = {"pretrain": cmd_pretrain, "config": cmd_config, "bench": cmd_bench, "make-data": cmd_make_data,
            "launch": cmd_launch, "eval": cmd_eval, "finetune": cmd_finetune, "export": cmd_export,
            "visualize": cmd_visualize, "study": cmd_study}


# -- one way out: an exit code, and every failure one error line ------------------------------------

def main(argv=None) -> int:
    """Every failure ends in one ``error: ...`` line on stderr and a non-zero exit: 2 for bad input (a
    config, a path, a run), 1 for a failure on the way (a full disk, a NaN stop), 130 when stopped.
    ``--debug`` (anywhere) or ``MIXEDAE_DEBUG=1`` prints the traceback before it. ``argv``: the words after
    the program's name (default: the process's)."""
    debug_flag = argparse.ArgumentParser(add_help=False, allow_abbrev=False, prog="mixedae-fast")
    debug_flag.add_argument("--debug", action="store_true")
    given, argv = debug_flag.parse_known_args(argv)  # the rest in order, for the command line's parser
    debug = given.debug or os.environ.get("MIXEDAE_DEBUG", "").lower() in ("1", "true", "yes")
    prefer_passive_wait()  # before torch loads OpenMP (mixedae_fast/train/cpu_threads.py says why)
    try:
        args, overrides = _parser(_shown_config(argv)).parse_known_args(argv)
        _progress_where_watched(args)
        bad = [o for o in overrides if "=" not in o or not o.lstrip("-")]
        if bad:
            raise ValueError(f"unrecognised arguments {bad}; config overrides look like --section.key=value")
        return COMMANDS[args.command](args, overrides, ["mixedae-fast", *argv])
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted (Ctrl-C); a run continues from its newest checkpoint with --run.resume=auto",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every failure is turned into its line
        if debug:
            traceback.print_exc()
        code, message = error_line(e, debug)
        print(f"error: {message}", file=sys.stderr, flush=True)
        return code


def _progress_where_watched(args) -> None:
    """The progress bar only on a terminal: tqdm draws on stderr, and its frames would fill a redirected log
    or a cluster job's file, so a stderr that is not a terminal turns it off unless ``--progress`` forces it.
    ``launch`` passes the options on as given: each rank decides on its own stderr."""
    if args.command == "launch":
        return
    if hasattr(args, "no_progress") and not args.no_progress and not getattr(args, "progress", False):
        args.no_progress = not sys.stderr.isatty()


if __name__ == "__main__":
    sys.exit(main())
