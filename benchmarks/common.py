"""What every benchmark shares: one clock, the median timer built on it, and the head of a result file
(mixedae_fast/provenance.py's fields: card, date, git SHA, command, versions, as every report's)."""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

from mixedae_fast.provenance import provenance


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, the wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        """Milliseconds between two marks (waits for the later one on a GPU)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` untimed calls, each call timed with :class:`Clock`."""
    for _ in range(warmup):
        fn()
    clock, times = Clock(device), []
    for _ in range(iters):
        start = clock.mark()
        fn()
        times.append(clock.ms(start, clock.mark()))
    return statistics.median(times)


def batches(loader):
    """A loader's batches forever, one epoch after another (``set_epoch`` before each)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def write_json(result: dict, path) -> None:
    """``result`` as JSON at ``path``, replaced whole (a temporary file beside it, then a rename): the
    benchmarks write after every row, so a run killed at any moment leaves the rows that finished."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


def result_head(benchmark: str, device: torch.device, command: list[str], argv=None, **fields) -> dict:
    """The first fields of a result file: ``benchmark``, provenance (date, git SHA, host, machine,
    command, device, versions), ``torch``, then ``fields``. ``command``: how it was invoked without its
    arguments (``["mixedae-fast", "bench"]``); ``argv``: the arguments (default ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {"benchmark": benchmark, **provenance(device, [*command, *args]), "torch": torch.__version__, **fields}
