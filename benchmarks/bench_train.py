"""Training throughput: MixedAE against our MAE mode and an official-recipe MAE, in one run.

    mixedae-fast bench --config vit_base --batch 256                       # model step + end to end
    mixedae-fast bench --config vit_base --source synthetic --compile both --profile runs/prof
    python -m mixedae_fast.benchmarks.bench_train ...                      # the same

Rows (``--modes``), each a full training step (forward, backward, optimiser) at ``--batch`` source
images, in the config's precision (bf16 autocast on CUDA by default):

* ``official``: MAE as facebookresearch/mae trains it — r = 1, global attention, fp16 autocast with a
  GradScaler (on CUDA; on CPU the config's precision), the unfused (foreach) AdamW, no custom kernels.
  The baseline row users recognise.
* ``mae``: our MAE mode (r = 1, ``ha=none``, no HC loss) on our fast path: fused AdamW, Triton mixing.
* ``mixedae``: the config as it is (default r = 4, TopK homologous attention + HC loss).

Sources (``--source``): ``synthetic`` (one batch of device tensors: the model step alone) and
``files`` (JPEGs through the run's loader — DALI on CUDA — so data wait counts; ``--data.path=DIR``
takes your ImageFolder, else the embedded scenes are written at the model's image size). Variants
(``--compile``): ``eager`` and/or ``compiled`` (``torch.compile`` of the model's forward;
``--cuda-graphs`` adds ``mode="reduce-overhead"``).

Timing: ``--warmup`` untimed steps, then ``--windows`` windows of ``--steps`` steps, each timed with CUDA
events (the wall clock on CPU); the row reports the median window. Also per row: peak memory, MFU
(the step's FLOPs, counted once by ``torch.utils.flop_counter`` on the reference path, over a matmul
ceiling measured in this run) and, from ``--breakdown-steps`` instrumented steps, the step's split into
data wait, assignment, mixing, encoder, decoder (unmix + blocks), losses, backward and optimiser. The
instrumented steps carry ``record_function`` / NVTX ranges of the same names, so ``--profile DIR``
writes a ``torch.profiler`` trace (Chrome / Perfetto / TensorBoard) of them, and Nsight Systems shows
the NVTX ranges.

Output (``--out DIR``): ``bench_train.json`` and ``.csv`` (card, versions, git SHA, command, date) and
``bench_train.png`` (throughput per row with the official-recipe row as the baseline).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

from mixedae_fast.benchmarks.common import Clock, result_head, write_json
from mixedae_fast.config import derive, load_config
from mixedae_fast.model.mixedae import build_model
from mixedae_fast.train.device import resolve_precision
from mixedae_fast.train.optim import build_optimizer, param_groups
from mixedae_fast.train.step import TrainStep

_MAE = ["--mixing.group_size=1", "--mixing.ha=none", "--mixing.hc_weight=0"]
MODES = {
    "official": [*_MAE, "--runtime.kernels=torch"],  # + fp16 on CUDA (CPU fp16 is emulated: the config's)
    "mae": _MAE,
    "mixedae": [],
}
PHASES = ("data", "assign", "mix", "encoder", "decoder", "losses", "backward", "optimizer")


@contextlib.contextmanager
def _range(name: str, cuda: bool):
    """A profiler range (``record_function``) and, on CUDA, an NVTX range of the same name."""
    if cuda:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if cuda:
            torch.cuda.nvtx.range_pop()


class StepRunner:
    """One benchmark row's model, optimiser and training step: :class:`mixedae_fast.train.step.TrainStep`, the
    step the trainer runs (clipping, the NaN guard and the optimiser branches included)."""

    def __init__(self, cfg, device: torch.device, official: bool, compile_mode: str | None):
        torch.manual_seed(cfg.run.seed)
        self.cfg, self.device = cfg, device
        self.model = build_model(cfg).to(device)
        self.amp = resolve_precision(cfg.runtime.precision, device)
        if official:   # the official recipe: unfused AdamW (foreach where available), a GradScaler, no NaN skip
            opt = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay), lr=1e-4,
                                    betas=tuple(cfg.optim.betas))
            device_skip = False
        else:
            opt, device_skip = build_optimizer(self.model, cfg, 1e-4, device)
        self.opt = opt
        forward = self.model
        if compile_mode is not None:
            forward = torch.compile(self.model, mode=None if compile_mode == "default" else compile_mode)
        self.train_step = TrainStep(self.model, opt, device, self.amp, clip_grad=cfg.optim.clip_grad,
                                    seed=cfg.run.seed, device_skip=device_skip, forward=forward, nan_guard=not official,
                                    scaler=torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None)

    def step(self, images: torch.Tensor, step: int) -> torch.Tensor:
        loss = self.train_step.micro(images, step)["loss"]
        self.train_step.update()
        return loss

    def phased_step(self, next_images, step: int, clock: Clock) -> tuple[torch.Tensor, dict[str, float]]:
        """The same step, eager, with a mark between the method's steps (``model.forward`` spelled out)."""
        m, cuda = self.model, self.device.type == "cuda"
        marks = [clock.mark()]

        def done():
            marks.append(clock.mark())

        with _range("data", cuda):
            images = next_images()
            if hasattr(next_images, "wait"):  # a Source: the loader's own stream, if any, joins the data phase
                next_images.wait(torch.cuda.current_stream(self.device) if cuda else None)
        done()
        with self.train_step.autocast():
            with _range("assign", cuda):
                ids = m.assign(images.shape[0] // m.group_size, self.cfg.run.seed, step, device=images.device)
            done()
            with _range("mix", cuda):
                mixed, targets, loss_mask = m.mix(images, ids)
            done()
            with _range("encoder", cuda):
                latent, layout = m.forward_encoder(mixed, ids)
            done()
            with _range("decoder", cuda):
                pred = m.forward_decoder(m.unmix(latent, ids))
            done()
            with _range("losses", cuda):
                loss = m.forward_loss(pred, targets, loss_mask) + m.hc.weight * m.forward_hc(latent, layout)
            done()
        with _range("backward", cuda):
            self.train_step.backward(loss)
        done()
        with _range("optimizer", cuda):
            self.train_step.update()
        done()
        return loss, {name: clock.ms(a, b) for name, a, b in zip(PHASES, marks, marks[1:])}


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype | None) -> float:
    """Dense matmul rate measured here: 8192² bf16 on a GPU, 1024² fp32 on CPU (best of a few)."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    clock = Clock(device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5 if device.type == "cuda" else 3):
        start = clock.mark()
        for _ in range(10):
            a @ b
        best = min(best, clock.ms(start, clock.mark()) / 10)
    return 2 * n**3 / best / 1e9


def count_step_flops(cfg, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward) as the reference path does them at ``cfg``'s batch:
    the group encoder, r decoders, TopK scores and HC logits included; counted by torch's FlopCounterMode
    (the optimiser's elementwise work is not counted, as MFU conventions have it)."""
    from torch.utils.flop_counter import FlopCounterMode

    reference = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, kernels="torch",
                                                                     attention_backend="eager"))
    torch.manual_seed(0)
    model = build_model(reference).to(device)
    S = cfg.model.img_size
    images = torch.randn(cfg.data.batch_size, 3, S, S, device=device)
    with FlopCounterMode(display=False) as counter:
        model(images)["loss"].backward()
    return float(counter.get_total_flops())


class Source:
    """Batches for the timed steps: one fixed device batch, or the run's file loader through consecutive
    epochs (``set_epoch(e + 1)`` at each boundary, as the trainer does, so the loader keeps its prefetch
    running across it instead of restarting the epoch)."""

    def __init__(self, kind: str, cfg, device, dtype, num_images: int):
        self.kind, self.data_stream = kind, "none: device tensors"
        if kind == "synthetic":
            S = cfg.model.img_size
            self.batch = torch.randn(cfg.data.batch_size, 3, S, S, device=device).to(dtype)
            self.backend = "device tensors"
            return
        from mixedae_fast.train.data import build_loaders

        data = build_loaders(cfg, device, dtype, num_train=num_images, num_val=64, progress=True)
        self.loader, self.backend = data.train, data.backend
        self.it, self.epoch, self.data_stream = None, 0, "the step's stream"

    def __call__(self) -> torch.Tensor:
        if self.kind == "synthetic":
            return self.batch
        while True:
            if self.it is None:
                self.loader.set_epoch(self.epoch)
                self.it = iter(self.loader)
            try:
                return next(self.it)[0]
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1

    def wait(self, stream) -> None:
        """Make ``stream`` (the step's) wait for the loader's device work on the batch just handed out, so
        the data phase, timed on that stream, holds it. A loader whose work runs on a stream of its own
        (DALI) gives an event for it (``ready_event``); the torch loaders enqueue their copy, cast and
        normalisation on the step's stream inside the data phase already."""
        ready = getattr(self.loader, "ready_event", None) if self.kind != "synthetic" else None
        event = ready() if ready is not None and stream is not None else None
        if event is not None:
            stream.wait_event(event)
            self.data_stream = "the loader's own stream, waited for in the data phase"


def time_row(runner: StepRunner, source: Source, warmup: int, windows: int, steps: int,
             breakdown_steps: int, profile_dir: Path | None, label: str) -> dict:
    device, clock = runner.device, Clock(runner.device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    step = 0
    for _ in range(warmup):
        runner.step(source(), step)
        step += 1
    window_ms = []
    for _ in range(windows):
        start = clock.mark()
        for _ in range(steps):
            loss = runner.step(source(), step)
            step += 1
        window_ms.append(clock.ms(start, clock.mark()) / steps)
    ms = statistics.median(window_ms)
    batch = runner.cfg.data.batch_size
    row = {"ms_per_step": ms, "img_per_s": batch / ms * 1e3, "window_ms": window_ms,
           "loss": float(loss.detach())}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if breakdown_steps:
        prof = None
        if profile_dir is not None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(activities=acts, record_shapes=True)
            prof.__enter__()
        parts = []
        for _ in range(breakdown_steps):
            _, phases = runner.phased_step(source, step, clock)
            parts.append(phases)
            step += 1
        if prof is not None:
            prof.__exit__(None, None, None)
            profile_dir.mkdir(parents=True, exist_ok=True)
            trace = profile_dir / f"{label.replace('/', '_')}.trace.json"
            prof.export_chrome_trace(str(trace))
            row["profile"] = str(trace)
        total = {p: statistics.median(d[p] for d in parts) for p in PHASES}
        row["breakdown_ms"] = total
        row["data_wait_fraction"] = total["data"] / sum(total.values())
        row["data_stream"] = source.data_stream   # where the loader's device work ran
    return row


def _chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: r for k, r in result["rows"].items() if "img_per_s" in r}   # failed rows: in the JSON and CSV
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    colors = {"official": "#999999", "mae": "#4c72b0", "mixedae": "#dd8452"}
    ax.barh(labels, [rows[k]["img_per_s"] for k in labels], color=[colors[rows[k]["mode"]] for k in labels])
    for i, k in enumerate(labels):
        base = rows.get(f"official/{rows[k]['variant']}/{rows[k]['source']}")
        note = f"{rows[k]['img_per_s']:,.0f}" + (f"  ({rows[k]['img_per_s'] / base['img_per_s']:.2f}x)" if base else "")
        ax.text(rows[k]["img_per_s"], i, " " + note, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("source images / s (ratio to the official-recipe row of the same variant and source)")
    ax.set_title(f"{result['config']}, batch {result['batch']}, {result['device']} ({result['date']})", fontsize=9)
    ax.margins(x=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CSV_FIELDS = ("row", "mode", "variant", "source", "loader", "ms_per_step", "img_per_s", "vs_official", "mfu",
              "peak_mem_gib", "data_wait_fraction", "data_stream", *(f"{p}_ms" for p in PHASES), "error")


def _write_outputs(result: dict, out: Path) -> None:
    write_json(result, out / "bench_train.json")
    with open(out / "bench_train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for key, row in result["rows"].items():
            flat = {"row": key, **row, **{f"{p}_ms": v for p, v in (row.get("breakdown_ms") or {}).items()}}
            w.writerow(flat)
    _chart(result, out / "bench_train.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mixedae-fast bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cpu_tiny",
                   help="a preset or YAML file (default cpu_tiny, as pretrain; the GPU figures use vit_base)")
    p.add_argument("--batch", type=int, default=None, help="source images per step (default: the config's)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--source", default="synthetic,files", help="comma-separated: synthetic, files")
    p.add_argument("--compile", default="eager", choices=("eager", "compiled", "both"),
                   help="eager, compiled (torch.compile) or both")
    p.add_argument("--cuda-graphs", action="store_true", help="compile with mode='reduce-overhead'")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per row (compilation happens here)")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--breakdown-steps", type=int, default=3, help="instrumented eager steps per eager row")
    p.add_argument("--num-images", type=int, default=4096, help="files source: embedded images to write")
    p.add_argument("--profile", default=None, metavar="DIR", help="write torch.profiler traces here")
    p.add_argument("--out", default=None, metavar="DIR", help="results folder (JSON, CSV, PNG)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        p.error(f"unrecognised arguments {bad}; config overrides look like --section.key=value")
    modes = [m for m in args.modes.split(",") if m]
    sources = [s for s in args.source.split(",") if s]
    for what, got, allowed in (("mode", modes, MODES), ("source", sources, ("synthetic", "files"))):
        unknown = [g for g in got if g not in allowed]
        if unknown or not got:
            p.error(f"unknown or no {what}(s) {unknown}; choose from {', '.join(allowed)}")
    variants = {"eager": ["eager"], "compiled": ["compiled"], "both": ["eager", "compiled"]}[args.compile]
    base = load_config(args.config, overrides + ([f"--data.batch_size={args.batch}"] if args.batch else []))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base.runtime.device not in ("auto", str(device)):
        device = torch.device(base.runtime.device)
    batch = base.data.batch_size
    import triton

    result = result_head("train_step", device, ["mixedae-fast", "bench"], argv, triton=triton.__version__,
                         config=args.config, batch=batch, overrides=overrides, rows={})
    amp = resolve_precision(base.runtime.precision, device)
    result["matmul_tflops"] = matmul_ceiling_tflops(device, amp)
    print(f"{result['device']}: matmul ceiling {result['matmul_tflops']:.1f} TFLOP/s "
          f"({amp or torch.float32}); batch {batch}", flush=True)
    sources_cache: dict = {}
    flops: dict[str, float] = {}
    print(f"{'row':<32}{'ms/step':>9}{'img/s':>9}{'MFU':>7}{'mem GiB':>9}{'data %':>8}", flush=True)
    for mode in modes:
        recipe = MODES[mode] + (["--runtime.precision=fp16"] if mode == "official" and device.type == "cuda" else [])
        cfg = load_config(args.config, [*overrides, f"--data.batch_size={batch}", *recipe])
        derive(cfg)  # validates r divides the batch etc. with the config's own message
        flops[mode] = count_step_flops(cfg, device)
        row_amp = resolve_precision(cfg.runtime.precision, device)
        for source_kind in sources:
            key = (source_kind, row_amp)
            if key not in sources_cache:
                sources_cache[key] = Source(source_kind, cfg, device, row_amp or torch.float32, args.num_images)
            source = sources_cache[key]
            for variant in variants:
                label = f"{mode}/{variant}/{source_kind}"
                compile_mode = None
                if variant == "compiled":
                    compile_mode = "reduce-overhead" if args.cuda_graphs else "default"
                try:
                    runner = StepRunner(cfg, device, official=mode == "official", compile_mode=compile_mode)
                    row = time_row(runner, source, args.warmup, args.windows, args.steps,
                                   args.breakdown_steps if variant == "eager" else 0,
                                   Path(args.profile) if args.profile else None, label)
                except Exception as e:  # noqa: BLE001 - a row failing (a compile error, memory) must not end the run
                    row = {"error": f"{type(e).__name__}: {e}"[:800]}
                    print(f"{label:<32}error: {row['error'][:160]}", flush=True)
                runner = None
                row.update(mode=mode, variant=variant, source=source_kind, loader=source.backend,
                           flops_per_step=flops[mode])
                if "ms_per_step" in row:
                    row["mfu"] = flops[mode] / (row["ms_per_step"] * 1e-3) / (result["matmul_tflops"] * 1e12)
                    base_row = result["rows"].get(f"official/{variant}/{source_kind}")
                    row["vs_official"] = row["img_per_s"] / base_row["img_per_s"] if base_row and \
                        "img_per_s" in base_row else None
                    print(f"{label:<32}{row['ms_per_step']:>9.1f}{row['img_per_s']:>9.0f}{row['mfu']:>7.1%}"
                          f"{row.get('peak_mem_gib', float('nan')):>9.1f}"
                          f"{100 * row.get('data_wait_fraction', float('nan')):>8.1f}", flush=True)
                result["rows"][label] = row
                if args.out:  # after every row: a run cut short keeps the rows that finished
                    _write_outputs(result, Path(args.out))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if args.out:  # written after each row
        print(f"results: {args.out}/bench_train.{{json,csv,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
