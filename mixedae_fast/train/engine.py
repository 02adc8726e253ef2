"""The training loop: autocast (bf16 on GPU), fused AdamW, MAE's schedule, clipping, a NaN guard.

The loop never synchronises the host per step: losses accumulate in device tensors and are read at
log steps; a non-finite step is skipped *on the device* (the fused optimiser's ``found_inf``), and
the count of consecutive skips is checked at log steps. Randomness is keyed by (seed, step, global
group index) so that a run stopped and resumed continues exactly, on any number of ranks
(distributed.py: DDP, the stop vote, metrics averaged over ranks).
"""
from __future__ import annotations

import csv
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from mixedae_fast.config import Config, config_to_dict, derive
from mixedae_fast.train.checkpoint import (
    OVERRIDABLE,
    RESUMABLE,
    CheckpointError,
    checkpoint_step,
    config_mismatch,
    list_checkpoints,
    load_training_state,
    resolve_resume,
    save_checkpoint,
)
from mixedae_fast.train.device import resolve_precision
from mixedae_fast.train.distributed import Dist, DistEnv, unwrap
from mixedae_fast.train.optim import build_optimizer, lr_at
from mixedae_fast.train.profiling import StepProfiler
from mixedae_fast.train.runs import set_aside_later_checkpoints, truncate_metrics
from mixedae_fast.train.step import SkippedSteps, TrainStep


def _rng_states() -> dict:
    """The global generators' states. Training draws nothing from them (its randomness is keyed by
    seed and step), but user code and dropout might; saved so a resume restores them too. CUDA: the
    current device's only (touching every GPU would put a context of each rank on each of them)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per device
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda.cpu())


class StopRequested(Exception):
    pass


class _Window:
    """What one metrics row averages: the loss parts summed on the device since the last row, images,
    data wait and wall time, the newest stats."""

    def __init__(self, device: torch.device, step: int):
        self.sums = {k: torch.zeros((), device=device) for k in ("loss", "loss_rec", "loss_hc")}
        self.reset(step)

    def reset(self, step: int) -> None:
        for v in self.sums.values():
            v.zero_()
        self.t0, self.images, self.wait, self.step0, self.stats = time.perf_counter(), 0, 0.0, step, {}

    def timed_next(self, batches):
        t0 = time.perf_counter()
        images = next(batches)
        self.wait += time.perf_counter() - t0
        return images

    def add(self, out: dict, images: torch.Tensor, accum: int) -> None:
        for k in self.sums:
            self.sums[k] += out[k].detach() / accum
        self.images += images.shape[0]
        if "stats" in out:
            self.stats = out["stats"]


class Trainer:
    """Pretrains ``model`` on ``loader`` for ``cfg.optim.epochs`` epochs, writing ``metrics.csv`` and
    checkpoints under ``run_dir``. ``max_steps`` (optimizer steps) cuts the run short. ``dist``: the
    process group when there are several ranks (``model`` then in ``dist.wrap``, ``loader`` this rank's
    shard); rank 0 writes the run folder."""

    def __init__(self, cfg: Config, model: torch.nn.Module, loader, run_dir: str | Path, device: torch.device,
                 max_steps: int | None = None, progress: bool = True, dist: Dist | None = None,
                 pictures: Callable | None = None, monitor: Callable | None = None):
        self.cfg, self.model, self.loader, self.device = cfg, model, loader, device
        # run.vis_every's pictures: ``pictures(model, images, seed=, step=) -> {name: uint8 [H, W, 3]}``
        # (visualize.training_pictures), handed in so that training does not depend on the pictures' code
        self.pictures = pictures
        # run.monitor_every's kNN monitor: ``monitor(encoder) -> {"knn": top-1 %}`` (pretrain.knn_monitor)
        self.monitor = monitor
        self.module = unwrap(model)
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dist = dist or Dist(DistEnv(), device)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.derived = derive(cfg, self.world_size)
        self.amp_dtype = resolve_precision(cfg.runtime.precision, device)
        self.optimizer, self.device_skip = build_optimizer(model, cfg, self.derived.lr, device)
        # fp16 needs loss scaling (bf16 does not); GradScaler skips overflowing steps itself
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.accum = cfg.optim.accum_steps
        self.micro_per_epoch = len(loader)
        if self.micro_per_epoch < self.accum:
            raise ValueError(f"one epoch has {self.micro_per_epoch} batches, fewer than optim.accum_steps="
                             f"{self.accum}; lower data.batch_size or accum_steps, or add data")
        # An epoch is this many optimizer steps on any number of ranks (the global batch fixed); a tail
        # of micro-batches that does not fill a step is left out.
        self.steps_per_epoch = self.micro_per_epoch // self.accum
        total = self.steps_per_epoch * cfg.optim.epochs
        self.total_steps = total if max_steps is None else min(total, max_steps)
        self.progress = progress and self.rank == 0
        self.step = 0
        self.notes: list[str] = []
        self.overrides: list[str] = []
        self.history: list[dict] = []
        self._stop_signal = None
        self.loggers = None  # rank 0's sinks (run.loggers), opened when fit starts
        self._vis_images = None

    def _open_loggers(self):
        if self.loggers is None and self.rank == 0:
            from mixedae_fast.train.loggers import Loggers

            self.loggers = Loggers(self.cfg.run.loggers, self.run_dir, config_to_dict(self.cfg), self.cfg.run.name,
                                   self.cfg.run.wandb_project, self.cfg.run.wandb_entity)
        return self.loggers

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "scaler": self.scaler.state_dict() if self.scaler else None, "rng": _rng_states(),
                "config": config_to_dict(self.cfg), "world_size": self.world_size}

    def save(self) -> Path:
        return save_checkpoint(self.state_dict(), self.ckpt_dir, self.step, self.cfg.run.keep_last)

    def _save_if_good(self, skipped: SkippedSteps) -> Path | None:
        """A checkpoint, unless the run is inside a non-finite streak or a weight is not finite: the NaN
        stop's advice names the newest checkpoint before the first bad step, so none may hold a state
        reached during one (and the rotation of keep_last must not push the good ones out). A host sync,
        at checkpoint steps only."""
        if bool(skipped.run > 0) or not all(bool(torch.isfinite(p).all()) for p in self.module.parameters()):
            return None
        return self.save()

    def maybe_resume(self) -> Path | None:
        """Load the checkpoint ``run.resume`` names (``auto``: the newest one that loads, saying which were
        skipped). Later checkpoints of the run folder move aside and ``metrics.csv`` loses the rows past
        the resumed step (rank 0). ``self.notes`` says what was done."""
        self.notes: list[str] = []
        resume = self.cfg.run.resume
        if resume == "none":
            return None
        path, state = self._load_resume(resume)
        if state is not None:
            self._check_config(state, path)
            self._check_global_batch(state, path)
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.overrides:  # the loaded param groups carry the old hyper-parameters; lr is set every step
                o = self.cfg.optim
                for group, wd in zip(self.optimizer.param_groups, (o.weight_decay, 0.0)):
                    group.update(weight_decay=wd, betas=tuple(o.betas))
            if self.scaler and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if state.get("rng"):
                _set_rng_states(state["rng"])
            self.step = int(state["step"])
        if self.rank == 0:
            aside = set_aside_later_checkpoints(self.ckpt_dir, self.step)
            if aside is not None:
                self.notes.append(f"later checkpoints of the abandoned branch moved to {aside}")
            dropped = truncate_metrics(self.run_dir / "metrics.csv", self.step)
            if dropped:
                self.notes.append(f"{dropped} metrics.csv rows past step {self.step} dropped")
        return path

    def _load_resume(self, resume: str) -> tuple[Path | None, dict | None]:
        if resume != "auto":
            path = resolve_resume(resume, self.ckpt_dir)
            return path, load_training_state(path, map_location=self.device)
        found = list_checkpoints(self.ckpt_dir)
        for path in reversed(found):
            try:
                return path, load_training_state(path, map_location=self.device)
            except CheckpointError as e:
                self.notes.append(f"skipped {path.name}, which does not load ({str(e).split(': ', 2)[-1][:120]})")
        if found:
            raise CheckpointError(f"none of the {len(found)} checkpoints in {self.ckpt_dir} loads ({self.notes[0]}); "
                                  "point --run.resume at a good checkpoint file, or start a new run (--run.name)")
        return None, None

    def _check_config(self, state: dict, path) -> None:
        """The checkpoint's config must be this one, up to what may change across a resume (RESUMABLE;
        the split of the global batch); with run.resume_override also the optimiser settings
        (OVERRIDABLE), listed in ``self.overrides``."""
        diffs = config_mismatch(state["config"], config_to_dict(self.cfg),
                                ignore=(*RESUMABLE, "data.batch_size", "optim.accum_steps"))
        # run.* may change across a resume, but not the seed: it draws the data order and every mixing
        # step, so a resume under another one would continue another run
        saved_seed = state["config"].get("run", {}).get("seed", self.cfg.run.seed)
        if saved_seed != self.cfg.run.seed:
            diffs.insert(0, f"run.seed: {saved_seed!r} -> {self.cfg.run.seed!r} (pass --run.seed={saved_seed})")
        self.overrides = [d for d in diffs if d.split(":")[0] in OVERRIDABLE] if self.cfg.run.resume_override else []
        diffs = [d for d in diffs if d not in self.overrides]
        if diffs:
            allowed = [d for d in diffs if d.split(":")[0] in OVERRIDABLE]
            hint = (" Optimiser settings may change with --run.resume_override=true." if allowed and
                    not self.cfg.run.resume_override else "")
            raise CheckpointError(f"checkpoint {path} was written under another config: " + "; ".join(diffs)
                                  + f". Resume with the same settings or start a new run (run.name).{hint}")
        if self.overrides:
            self.notes.append("resume override (run.resume_override=true): " + "; ".join(self.overrides))

    def _check_global_batch(self, state: dict, path) -> None:
        """The schedule and the data position count optimizer steps of one global batch: a checkpoint
        resumes on any number of ranks, per-rank batch or accumulation that keep it."""
        saved, d = state["config"], self.derived
        b, a, w = saved["data"]["batch_size"], saved["optim"]["accum_steps"], int(state.get("world_size", 1))
        if b * a * w == d.global_batch:
            return
        per = self.cfg.data.batch_size * self.world_size
        fix = (f"--optim.accum_steps={b * a * w // per}" if b * a * w % per == 0 else
               f"data.batch_size x ranks x optim.accum_steps = {b * a * w}")
        raise ValueError(f"checkpoint {path} was written with a global batch of {b * a * w} (data.batch_size {b} "
                         f"x {w} ranks x optim.accum_steps {a}); this run has {d.global_batch} "
                         f"({self.cfg.data.batch_size} x {self.world_size} x {self.accum}). Keep the global "
                         f"batch to continue its schedule: {fix}")

    # -- the loop ------------------------------------------------------------------------------
    def _batches(self):
        """Micro-batches from the current step on, forever. Epoch ``e`` starts at step
        ``e * steps_per_epoch`` and gives ``steps_per_epoch * accum`` micro-batches; the rest of a pass
        is read and dropped (DALI rebuilds a pipeline left mid-pass)."""
        step = self.step
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            self.loader.set_epoch(epoch, k * self.accum)
            wanted = (self.steps_per_epoch - k) * self.accum
            for i, (images, _) in enumerate(self.loader):
                if i < wanted:
                    yield images
            step += self.steps_per_epoch - k

    def _on_signal(self, signum, frame):
        self._stop_signal = signal.Signals(signum).name

    def fit(self) -> list[dict]:
        """Train from ``self.step`` to ``total_steps``; returns the metrics rows logged."""
        cfg, model = self.cfg, self.model
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._open_loggers()
        profiler = StepProfiler.from_spec(cfg.run.profile_steps, self.run_dir, self.rank)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="pretrain",
                   unit="step", dynamic_ncols=True)
        short = profiler.unreached(self.step, self.total_steps)
        if short:
            self._say(f"warning: {short}", bar)
        # runtime.compile: the model's forward compiled (the assignment is drawn outside, so the step
        # number never enters the graph; log steps, which collect stats, compile a second graph)
        step_fn = TrainStep(model, self.optimizer, self.device, self.amp_dtype, clip_grad=cfg.optim.clip_grad,
                            seed=cfg.run.seed, accum=self.accum, device_skip=self.device_skip, scaler=self.scaler,
                            forward=torch.compile(model) if cfg.runtime.compile else model, no_sync=self.dist.no_sync)
        window = _Window(self.device, self.step)
        skipped = SkippedSteps(self.device)
        batches = self._batches()
        model.train()
        try:
            while self.step < self.total_steps:
                profiler.before_step(self.step + 1)
                lr = self._set_lr()
                log_now = (self.step + 1) % cfg.run.log_every == 0 or self.step + 1 == self.total_steps
                for a in range(self.accum):
                    images = window.timed_next(batches)
                    last = a == self.accum - 1
                    out = step_fn.micro(images, self.step, first_group=self._first_group(a, images), last=last,
                                        collect_stats=log_now and last, ranges=profiler.range)
                    window.add(out, images, self.accum)
                skipped.record(step_fn.update(), self.step)
                self.step += 1
                bar.update(1)
                self._after_step(profiler, bar, window, skipped, lr, log_now, images)
            self.dist.finish_votes()
        except StopRequested as e:
            if self.rank == 0:
                path = self._save_if_good(skipped)
                tqdm.write(f"{e}: saved {path} at step {self.step}; continue with --run.resume=auto" if path else
                           f"{e} at step {self.step}, inside a non-finite streak: no checkpoint written (it would "
                           "hold a state the loss had already left); continue with --run.resume=auto from the "
                           "newest one before it")
            self.dist.finish_votes()
            self.dist.barrier()  # no rank leaves before the checkpoint is written (torchrun stops them all)
            raise
        finally:
            profiler.stop()
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if self.loggers is not None:
                self.loggers.close()
                self.loggers = None
        if self.rank == 0 and self.step % cfg.run.ckpt_every:
            self._save_if_good(skipped)
        return self.history

    def _set_lr(self) -> float:
        o = self.cfg.optim
        lr = lr_at(self.step / self.steps_per_epoch, self.derived.lr, o.warmup_epochs, o.epochs, o.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _first_group(self, micro: int, images: torch.Tensor) -> int:
        """The global index of micro-batch ``micro``'s first group in the step (docs/method.md §1)."""
        return (micro * self.world_size + self.rank) * (images.shape[0] // self.cfg.mixing.group_size)

    def _after_step(self, profiler, bar, window, skipped, lr, log_now, images) -> None:
        """What follows an optimizer step: the profiler, the log row and the NaN check (at log steps),
        pictures, the checkpoint, the stop vote."""
        cfg = self.cfg
        trace = profiler.after_step(self.step)
        if trace is not None:
            self._say(f"profile: steps {cfg.run.profile_steps} traced to {trace}", bar)
        if log_now:
            elapsed = time.perf_counter() - window.t0
            row = self._log_row(window.sums, self.step - window.step0, lr, window.images, elapsed, window.wait,
                                skipped.total, window.stats)
            bar.set_postfix(loss=f"{row['loss']:.4f}", hc=f"{row['loss_hc']:.3f}", img_s=f"{row['img_per_s']:.0f}")
            self._say(self._log_line(row, elapsed / max(self.step - window.step0, 1)), bar)
            longest = skipped.take_longest()
            if longest >= cfg.optim.max_nan_steps:
                raise FloatingPointError(self._nan_message(longest, int(skipped.first.item())))
            window.reset(self.step)
        if cfg.run.vis_every and self.step % cfg.run.vis_every == 0 and self.rank == 0:
            self._log_pictures(images)
        every = cfg.run.monitor_every * self.steps_per_epoch
        if self.monitor is not None and every and self.step % every == 0 and self.rank == 0:
            self._run_monitor(bar)
        if self.step % cfg.run.ckpt_every == 0 and self.rank == 0:
            self._save_if_good(skipped)
        stop = self.dist.agree_stop(self._stop_signal)
        if stop:
            raise StopRequested(stop)

    def _run_monitor(self, bar) -> None:
        """The kNN monitor on rank 0 (the other ranks wait at their next gradient all-reduce)."""
        t0 = time.perf_counter()
        result = self.monitor(self.module)  # evaluation mode inside, training mode again after
        epoch = self.step // self.steps_per_epoch
        self._say(f"monitor: epoch {epoch} step {self.step} knn {result['knn']:.1f}% "
                  f"({time.perf_counter() - t0:.1f}s)", bar)
        if self.loggers is not None:
            self.loggers.scalars(result, self.step, section="monitor")

    def _log_row(self, sums, steps, lr, n_images, elapsed, wait, bad_total, stats) -> dict:
        """One metrics row: loss parts averaged over the ``steps`` since the last row."""
        sums, stats = self.dist.mean_over_ranks(sums, stats)
        row = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "lr": lr}
        row.update({k: v.item() / steps for k, v in sums.items()})
        row.update(img_per_s=n_images * self.world_size / max(elapsed, 1e-9), data_wait=wait / max(elapsed, 1e-9),
                   skipped_steps=int(bad_total.item()))
        if stats:
            names = sorted({k.split("/", 1)[1] for k in stats})
            for name in names:
                vals = [v for k, v in stats.items() if k.endswith("/" + name)]
                row[name] = torch.stack(vals).mean().item()
        self.history.append(row)
        if self.rank == 0:
            self._append_csv(row)
            if self._open_loggers() is not None:
                self.loggers.scalars(row, self.step)
        return row

    def _log_line(self, row: dict, s_per_step: float) -> str:
        """The plain log line of a metrics row (stdout, also without the progress bar: a cluster job's log)."""
        eta = time.strftime("%H:%M:%S", time.gmtime(max(self.total_steps - self.step, 0) * s_per_step))
        if self.device.type == "cuda":
            mem = f"max mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
        else:
            import resource

            mem = f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"  # KiB on Linux
        return (f"step {row['step']}/{self.total_steps} epoch {row['epoch']:.2f} loss {row['loss']:.4f} "
                f"(rec {row['loss_rec']:.4f} hc {row['loss_hc']:.4f}) lr {row['lr']:.3g} "
                f"{row['img_per_s']:.0f} img/s data wait {100 * row['data_wait']:.0f}% ETA {eta} {mem}"
                + (f" skipped {row['skipped_steps']}" if row["skipped_steps"] else ""))

    def _say(self, line: str, bar) -> None:
        if self.rank != 0:
            return
        if self.progress:
            bar.write(line)  # above the bar, which stays intact
        else:
            print(line, flush=True)

    def _nan_message(self, consecutive: int, first_bad: int) -> str:
        """The NaN stop: the first non-finite step, and the newest checkpoint written before it (one
        written later may hold weights that already diverged)."""
        good = [p for p in list_checkpoints(self.ckpt_dir) if 0 <= first_bad and checkpoint_step(p) <= first_bad]
        where = (f"The newest checkpoint written before it is {good[-1]}: continue from it with a lower lr, e.g. "
                 f"--run.resume={good[-1]} --run.resume_override=true --optim.base_lr=LOWER" if good else
                 f"No checkpoint was written before it (in {self.ckpt_dir}): start a new run with a lower "
                 "optim.base_lr")
        return (f"{consecutive} consecutive steps had a non-finite loss or gradient (limit optim.max_nan_steps="
                f"{self.cfg.optim.max_nan_steps}); they were skipped, the first was step {first_bad + 1}. {where}; "
                "or set optim.clip_grad, or use runtime.precision=fp32")

    def _log_pictures(self, images: torch.Tensor) -> None:
        """The reconstruction and homologous-attention pictures of one fixed group (the first this run
        saw, with the assignment of step 0, so that pictures compare across steps) to every sink of
        ``run.loggers`` (TensorBoard, W&B), or as ``pictures/<name>-<step>.png`` when none takes pictures."""
        if self.pictures is None:
            return
        model = getattr(self.model, "module", self.model)  # DDP keeps the model in .module
        if self._vis_images is None:
            self._vis_images = images[:model.group_size].detach().float().clone()
        pictures = self.pictures(model, self._vis_images, seed=self.cfg.run.seed, step=0)
        for name, array in pictures.items():
            self._open_loggers().image(name, array, self.step)

    def _append_csv(self, row: dict) -> None:
        path = self.run_dir / "metrics.csv"
        fields = list(row)
        new = not path.exists()
        if not new:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != fields:  # columns changed (e.g. stats appeared): keep the file's header
                fields = header or fields
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
