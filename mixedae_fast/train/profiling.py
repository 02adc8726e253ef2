"""Profiling a real run: ``run.profile_steps: "A:B"`` traces optimizer steps A to B (inclusive) of
``pretrain`` with ``torch.profiler`` on a schedule (one warm-up step before A when there is one, then
A..B recorded) and writes, per rank, a Chrome/Perfetto trace
``runs/<name>/profile/steps-A-B.rank<R>.pt.trace.json`` (open it in https://ui.perfetto.dev,
chrome://tracing or TensorBoard's profiler plugin) and a table of the top operators
``steps-A-B.rank<R>.top_ops.txt``. Each optimizer step is a ``ProfilerStep#N`` range, N the step's
number as the console and ``metrics.csv`` count it. On CUDA the step's phases are also NVTX ranges, so
``nsys profile -c cudaProfilerApi`` sees the same window.

    prof = StepProfiler.from_spec("20:24", run_dir, rank)  # None spec -> a profiler that does nothing
    for step in ...:
        prof.before_step(step)                            # starts the profiler at its warm-up step
        with prof.range("forward"): ...
        prof.after_step(step)                             # prof.step(); writes the trace after step B
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

WARMUP_STEPS = 1  # profiled but not recorded: the first recorded step carries no profiler start-up


def parse_steps(spec: str | None) -> tuple[int, int] | None:
    """``"A:B"`` -> ``(A, B)`` with ``1 <= A <= B``; ``None``/``""``/``"none"`` -> None."""
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return None
    parts = str(spec).split(":")
    try:
        a, b = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        a = b = None
    if a is None or not 1 <= a <= b:
        raise ValueError(f"run.profile_steps = {spec!r}: expected 'A:B' with 1 <= A <= B (optimizer steps, "
                         "e.g. '20:24'), or none")
    return a, b


class StepProfiler:
    """Traces steps ``first..last`` (1-based optimizer steps: step ``s`` is the one that makes
    ``trainer.step == s``) on rank ``rank``. Inactive outside that window: ``range`` is a no-op there."""

    def __init__(self, window: tuple[int, int] | None, out_dir: str | Path, rank: int = 0):
        self.window, self.out_dir, self.rank = window, Path(out_dir), rank
        self._prof = None
        self.trace: Path | None = None

    @classmethod
    def from_spec(cls, spec: str | None, run_dir: str | Path, rank: int = 0) -> StepProfiler:
        return cls(parse_steps(spec), Path(run_dir) / "profile", rank)

    @property
    def active(self) -> bool:
        return self._prof is not None and self.window[0] <= self._prof.step_num <= self.window[1]

    def unreached(self, done: int, total: int) -> str | None:
        """Why a run from step ``done`` to ``total`` traces less than the window (None: it traces it all)."""
        if not self.window:
            return None
        a, b = self.window
        spec = f"run.profile_steps {a}:{b}"
        if a > total:
            return f"{spec} starts after the run's last step {total}: nothing will be traced; pick A:B within 1:{total}"
        if done >= a:
            return (f"{spec}: the run resumes after step {done}, so nothing will be traced"
                    if done >= b else f"{spec}: the run resumes after step {done}; the trace starts at {done + 1}")
        if b > total:
            return f"{spec} ends after the run's last step {total}: the trace stops at step {total}"
        return None

    def _schedule(self, step: int):
        from torch.profiler import ProfilerAction

        a, b = self.window
        if a <= step < b:
            return ProfilerAction.RECORD
        if step == b:
            return ProfilerAction.RECORD_AND_SAVE
        return ProfilerAction.WARMUP if a - WARMUP_STEPS <= step < a else ProfilerAction.NONE

    def before_step(self, step: int) -> None:
        """``step``: the step about to run (1-based). Starts the profiler at the window's warm-up step (or
        at its first step the run reaches)."""
        if not self.window or self._prof is not None or self.trace is not None:
            return
        a, b = self.window
        if not max(1, a - WARMUP_STEPS) <= step <= b:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        prof = profile(activities=activities, schedule=self._schedule, on_trace_ready=self._write,
                       record_shapes=True, with_stack=False)
        # the schedule and the ProfilerStep#N markers count optimizer steps, also on a resumed run
        prof.step_num = step
        prof.current_action = self._schedule(step)
        if hasattr(prof, "_prev_schedule_action"):  # torch >= 2.10 keeps the schedule's last answer apart
            prof._prev_schedule_action = prof.current_action
        prof.__enter__()
        self._prof = prof
        if torch.cuda.is_available():
            torch.cuda.profiler.start()

    def range(self, name: str):
        """A named range of the step (``record_function``, and NVTX on CUDA) while tracing."""
        if self._prof is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.profiler.record_function(name))
        if torch.cuda.is_available():
            stack.enter_context(torch.cuda.nvtx.range(name))
        return stack

    def after_step(self, step: int) -> Path | None:
        """``step``: the step just finished. Advances the schedule; returns the trace once it is written."""
        if self._prof is None:
            return None
        self._prof.step()
        return self.stop() if step >= self.window[1] else None

    def stop(self) -> Path | None:
        """End the profiler (after the window, or a run that stops inside it, which writes what it has)."""
        if self._prof is None:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        return self.trace

    def _write(self, prof) -> None:
        """The trace handler: this rank's files, named by the window and the rank."""
        a, b = self.window
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"steps-{a}-{b}.rank{self.rank}"
        self.trace = self.out_dir / f"{stem}.pt.trace.json"
        prof.export_chrome_trace(str(self.trace))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (self.out_dir / f"{stem}.top_ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
