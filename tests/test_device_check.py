"""benchmarks/device_check.sh, the GPU plan, in its dry mode (``DRY=1``: tiny shapes on the CPU through
Triton's interpreter): each stage writes its result files, a stage killed at its limit keeps the rows
that finished and the stages after it still run, and ``prepare`` hands the code's SHA to a copy without
.git. A GPU window is minutes a month: the script must not come back empty."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the script needs bash and coreutils' timeout")


def _run(out: Path, stages: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY": "1", "OUT": str(out), "PYTHON": sys.executable, "STAGES": stages,
           "MIXEDAE_GIT_SHA": "", **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)


def _stages(out: Path) -> dict[str, int]:
    return {line.split()[0]: int(line.split()[1]) for line in (out / "stages.txt").read_text().splitlines()}


@pytest.mark.slow  # ~40 s: every stage once, the fused kernel through the interpreter
def test_every_stage_writes_its_files(tmp_path):
    run = _run(tmp_path, "attention kernels train")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert _stages(tmp_path) == {"parts": 0, "attention": 0, "attention_row": 0, "kernels": 0, "kernel_row": 0,
                                 "train": 0}
    parts = json.loads((tmp_path / "parts.json").read_text())["parts"]
    assert {p["part"] for p in parts} == {"fwd", "fwd_radix", "fwd_no_select", "backward", "sum"}
    rows = json.loads((tmp_path / "bench_attention.json").read_text())["rows"]
    fused = [r for r in rows if r["backend"].startswith("triton")]
    assert fused and all(r["correct"] for r in fused if not r["ablation"]), fused
    assert "topk" in next(iter(json.loads((tmp_path / "attention_row.json").read_text()).values()))
    assert json.loads((tmp_path / "kernel_row.json").read_text())
    assert json.loads((tmp_path / "bench_kernels.json").read_text())["batches"]
    assert "mixedae/eager/synthetic" in json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    assert not (tmp_path / "train").exists()   # the bench's folder is folded into bench_train.json
    assert len(list(tmp_path.iterdir())) <= 8, "more files than a device call brings back"
    log = (tmp_path / "log.txt").read_text()
    assert "== attention (limit 90s)" in log and "== stages (name rc seconds)" in log


# Loaded into the benchmark's Python through PYTHONPATH: after the attention stage's third result write (the
# baseline row and two more) the process hangs, as a stage does that runs past its limit. The cut then falls
# at a known row whatever the interpreter's speed: a wall-clock cut between rows failed CI on 2026-12-05,
# when the fused rows had become ~1 s each and the whole stage finished inside the 30 s meant to cut it.
_HANG_AFTER_THIRD_ROW = """
import os, time
_replace, _writes = os.replace, [0]
def _replace_then_hang(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if os.fspath(dst).endswith("bench_attention.json"):
        _writes[0] += 1
        if _writes[0] == 3:
            time.sleep(600)
os.replace = _replace_then_hang
"""


@pytest.mark.slow  # ~25 s
def test_a_killed_stage_keeps_its_finished_rows_and_the_next_stage_runs(tmp_path):
    """The attention stage hangs after its third row and is killed at its 20 s limit: its JSON holds
    exactly the three rows that finished (the baseline first), the stage is recorded as killed (124), no
    half-written file is left, and the kernels stage after it still runs and writes. The parts stage, cut at
    1 s (inside its imports), is recorded as killed too and the attention stage still runs."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HANG_AFTER_THIRD_ROW)
    out = tmp_path / "out"
    run = _run(out, "attention kernels", LIMIT_PARTS="1", LIMIT_ATTENTION="20", TILINGS="m32w8,m64w4",
               PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    assert run.returncode == 0, run.stderr[-2000:]
    stages = _stages(out)
    assert stages["parts"] == 124 and stages["attention"] == 124 and stages["kernels"] == 0, stages
    rows = json.loads((out / "bench_attention.json").read_text())["rows"]
    assert len(rows) == 3 and rows[0]["backend"] == "baseline" and "fwd_bwd_ms" in rows[0], rows
    assert not list(out.glob("*.tmp")), "a result file is replaced whole, never left half written"
    assert json.loads((out / "bench_kernels.json").read_text())["batches"]


def test_prepare_writes_the_sha_a_copy_without_git_reports(tmp_path):
    """``prepare`` writes .git_sha in the checkout; a copy of the package without .git reports it."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    sha_file = ROOT / ".git_sha"
    saved = sha_file.read_text() if sha_file.exists() else None
    try:
        run = subprocess.run(["bash", str(SCRIPT), "prepare"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        sha = sha_file.read_text().strip()
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
        assert sha.removesuffix("+dirty") == head
        copy = tmp_path / "copy"
        shutil.copytree(ROOT / "mixedae_fast", copy / "mixedae_fast", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(sha_file, copy / ".git_sha")
        env = {k: v for k, v in os.environ.items() if k not in ("MIXEDAE_GIT_SHA", "PYTHONPATH")}
        env["GIT_CEILING_DIRECTORIES"] = str(tmp_path)   # git finds no repository above the copy
        got = subprocess.run([sys.executable, "-c", "from mixedae_fast.provenance import git_sha; print(git_sha())"],
                             capture_output=True, text=True, cwd=copy, env=env, timeout=60)
        assert got.stdout.strip() == sha, got.stderr
    finally:
        if saved is None:
            sha_file.unlink(missing_ok=True)
        else:
            sha_file.write_text(saved)


def test_the_prepared_sha_wins_over_the_copys_own_git(tmp_path):
    """On a GPU machine the copy of the tree carries a stale .git of its own (seen 2026-12-04: a run
    stamped with the session's first commit): the script must report the prepared .git_sha, not git's."""
    sha_file = ROOT / ".git_sha"
    saved = sha_file.read_text() if sha_file.exists() else None
    try:
        sha_file.write_text("cafe123\n")
        run = _run(tmp_path, " ")   # no stage: the header line only
        assert run.returncode == 0, run.stderr
        assert "git cafe123" in (tmp_path / "log.txt").read_text().splitlines()[0]
    finally:
        if saved is None:
            sha_file.unlink(missing_ok=True)
        else:
            sha_file.write_text(saved)
