"""run.profile_steps: the spec is checked, exactly the window's steps land in a Chrome trace (one file a
rank, each step a ProfilerStep#N range), and a window the run never reaches is said up front."""
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
    assert trace == tmp_path / "profile" / "steps-3-4.rank0.pt.trace.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"phase-3", "phase-4"} <= names and not names & {"phase-2", "phase-5"}
    assert {n for n in names if n and n.startswith("ProfilerStep#")} == {"ProfilerStep#3", "ProfilerStep#4"}
    assert "aten::mm" in (tmp_path / "profile" / "steps-3-4.rank0.top_ops.txt").read_text()


def test_each_rank_writes_its_own_trace(tmp_path):
    traces = []
    for rank in (0, 1):                                  # two ranks sharing one run folder
        prof = StepProfiler.from_spec("1:2", tmp_path, rank)
        for step in (1, 2, 3):
            prof.before_step(step)
            with prof.range(f"rank{rank}-work"):
                torch.randn(8, 8).sum()
            prof.after_step(step)
        traces.append(prof.trace)
    assert [t.name for t in traces] == ["steps-1-2.rank0.pt.trace.json", "steps-1-2.rank1.pt.trace.json"]
    for rank, trace in enumerate(traces):
        names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
        assert f"rank{rank}-work" in names and f"rank{1 - rank}-work" not in names


def test_a_resumed_run_marks_steps_by_their_own_number(tmp_path):
    prof = StepProfiler.from_spec("5:6", tmp_path)
    for step in (6, 7):                                  # resumed after step 5: the window's end is traced
        prof.before_step(step)
        prof.after_step(step)
    names = {e.get("name") for e in json.loads(prof.trace.read_text())["traceEvents"]}
    assert "ProfilerStep#6" in names and "ProfilerStep#5" not in names


def test_a_window_the_run_does_not_reach_is_named_with_the_runs_length():
    prof = StepProfiler.from_spec("20:24", ".")
    assert "after the run's last step 10: nothing will be traced" in prof.unreached(0, 10)
    assert "stops at step 22" in prof.unreached(0, 22)
    assert "resumes after step 30, so nothing" in prof.unreached(30, 50)
    assert prof.unreached(0, 24) is None and StepProfiler.from_spec(None, ".").unreached(0, 1) is None


def test_a_run_that_stops_inside_the_window_still_writes(tmp_path):
    prof = StepProfiler.from_spec("2:10", tmp_path)
    for step in (1, 2, 3):
        prof.before_step(step)
        prof.after_step(step)
    assert prof.stop().is_file() and prof.stop() is None


def test_a_run_says_when_its_profile_window_is_out_of_reach(tiny, tmp_path, capsys):
    import numpy as np

    from mixedae_fast.model.mixedae import build_model
    from mixedae_fast.pipelines.torch_loader import TensorBatchLoader
    from mixedae_fast.train.engine import Trainer

    cfg = tiny.config("--data.batch_size=8", "--optim.epochs=1", "--run.profile_steps=50:60")
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    trainer = Trainer(cfg, build_model(cfg), TensorBatchLoader(images, np.zeros(16), 8, 16), tmp_path / "run",
                      torch.device("cpu"), progress=False)
    trainer.fit()
    said = [line for line in capsys.readouterr().out.splitlines() if "profile_steps" in line]
    assert said == ["warning: run.profile_steps 50:60 starts after the run's last step 2: nothing will be traced; "
                    "pick A:B within 1:2"]
    assert not (tmp_path / "run" / "profile").exists()
