"""MixedAE pretraining as one call: data, model, resume, training, evaluation, pictures, report.

    from mixedae_fast.config import load_config
    from mixedae_fast.pretrain import pretrain

    report = pretrain(load_config("cpu_tiny", ["--run.name=nb", "--optim.epochs=2"]))
    report["eval"]["pretrained"]["knn"], report["steps"], report["run_dir"]

``mixedae-fast pretrain`` parses its arguments and calls :func:`pretrain`; under torchrun / srun every
rank calls it and rank 0 owns the run folder (its lock, ``config.yaml``, ``metrics.csv``, checkpoints,
``report.json``). A run folder belongs to one run: a taken one is refused unless the run resumes, or
(for a name not given explicitly, on one process) the next free ``<name>-1`` is taken.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from mixedae_fast.choices import EMBEDDED_NUM_TRAIN, EMBEDDED_NUM_VAL
from mixedae_fast.config import (
    Config,
    ConfigError,
    check_backend_on,
    check_resume_target,
    config_to_dict,
    derive,
    save_config,
)


def pretrain(cfg: Config, *, max_steps: int | None = None, num_train: int = EMBEDDED_NUM_TRAIN,
             num_val: int = EMBEDDED_NUM_VAL,
             progress: bool = True, name_given: bool = True, command: list[str] | None = None) -> dict | None:
    """Pretrain ``cfg`` and return the report written to ``runs/<name>/report.json`` (None on ranks
    other than 0). ``max_steps`` stops early (the schedule keeps its length); ``num_train`` /
    ``num_val`` size the embedded data set when ``data.path`` is unset; ``name_given=False`` lets a
    taken run folder become ``<name>-1``. Raises :class:`~mixedae_fast.train.engine.StopRequested` after a
    signal (the checkpoint is saved; SIGUSR1 under SLURM requeues the job first), ``ValueError`` /
    ``ConfigError`` for bad input."""
    from mixedae_fast.train.distributed import init_distributed
    from mixedae_fast.train.loggers import require
    from mixedae_fast.train.runs import RunLock, check_fresh

    check_resume_target(cfg)
    require(cfg.run.loggers)  # a missing logger package refused before a run folder exists
    cfg = fetch_resume(cfg)
    dist = init_distributed(cfg)  # one process: no process group; under torchrun / srun: this rank's
    check_backend_on(cfg, dist.device.type)
    if not name_given and cfg.run.resume == "none" and not dist.active and not dist.env.slurm_job_id:
        cfg = next_free_name(cfg)  # the quickstart run again: a new folder, as timm's -1 (never under torchrun/SLURM)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    init = initial_weights(cfg, run_dir)  # read and checked before the run folder is claimed
    if not dist.is_main:  # rank 0 claims and writes the run folder
        return _run(cfg, dist, run_dir, max_steps, num_train, num_val, progress, command, init)
    with RunLock(writable_run_dir(run_dir)):  # held for the run's life: a second process is refused
        check_fresh(run_dir, cfg.run.resume)
        return _run(cfg, dist, run_dir, max_steps, num_train, num_val, progress, command, init)


def fetch_resume(cfg: Config) -> Config:
    """``cfg`` with an https:// ``run.resume`` replaced by the file it names, downloaded once into torch.hub's
    cache (checkpoint.download_checkpoint)."""
    from mixedae_fast.train.checkpoint import download_checkpoint, is_url

    if not is_url(cfg.run.resume):
        return cfg
    path = download_checkpoint(cfg.run.resume, "run.resume")
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=str(path)))


def initial_weights(cfg: Config, run_dir: Path):
    """The weights ``init.from`` names, mapped onto this model (mixedae_fast/train/init_weights.py), for a run that
    starts afresh; None without init.from or when the run resumes from a checkpoint (whose weights win)."""
    from mixedae_fast.train.checkpoint import list_checkpoints
    from mixedae_fast.train.init_weights import load_init

    resumes = cfg.run.resume not in ("none", "auto") or (cfg.run.resume == "auto"
                                                         and list_checkpoints(run_dir / "checkpoints"))
    return load_init(cfg) if cfg.init.from_ and not resumes else None


def writable_run_dir(run_dir: Path) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the run directory {run_dir} ({e.strerror}); choose another "
                          "with --run.out_dir=PATH or --run.name=NAME") from None
    return run_dir


def next_free_name(cfg: Config) -> Config:
    """``cfg`` itself if its run folder is free, else with ``run.name`` suffixed ``-1``, ``-2``, ... (the
    first free one), said on stdout. Only for a name the user did not give on the command line: an
    explicit ``--run.name`` that is taken is refused (runs.check_fresh)."""
    from mixedae_fast.train.runs import RunFolderError, check_fresh

    base, name, k = Path(cfg.run.out_dir), cfg.run.name, 0
    while True:
        candidate = name if k == 0 else f"{name}-{k}"
        try:
            check_fresh(base / candidate, "none")
        except RunFolderError:
            k += 1
            continue
        if k:
            print(f"run folder {base / name} holds an earlier run: this run is {base / candidate} (continue the "
                  f"earlier one with --run.resume=auto --run.name={name}; choose a name with --run.name)", flush=True)
            return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=candidate))
        return cfg


def _run(cfg, dist, run_dir: Path, max_steps, num_train, num_val, progress, command, init=None) -> dict | None:
    from mixedae_fast.downstream.evaluate import evaluate_encoder, random_init_model
    from mixedae_fast.downstream.visualize import training_pictures
    from mixedae_fast.model.mixedae import build_model
    from mixedae_fast.provenance import provenance
    from mixedae_fast.train.checkpoint import atomic_write_json
    from mixedae_fast.train.cpu_threads import apply_threads
    from mixedae_fast.train.data import build_loaders, write_data_report
    from mixedae_fast.train.device import resolve_precision
    from mixedae_fast.train.distributed import failure_message, requeue_slurm_job, unwrap
    from mixedae_fast.train.engine import StopRequested, Trainer

    device = dist.device
    say = print if dist.is_main else (lambda *a, **k: None)  # rank 0 speaks and writes the run folder
    amp_dtype = resolve_precision(cfg.runtime.precision, device)
    d = derive(cfg, dist.world_size)
    threads = apply_threads(cfg.runtime.threads)
    ranks = f" x {dist.world_size} ranks ({dist.backend}), global batch {d.global_batch}" if dist.active else ""
    say(f"run {run_dir}: MixedAE r={cfg.mixing.group_size} ha={cfg.mixing.ha} hc={cfg.mixing.hc_on} "
        f"(N={d.num_patches}, n={d.n_visible}, K={d.topk}) on {device}{ranks}"
        f"{', ' + threads if device.type == 'cpu' else ''}, "
        f"precision {amp_dtype or torch.float32}, lr {d.lr:.3g}", flush=True)
    t0 = time.perf_counter()
    data = build_loaders(cfg, device, amp_dtype or torch.float32, num_train, num_val,
                         shard_id=dist.rank, num_shards=dist.world_size, progress=progress and dist.is_main)
    train, eval_train, val = data.train, data.bank, data.val
    say(f"data: {data.train_path or 'embedded (in memory)'} via the {data.backend} loader, {len(train)} batches "
        f"an epoch{' per rank' if dist.active else ''} ({time.perf_counter() - t0:.1f}s)", flush=True)
    if data.verify_rate:
        say(f"data: {data.verify_rate}", flush=True)

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    if init is not None:
        model.load_state_dict(init.state, strict=False)  # what it lacks was checked: the parts init.from omits
        say(f"init: {init.describe()}", flush=True)
        init.state.clear()
    model = dist.wrap(model.to(device))
    trainer = Trainer(cfg, model, train, run_dir, device, max_steps=max_steps, progress=progress,
                      pictures=training_pictures, dist=dist,
                      monitor=knn_monitor(eval_train, val, device, amp_dtype) if cfg.run.monitor_every else None)
    if max_steps is not None and trainer.total_steps < trainer.steps_per_epoch * cfg.optim.epochs:
        say(f"stopping after {trainer.total_steps} of the schedule's {trainer.steps_per_epoch * cfg.optim.epochs} "
            "steps (--max-steps): the lr follows the full schedule, so this run ends mid-schedule", flush=True)
    try:
        resumed = trainer.maybe_resume()
        dist.check_same(trainer.step, "the step to resume from",
                        "Every rank reads the checkpoints: run.out_dir must be on a filesystem all nodes share")
        for note in trainer.notes:
            say(f"resume: {note}", flush=True)
        if resumed:
            say(f"resumed from {resumed} at step {trainer.step}", flush=True)
        if dist.is_main:  # only now: a refused resume leaves the run's config.yaml as it was
            save_config(cfg, run_dir / "config.yaml")
            skipped = write_data_report(data, run_dir)
            if skipped:
                say(f"data: {len(data.skipped)} unreadable images skipped, listed in {skipped}", flush=True)
        elif data.skips is not None:  # another rank's shards: its skips in a file of its own, once there are any
            data.skips.path = run_dir / f"skipped_images.rank{dist.rank}.json"
        t0 = time.perf_counter()
        history = trainer.fit()
    except StopRequested as stop:  # saved; the message says how to resume
        dist.close()
        if str(stop) == "SIGUSR1" and dist.is_main and dist.env.slurm_job_id:
            requeue_slurm_job(dist.env.slurm_job_id)
            print(f"requeued SLURM job {dist.env.slurm_job_id}: it resumes with --run.resume=auto", flush=True)
        raise
    except Exception as e:
        message = failure_message(e, dist, trainer.ckpt_dir)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        dist.abandon(1)
    train_s = time.perf_counter() - t0
    dist.close()
    if not dist.is_main:
        return None
    model = unwrap(model)
    report = {"run_dir": str(run_dir), "device": str(device), "ranks": dist.world_size,
              "global_batch": d.global_batch, "steps": trainer.step, "train_seconds": train_s,
              "final": history[-1] if history else None, "config": config_to_dict(cfg),
              "data": {"train_path": data.train_path, "val_path": data.val_path},
              "resumed_from": str(resumed) if resumed else None, "resume_overrides": trainer.overrides,
              **provenance(device, command)}
    if cfg.run.eval and val is None:
        print("no validation data (data.val_path): evaluation skipped", flush=True)
    elif cfg.run.eval:
        report["eval"] = {"pretrained": evaluate_encoder(model, eval_train, val, device, amp_dtype=amp_dtype)}
        report["eval"]["random_init"] = evaluate_encoder(random_init_model(cfg, device), eval_train, val, device,
                                                         amp_dtype=amp_dtype)
    log_final_eval(cfg, run_dir, report.get("eval"), trainer.step)
    report["pictures"] = pictures(model, val or train, run_dir, cfg.run.seed)
    if data.skips is not None and data.skips.samples:  # shard samples skipped as they streamed
        report["data"]["skipped_samples"] = len(data.skips.samples)
        say(f"data: {len(data.skips.samples)} unreadable shard samples skipped, listed in "
            f"{run_dir / 'skipped_images.json'}", flush=True)
    atomic_write_json(report, run_dir / "report.json")
    return report


MONITOR_BATCHES = 4  # the monitor's small bank and query set: this many batches of each


def knn_monitor(bank, val, device, amp_dtype):
    """``monitor(encoder) -> {"knn": top-1 %}`` on the first :data:`MONITOR_BATCHES` batches of the kNN
    bank and of val (None without val data)."""
    import itertools

    from mixedae_fast.downstream.evaluate import evaluate_encoder

    if val is None:
        return None

    class _First:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            return itertools.islice(iter(self.loader), MONITOR_BATCHES)

        def __len__(self):
            return min(len(self.loader), MONITOR_BATCHES)

    small_bank, small_val = _First(bank), _First(val)

    def monitor(encoder) -> dict:
        result = evaluate_encoder(encoder, small_bank, small_val, device, amp_dtype=amp_dtype, probe=False)
        return {"knn": result["knn"]}

    return monitor


def log_final_eval(cfg, run_dir: Path, evaluation: dict | None, step: int) -> None:
    """The final evaluation (report.json's ``eval``) to run.loggers' TensorBoard / W&B as ``eval/...``
    at the run's last step (the same W&B run: its id is kept in the run folder)."""
    from mixedae_fast.train.loggers import Loggers

    if not evaluation or not set(cfg.run.loggers) - {"csv"}:
        return
    log = Loggers(cfg.run.loggers, run_dir, config_to_dict(cfg), cfg.run.name, cfg.run.wandb_project,
                  cfg.run.wandb_entity)
    try:
        log.scalars(evaluation, step, section="eval")
    finally:
        log.close()


def pictures(model, val_loader, run_dir: Path, seed: int) -> dict:
    """The run's loss curve, reconstruction and homologous-attention pictures; their paths."""
    from mixedae_fast.downstream.visualize import homologous_figure, pick_group, plot_loss_curve, reconstruction_figure

    out = {}
    if (run_dir / "metrics.csv").exists():
        out["loss_curve"] = str(plot_loss_curve(run_dir / "metrics.csv", run_dir / "loss_curve.png"))
    images, labels = next(iter(val_loader))
    group = pick_group(images, labels, model.group_size)
    out["reconstruction"] = str(reconstruction_figure(model, group, run_dir / "reconstruction.png", seed=seed))
    if model.group_size > 1:
        out["homologous"] = str(homologous_figure(model, group, run_dir / "homologous.png", seed=seed)[0])
    return out


def summary(report: dict) -> str:
    """:func:`pretrain`'s report as ``mixedae-fast pretrain`` prints it: steps, time, the last losses, the
    evaluation beside random init, where the report is."""
    final = report.get("final") or {}
    lines = [f"\n{'steps':<22}{report['steps']}", f"{'train time':<22}{report['train_seconds']:.1f} s"]
    lines += [f"{key:<22}{final[key]:.4f}" for key in ("loss", "loss_rec", "loss_hc", "recognition") if key in final]
    ev = report.get("eval")
    if ev:
        lines.append(f"\n{'evaluation (val)':<22}{'pretrained':>12}{'random init':>14}")
        lines += [f"{metric + ' acc %':<22}{ev['pretrained'][metric]:>12.1f}{ev['random_init'][metric]:>14.1f}"
                  for metric in ev["pretrained"]]
    return "\n".join([*lines, f"\nreport: {report['run_dir']}/report.json"])
