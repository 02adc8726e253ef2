"""run.profile_steps: the spec is checked, and exactly the window's steps land in a Chrome trace."""
import json

import pytest
import torch

from mixedae_fast.train.profiling import StepProfiler, parse_steps


def test_spec():
    assert parse_steps(None) is None and parse_steps("none") is None and parse_steps("") is None
    assert parse_steps("20:24") == (20, 24) and parse_steps("3:3") == (3, 3)
    for bad in ("24:20", "0:3", "5", "a:b", "1:2:3", "-1:4"):
        with pytest.raises(ValueError, match="expected 'A:B'"):
            parse_steps(bad)


def test_only_the_window_is_traced(tmp_path):
    prof = StepProfiler.from_spec("3:4", tmp_path)
    x = torch.randn(32, 32)
    written = []
    for step in range(1, 7):
        prof.before_step(step)
        assert prof.active == (3 <= step <= 4)
        with prof.range(f"phase-{step}"):
            x = (x @ x).tanh()
        written.append(prof.after_step(step))
    assert written[:3] == [None, None, None] and written[4:] == [None, None]
    trace = written[3]
    assert trace == tmp_path / "profile" / "steps-3-4.pt.trace.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"phase-3", "phase-4"} <= names and not names & {"phase-2", "phase-5"}
    assert "aten::mm" in (tmp_path / "profile" / "steps-3-4.top_ops.txt").read_text()


def test_a_run_that_stops_inside_the_window_still_writes(tmp_path):
    prof = StepProfiler.from_spec("2:10", tmp_path)
    for step in (1, 2, 3):
        prof.before_step(step)
        prof.after_step(step)
    assert prof.stop().is_file() and prof.stop() is None
