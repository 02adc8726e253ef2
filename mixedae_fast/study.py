"""``mixedae-fast study``: named variants x seeds at one step budget, each evaluated, one table.

Every run pretrains a fresh model on the same data for the same number of epochs (so the same number
of optimizer steps and the same schedule), then its frozen encoder is evaluated (mean-pooled
features): weighted kNN, a linear probe and nearest-class-mean few-shot. Two evaluation splits are
kept apart: choices between variants are made on the *select* split (by default a held-out part of
the training folder, disjoint from the labelled bank that kNN / probe / few-shot fit on) and the
table reports the *report* split (by default val). Both are written down in the output.

Layout of a study folder (``--out``)::

    runs/<variant>-seed<k>/    the run (config.yaml, metrics.csv, checkpoints/); resumed if interrupted
    results/<variant>-seed<k>.json   its finished result; a rerun skips runs that have one
    logs/<variant>-seed<k>.log       its output, when runs train side by side (``--jobs`` > 1)
    study.md, study.json, study.csv, study.png   the table (mean ± std over seeds) and its plot

With ``--jobs`` > 1 each run is a child process (``python -m mixedae_fast.cli study`` for that one
variant and seed, ``OMP_NUM_THREADS`` = cores / jobs) and this process schedules them, counts them on
the progress bar and writes the table.

Variants are named config overrides (:data:`VARIANTS`), applied after ``--config`` and the command
line's own ``--section.key=value`` overrides. This module imports torch only inside functions (the
command line starts fast).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shlex
from pathlib import Path

from mixedae_fast.choices import EMBEDDED, OFFLINE_DATASETS
from mixedae_fast.study_eval import (  # noqa: F401 (split_indices, few_shot_accuracy: the study's API)
    data_folders,
    evaluate_run,
    few_shot_accuracy,
    fmt_ms,
    mean_std,
    split_indices,
)

# name -> (what it is, its config overrides)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mae": ("MAE mode (r = 1, global attention, no HC)",
            ("--mixing.group_size=1", "--mixing.ha=none", "--mixing.hc_weight=0")),
    "oracle": ("oracle: same-source keys only, no HC", ("--mixing.ha=oracle", "--mixing.hc_weight=0")),
    "naive": ("naive mixing: global attention, no HC", ("--mixing.ha=none", "--mixing.hc_weight=0")),
    "topk": ("TopK, no HC loss", ("--mixing.ha=topk", "--mixing.hc_weight=0")),
    "default": ("TopK + the config's HC loss as it stands (since 2026-11-30: InfoNCE on head 0 only)", ()),
    "hc_all": ("TopK + InfoNCE HC on every head (the default before 2026-11-30)",
               ("--mixing.ha=topk", "--mixing.hc_heads=null")),
    "hc_head0": ("TopK + InfoNCE HC on head 0 only", ("--mixing.ha=topk", "--mixing.hc_heads=1")),
    "supcon_head0": ("TopK + per-positive (SupCon) HC on head 0: every same-source key pulled up",
                     ("--mixing.ha=topk", "--mixing.hc_heads=1", "--mixing.hc_form=supcon")),
    "supcon_w03": ("TopK + per-positive (SupCon) HC on head 0 at weight 0.3",
                   ("--mixing.ha=topk", "--mixing.hc_heads=1", "--mixing.hc_form=supcon", "--mixing.hc_weight=0.3")),
    "supcon_w01": ("TopK + per-positive (SupCon) HC on head 0 at weight 0.1",
                   ("--mixing.ha=topk", "--mixing.hc_heads=1", "--mixing.hc_form=supcon", "--mixing.hc_weight=0.1")),
    "hc_k8": ("TopK with K = 8 (half of cpu_tiny's n = 16) + InfoNCE HC on head 0",
              ("--mixing.ha=topk", "--mixing.hc_heads=1", "--mixing.topk=8")),
    "supcon_k8": ("TopK with K = 8 + per-positive (SupCon) HC on head 0",
                  ("--mixing.ha=topk", "--mixing.hc_heads=1", "--mixing.hc_form=supcon", "--mixing.topk=8")),
}
# what `mixedae-fast study` runs without --variants: the references, the default, the former default and
# the SupCon form (the best on the embedded set, below naive mixing on `digits`). The HC forms that lost to
# MAE mode on both the embedded set and `digits` in the 2026-11-30 studies (the hinge forms, the gradient
# into q/k only, the separate selection projection, the query forced in) left the code after git 01c425d;
# their rows stay in benchmarks/results/2026-11-30_cpu-2cores-study*/ and docs/study.md.
DEFAULT_VARIANTS = ("mae", "oracle", "naive", "topk", "default", "hc_all", "supcon_w03", "supcon_head0")
SPLITS = ("heldout", "val")
DATASETS = (EMBEDDED[0], *OFFLINE_DATASETS)
METRICS = ("knn", "linear_probe", "few_shot")
TRAIN_STATS = ("recognition", "jaccard", "w_self", "loss_rec", "loss_hc")


class StudyError(ValueError):
    """Bad study input: the message says what, why and the fix."""


def variant_overrides(name: str) -> tuple[str, ...]:
    if name not in VARIANTS:
        raise StudyError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return VARIANTS[name][1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated names (default: {', '.join(DEFAULT_VARIANTS)}); all: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=4,
                   help="the budget: epochs of the training folder per run, the same for every variant (default 4: "
                        "624 steps of cpu_tiny on the embedded set; docs/study.md says what the default study took)")
    p.add_argument("--dataset", default="embedded", choices=DATASETS,
                   help="embedded scenes (default) or a real set shipped with scikit-learn/-image")
    p.add_argument("--data-dir", default=None,
                   help="any folder with train/ and val/ (ImageFolder); overrides --dataset")
    p.add_argument("--out", default=None, help="study folder (default runs/study-<dataset>); a rerun resumes it")
    p.add_argument("--select-split", default="heldout", choices=SPLITS,
                   help="where variants are compared and chosen (default: heldout = a held-out part of the training "
                        "folder, never in the labelled bank)")
    p.add_argument("--report-split", default="val", choices=SPLITS, help="what the table reports (default val)")
    p.add_argument("--heldout", type=float, default=0.2,
                   help="fraction of the training folder held out for the select split (default 0.2, at most 1000)")
    p.add_argument("--shots", type=int, default=5, help="few-shot: labelled images per class (default 5)")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--jobs", default="auto",
                   help="runs trained side by side, each a process with cores/jobs threads (default auto: one per "
                        "usable core, at most 8, on a CPU device; 1 with a GPU). At cpu_tiny's size on 2 cores, two "
                        "one-thread processes train ~500 img/s together, one two-thread process ~400")
    p.add_argument("--curve", action="store_true",
                   help="after the runs: kNN of every checkpoint they kept (keep some with --run.ckpt_every=N "
                        "--run.keep_last=M) beside the logged recognition and attention mass: curve.md/.json/.png")
    p.add_argument("--context", action="store_true",
                   help="after the runs: kNN of each final encoder's features of whole images, of their visible "
                        "patches alone and of those inside a mixed group (what mixing does to a source's tokens): "
                        "context.md/.json")
    p.add_argument("--transfer", default=None,
                   help=f"after the runs: their final encoders, frozen, on these data sets (comma-separated, from "
                        f"{', '.join(DATASETS)}): transfer.md/.json")
    p.add_argument("--transfer-finetune-epochs", type=int, default=0,
                   help="with --transfer: also fine-tune each final encoder this many epochs on each target "
                        "(mixedae-fast finetune; default 0 = no)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--worker-of", default=None, help=argparse.SUPPRESS)  # a --jobs child: the parent's command


def parse_list(text: str, what: str, cast=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        items = [cast(t) for t in items]
    except ValueError:
        raise StudyError(f"--{what} {text!r}: not a comma-separated list of {cast.__name__}s") from None
    if not items or len(set(items)) != len(items):
        raise StudyError(f"--{what} {text!r}: give at least one, without repeats")
    return items


def check_args(args) -> tuple[list[str], list[int]]:
    variants = parse_list(args.variants, "variants")
    for v in variants:
        variant_overrides(v)
    seeds = parse_list(args.seeds, "seeds", int)
    if args.select_split == args.report_split:
        raise StudyError(f"--select-split and --report-split are both {args.select_split!r}: choices must be made on "
                         "another split than the one the table reports")
    if args.epochs < 1 or args.shots < 1 or args.probe_epochs < 1 or not 0 < args.heldout < 1:
        raise StudyError(f"--epochs {args.epochs}, --shots {args.shots}, --probe-epochs {args.probe_epochs}, "
                         f"--heldout {args.heldout}: need epochs, shots, probe epochs >= 1 and 0 < heldout < 1")
    if args.transfer is not None:
        args.transfer = parse_list(args.transfer, "transfer")
        unknown = [t for t in args.transfer if t not in DATASETS]
        if unknown:
            raise StudyError(f"--transfer {','.join(args.transfer)}: {unknown[0]!r} is not a data set; choose from "
                             f"{', '.join(DATASETS)}")
    if args.transfer_finetune_epochs < 0 or (args.transfer_finetune_epochs and not args.transfer):
        raise StudyError(f"--transfer-finetune-epochs {args.transfer_finetune_epochs}: give >= 1 together with "
                         "--transfer, or 0")
    if args.jobs != "auto" and not (args.jobs.isdigit() and int(args.jobs) >= 1):
        raise StudyError(f"--jobs {args.jobs!r}: give a number of processes >= 1, or auto")
    return variants, seeds


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_jobs(jobs: str, device: str, todo: int) -> tuple[int, int]:
    """``(processes, threads each)`` for ``--jobs`` on ``device`` (runtime.device) with ``todo`` runs left.
    ``auto``: one single-thread process per usable core (at most 8) on a CPU, one process on a GPU."""
    import torch

    cores = usable_cores()
    on_gpu = device != "cpu" and torch.cuda.is_available()
    n = (1 if on_gpu else min(cores, 8)) if jobs == "auto" else int(jobs)
    n = max(1, min(n, todo))
    return n, max(1, cores // n)


# -- evaluation -------------------------------------------------------------------------------------

# -- one run ---------------------------------------------------------------------------------------

def run_one(cfg, run_dir: Path, train_dir, val_dir, args) -> dict:
    """Pretrain one variant x seed as ``mixedae-fast pretrain`` does (:func:`mixedae_fast.pretrain.pretrain`:
    its run folder, lock, resume, pictures and report; its own evaluation off), then evaluate the final
    checkpoint on the study's splits."""
    import dataclasses

    from mixedae_fast.model.mixedae import build_model
    from mixedae_fast.pretrain import pretrain
    from mixedae_fast.train.checkpoint import load_pretrained
    from mixedae_fast.train.device import resolve_device, resolve_precision

    report = pretrain(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, eval=False)), progress=False)
    device = resolve_device(cfg.runtime.device)
    model = build_model(cfg)
    model.load_state_dict(load_pretrained(run_dir).model_state)
    model.to(device)
    evals = evaluate_run(model, train_dir, val_dir, cfg.model.img_size, device, args.heldout, args.shots,
                         args.probe_epochs, resolve_precision(cfg.runtime.precision, device))
    return {"steps": report["steps"], "train_seconds": report["train_seconds"],
            "resumed_from": report["resumed_from"], "final": report["final"] or {}, "eval": evals}


def _stamp(code_sha: str, command: str | None = None) -> dict:
    """Provenance of a result or table, with the SHA of the code this process loaded (``code_sha``, taken
    when the study starts: a checkout changed while a long study runs must not be written into results
    its process never ran) and, in a ``--jobs`` child, the study's own ``command``."""
    from mixedae_fast.provenance import provenance

    stamp = {**provenance(), "git_sha": code_sha, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    return stamp if command is None else {**stamp, "command": command}


def child_argv(args, overrides, out_dir: Path, variant: str, seed: int, command: str) -> list[str]:
    """The command line of a ``--jobs`` child that trains and evaluates one run of this study."""
    import sys

    where = ["--data-dir", str(args.data_dir)] if args.data_dir is not None else ["--dataset", args.dataset]
    return [sys.executable, "-m", "mixedae_fast.cli", "study", "--config", args.config, *where,
            "--out", str(out_dir), "--variants", variant, "--seeds", str(seed), "--epochs", str(args.epochs),
            "--select-split", args.select_split, "--report-split", args.report_split, "--heldout", str(args.heldout),
            "--shots", str(args.shots), "--probe-epochs", str(args.probe_epochs), "--jobs", "1", "--no-progress",
            "--worker-of", command, *overrides]


def run_children(todo, jobs: int, threads: int, argv_of, log_dir: Path, bar, stop_wait_s: float = 120.0) -> None:
    """Run ``todo`` (variant, seed) pairs as child processes, ``jobs`` at a time with ``threads`` threads
    each; each child's output goes to ``log_dir/<variant>-seed<k>.log``. Raises :class:`RunFailure` naming
    the first child that failed (the others still running are let finish), KeyboardInterrupt (Ctrl-C) or
    :class:`StopRequested` (SIGTERM) after passing the signal on to the children and waiting for them
    (each saves a checkpoint on it, as a run does; at most ``stop_wait_s``, then they are killed: the
    checkpoints are atomic). Logs are appended to, never truncated: a rerun while an old child still
    runs cannot wipe what it writes."""
    import signal
    import subprocess
    import time

    from mixedae_fast.errors import RunFailure
    from mixedae_fast.train.engine import StopRequested

    def on_term(signum, frame):
        raise StopRequested("SIGTERM")

    old_term = signal.signal(signal.SIGTERM, on_term)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    queue, running, failed, shown = list(todo), {}, [], None
    try:
        while queue or running:
            while queue and len(running) < jobs and not failed:
                v, s = queue.pop(0)
                log = log_dir / f"{v}-seed{s}.log"
                with open(log, "ab") as f:
                    f.write(f"--- study run {v}-seed{s} started {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
                            " ---\n".encode())
                    f.flush()
                    running[(v, s)] = (subprocess.Popen(argv_of(v, s), stdout=f, stderr=subprocess.STDOUT, env=env),
                                       log)
            now = ", ".join(f"{v}-seed{s}" for v, s in running)
            if now != shown:
                bar.set_postfix_str(shown := now)
            time.sleep(0.5)
            for key, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[key]
                if proc.returncode == 0:
                    bar.update(1)
                else:
                    failed.append((key, proc.returncode, log))
            if failed and not running:
                break
    except (KeyboardInterrupt, StopRequested) as e:
        sig = signal.SIGTERM if isinstance(e, StopRequested) else signal.SIGINT
        for proc, _ in running.values():
            proc.send_signal(sig)
        deadline = time.monotonic() + stop_wait_s
        for proc, _ in running.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if failed:
        (v, s), code, log = failed[0]
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "no output")
        raise RunFailure(f"study run {v}-seed{s} failed (exit {code}): {last.removeprefix('error: ')}; its log: {log}; "
                         "finished runs are kept, rerun the same command to continue")


# -- the table ---------------------------------------------------------------------------------------

def summarize(results: dict[str, list[dict]], select: str, report: str) -> list[dict]:
    """One row per variant: mean and std over seeds of each metric on both splits and of the last
    logged training stats."""
    rows = []
    for name, runs in results.items():
        row = {"variant": name, "description": VARIANTS[name][0], "seeds": [r["seed"] for r in runs],
               "steps": runs[0]["steps"] if runs else None}
        for split in (select, report):
            for metric in METRICS:
                row[f"{split}/{metric}"] = mean_std([r["eval"][split][metric] for r in runs])
        for stat in TRAIN_STATS:
            row[stat] = mean_std([r["final"].get(stat) for r in runs])
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], select: str, report: str, meta: dict) -> str:
    best = max(rows, key=lambda r: -math.inf if r[f"{select}/knn"][0] is None else r[f"{select}/knn"][0])
    head = (f"| variant | {report} kNN | {report} probe | {report} {meta['shots']}-shot | {select} kNN | "
            f"{select} probe | recognition | head Jaccard | w_self |")
    lines = [head, "|" + " --- |" + " ---: |" * 8]
    for r in rows:
        cells = [fmt_ms(r[f"{report}/{m}"]) for m in METRICS] + [fmt_ms(r[f"{select}/{m}"]) for m in METRICS[:2]]
        cells += [fmt_ms(r[s], 2) for s in ("recognition", "jaccard", "w_self")]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    notes = [
        f"Study: {meta['dataset']}, {meta['runs']} runs ({len(rows)} variants x seeds {meta['seeds']}), "
        f"{meta['epochs']} epochs = {meta['steps']} steps each, config {meta['config']} "
        f"{' '.join(meta['overrides'])}".rstrip() + ".",
        f"Mean ± sample std over seeds (no ± with one seed). Mean-pooled features; kNN (k 20, τ 0.07), linear probe "
        f"({meta['probe_epochs']} epochs) and {meta['shots']}-shot nearest class mean fit on a bank of "
        f"{meta['sizes']['bank']} training images. Select split: {select} ({meta['sizes'][select]} images); report "
        f"split: {report} ({meta['sizes'][report]} images). Recognition, head Jaccard, w_self: the last logged "
        "training step, mean over homologous blocks (– where the variant has no TopK).",
        f"Chosen on the {select} split (best kNN): {best['variant']}.",
        f"Table written by git {meta['git_sha']} on {meta['machine']}, OMP_NUM_THREADS={meta['omp_num_threads']}, "
        f"{meta['date']}; the runs' code: " + ", ".join(f"{sha} ({n} runs)" for sha, n in
                                                         meta.get("run_shas", {}).items()) + ".",
        f"Command: {meta['command']}",
    ]
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def write_outputs(out_dir: Path, rows: list[dict], select: str, report: str, meta: dict) -> list[Path]:
    import csv

    from mixedae_fast.train.checkpoint import atomic_write_json

    paths = [atomic_write_json({"meta": meta, "select_split": select, "report_split": report, "rows": rows},
                               out_dir / "study.json")]
    md = out_dir / "study.md"
    md.write_text(markdown_table(rows, select, report, meta))
    paths.append(md)
    keys = [k for k in rows[0] if k not in ("description", "seeds")]
    with open(out_dir / "study.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seeds"] + [f"{k}_{part}" for k in keys[1:] if isinstance(rows[0][k], tuple)
                                           for part in ("mean", "std")] + ["select_split", "report_split"])
        for r in rows:
            vals = []
            for k in keys[1:]:
                if isinstance(r[k], tuple):
                    vals += [r[k][0], "" if r[k][1] is None else r[k][1]]
            w.writerow([r["variant"], " ".join(map(str, r["seeds"]))] + vals + [select, report])
    paths.append(out_dir / "study.csv")
    paths.append(plot_study(rows, report, out_dir / "study.png", meta))
    return paths


def plot_study(rows: list[dict], report: str, out_png: Path, meta: dict) -> Path:
    from mixedae_fast.downstream.visualize import _pyplot, _save

    plt = _pyplot()
    names = [r["variant"] for r in rows]
    x = list(range(len(rows)))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(rows) + 4), 3.8), dpi=100,
                                  gridspec_kw={"width_ratios": [2, 1]})
    width = 0.27
    for j, (metric, label) in enumerate((("knn", "kNN"), ("linear_probe", "linear probe"),
                                         ("few_shot", f"{meta['shots']}-shot"))):
        means = [r[f"{report}/{metric}"][0] or 0.0 for r in rows]
        errs = [r[f"{report}/{metric}"][1] or 0.0 for r in rows]
        ax.bar([i + (j - 1) * width for i in x], means, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"{report} accuracy %")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{meta['dataset']}: {meta['steps']} steps, seeds {meta['seeds']}", fontsize=9)
    for stat, marker in (("recognition", "o"), ("jaccard", "s")):
        ax2.plot(x, [math.nan if r[stat][0] is None else r[stat][0] for r in rows], marker, label=stat)
    ax2.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax2.set_ylim(0, 1.05)
    ax2.legend(fontsize=7)
    ax2.set_title("last logged step, mean over blocks", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


# -- the command ---------------------------------------------------------------------------------------

def run_study(args, overrides, command: list[str] | None = None) -> int:
    """``mixedae-fast study``: run what is missing, then write the table and the plot. ``command``: the
    command line as typed (``["mixedae-fast", "study", ...]``), written into the results."""
    import sys

    from tqdm import tqdm

    from mixedae_fast.config import load_config
    from mixedae_fast.provenance import git_sha
    from mixedae_fast.train.checkpoint import atomic_write_json
    from mixedae_fast.train.engine import StopRequested

    variants, seeds = check_args(args)
    code_sha = git_sha()
    base = load_config(args.config, overrides)
    train_dir, val_dir, dataset = data_folders(args.dataset, args.data_dir, base.model.img_size)
    out_dir = Path(args.out or Path(base.run.out_dir) / f"study-{dataset}")
    (out_dir / "results").mkdir(parents=True, exist_ok=True)
    common = list(overrides) + [f"--data.path={train_dir}", f"--data.val_path={val_dir}", "--data.format=imagefolder",
                                f"--optim.epochs={args.epochs}", f"--run.out_dir={out_dir / 'runs'}"]
    plan = [(v, s) for v in variants for s in seeds]
    todo = []
    for v, s in plan:  # a finished run is kept, at this call's budget only
        done = out_dir / "results" / f"{v}-seed{s}.json"
        if not done.is_file():
            todo.append((v, s))
            continue
        epochs = json.loads(done.read_text()).get("epochs", args.epochs)
        if epochs != args.epochs:
            raise StudyError(f"{done} was trained for --epochs {epochs}, this call asks for {args.epochs}: rerun with "
                             f"--epochs {epochs}, or give another --out for the new budget")
    command = args.worker_of or (shlex.join(command) if command else "mixedae-fast study")
    jobs, threads = resolve_jobs(args.jobs, base.runtime.device, len(todo))
    if not args.worker_of:
        print(f"study {out_dir}: {len(plan)} runs ({len(plan) - len(todo)} done), {args.epochs} epochs each on "
              f"{dataset} ({train_dir}); select on {args.select_split}, report {args.report_split}"
              + (f"; {jobs} runs at a time, {threads} thread(s) each (logs in {out_dir / 'logs'})" if jobs > 1 else ""),
              flush=True)
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="study", unit="run", dynamic_ncols=True,
               disable=args.no_progress)
    try:
        if jobs > 1:
            try:
                run_children(todo, jobs, threads,
                             lambda v, s: child_argv(args, overrides, out_dir.resolve(), v, s, command),
                             out_dir / "logs", bar)
            except (KeyboardInterrupt, StopRequested) as e:
                bar.close()
                what = "SIGTERM" if isinstance(e, StopRequested) else "interrupted (Ctrl-C)"
                print(f"{what}: the study's runs in progress got the signal and were waited for (each saves its last "
                      "step); rerun the same command to continue the study", file=sys.stderr)
                return 130
            todo = []
        for v, s in todo:
            name = f"{v}-seed{s}"
            bar.set_postfix_str(name)
            run_dir = out_dir / "runs" / name
            # auto also when there is no checkpoint: a run that failed before its first one restarts from step
            # 0 in its folder (its metrics rows dropped), where "none" would refuse the folder for ever
            cfg = load_config(args.config, common + list(variant_overrides(v))
                              + [f"--run.name={name}", f"--run.seed={s}", "--run.resume=auto"])
            try:
                result = run_one(cfg, run_dir, train_dir, val_dir, args)
            except StopRequested as stop:  # the trainer saved a checkpoint: the same command continues it
                bar.close()
                print(f"{stop}: {name} saved at its last step; rerun the same command to continue the study",
                      file=sys.stderr)
                return 130
            result.update(variant=v, seed=s, epochs=args.epochs, overrides=list(variant_overrides(v)),
                          **_stamp(code_sha, args.worker_of))
            atomic_write_json(result, out_dir / "results" / f"{name}.json")
            bar.update(1)
    finally:
        bar.close()
    if args.worker_of:
        return 0  # the parent writes the table
    results = {v: [json.loads((out_dir / "results" / f"{v}-seed{s}.json").read_text()) for s in seeds]
               for v in variants}
    first = results[variants[0]][0]
    meta = {"dataset": dataset, "train_dir": str(train_dir), "val_dir": str(val_dir), "epochs": args.epochs,
            "steps": first["steps"], "seeds": seeds, "runs": len(plan), "config": args.config,
            "overrides": list(overrides), "shots": args.shots, "probe_epochs": args.probe_epochs,
            "heldout_fraction": args.heldout, "sizes": first["eval"]["sizes"],
            **_stamp(code_sha, command),
            "run_shas": dict(collections.Counter(r.get("git_sha", "unknown") for rs in results.values() for r in rs))}
    rows = summarize(results, args.select_split, args.report_split)
    paths = write_outputs(out_dir, rows, args.select_split, args.report_split, meta)
    if args.curve or args.context or args.transfer:
        from mixedae_fast.study_eval import run_followups
        from mixedae_fast.train.device import resolve_device

        paths += run_followups(out_dir, variants, seeds, train_dir, val_dir, dataset, base.model.img_size, args,
                               resolve_device(base.runtime.device), _stamp(code_sha, command))
    for path in paths:
        print(path)
    return 0
