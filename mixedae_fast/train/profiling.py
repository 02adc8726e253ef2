"""Profiling a real run: ``run.profile_steps: "A:B"`` traces optimizer steps A to B (inclusive) of
``pretrain`` with ``torch.profiler`` and writes a Chrome/Perfetto trace to
``runs/<name>/profile/steps-A-B.pt.trace.json`` (open it in https://ui.perfetto.dev or
chrome://tracing), plus a table of the top operators. On CUDA the step's phases are also NVTX ranges,
so ``nsys profile -c cudaProfilerApi`` sees the same window.

    prof = StepProfiler.from_spec("20:24", run_dir)       # None spec -> a profiler that does nothing
    for step in ...:
        prof.before_step(step)                            # starts the trace when step == A
        with prof.range("forward"): ...
        prof.after_step(step)                             # stops and writes it after step B
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


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
    ``trainer.step == s``). Inactive outside that window: ``range`` is a no-op there."""

    def __init__(self, window: tuple[int, int] | None, out_dir: str | Path):
        self.window, self.out_dir = window, Path(out_dir)
        self._prof = None
        self.trace: Path | None = None

    @classmethod
    def from_spec(cls, spec: str | None, run_dir: str | Path) -> StepProfiler:
        return cls(parse_steps(spec), Path(run_dir) / "profile")

    @property
    def active(self) -> bool:
        return self._prof is not None

    def before_step(self, step: int) -> None:
        """``step``: the step about to run (1-based)."""
        if self.window and step == self.window[0] and self._prof is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities, record_shapes=True, with_stack=False)
            self._prof.__enter__()
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
        """``step``: the step just finished. Writes and returns the trace after the window's last step."""
        if self._prof is None or step < self.window[1]:
            return None
        return self.stop()

    def stop(self) -> Path | None:
        """End the trace early (a run that stops inside the window) and write what it has."""
        if self._prof is None:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        a, b = self.window
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.trace = self.out_dir / f"steps-{a}-{b}.pt.trace.json"
        prof.export_chrome_trace(str(self.trace))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (self.out_dir / f"steps-{a}-{b}.top_ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
        return self.trace
