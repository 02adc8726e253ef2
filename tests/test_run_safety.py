"""A run folder belongs to one run, resumes lose nothing, and every failure is one ``error:`` line.

Each case builds the bad situation, runs the command line in-process, and checks the exit code, the
one error line and that the files that existed before are byte for byte the same."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES

from mixedae_fast.cli import main

TINY = [*TINY_OVERRIDES, "--data.num_workers=0", "--optim.epochs=2", "--optim.warmup_epochs=1",
        "--run.log_every=2", "--run.ckpt_every=2", "--run.keep_last=3", "--run.eval=false"]


def _pretrain(out_dir, *extra):
    return main(["pretrain", "--no-progress", "--num-train", "16", "--num-val", "8", *TINY,
                 f"--run.out_dir={out_dir}", "--run.name=r", *extra])


pytestmark = pytest.mark.usefixtures("cache")   # one cache for the module: the trained run's embedded data


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MIXEDAE_DEBUG", raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """runs/r after 4 steps (2 an epoch): checkpoints at steps 2 and 4, metrics rows at 2 and 4."""
    out = tmp_path_factory.mktemp("trained")
    assert _pretrain(out) == 0
    return out / "r"


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run to damage: ``tmp_path/runs/r``."""
    shutil.copytree(trained, tmp_path / "runs" / "r")
    return tmp_path / "runs" / "r"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert "(unexpected" not in errors[0], errors[0]  # a failure we know of names its fix
    return errors[0]


def _metric_steps(run: Path) -> list[float]:
    lines = (run / "metrics.csv").read_text().splitlines()
    return [float(line.split(",")[0]) for line in lines[1:]]


def _ckpts(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.pt"))


# -- a run folder belongs to one run ---------------------------------------------------------------

def test_a_reused_run_name_is_refused_and_nothing_changes(run, capsys):
    before = _digest(run)
    assert _pretrain(run.parent) == 2
    err = _one_error(capsys)
    assert "already holds a run" in err and "--run.resume=auto" in err and "--run.name" in err
    assert _digest(run) == before


def test_a_live_lock_refuses_a_second_process(run, capsys):
    (run / ".lock").write_text(f"pid={os.getppid()} host={socket.gethostname()} slurm_job= since=now\n")
    before = _digest(run)
    assert _pretrain(run.parent, "--run.resume=auto") == 2
    err = _one_error(capsys)
    assert f"in use by process {os.getppid()}" in err and "delete" in err
    assert _digest(run) == before


def test_a_live_lock_of_the_same_slurm_job_is_not_taken_over(run, capsys, monkeypatch):
    """Two processes of one SLURM job (a second srun, a requeue overlapping the old step) both wrote one
    run folder: the matching job id alone took the lock over. Refused while the holder lives (its pid on
    this host, its heartbeat on another); a same-job lock on another node that stopped beating is stale."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = run / ".lock"
    lock.write_text(f"pid={os.getppid()} host={socket.gethostname()} slurm_job=4242 since=now\n")
    before = _digest(run)
    assert _pretrain(run.parent, "--run.resume=auto") == 2
    assert f"in use by process {os.getppid()}" in _one_error(capsys)
    assert _digest(run) == before
    lock.write_text("pid=1 host=another-node slurm_job=4242 since=now\n")  # beating: touched just now
    before = _digest(run)
    assert _pretrain(run.parent, "--run.resume=auto") == 2
    assert "in use by process 1 on another-node" in _one_error(capsys)
    assert _digest(run) == before
    old = lock.stat().st_mtime - 3600
    os.utime(lock, (old, old))  # no beat for an hour: that step is gone
    assert _pretrain(run.parent, "--run.resume=auto") == 0
    assert not lock.exists()


def test_the_lock_holder_keeps_its_lock_fresh(tmp_path, monkeypatch):
    from mixedae_fast.train import runs
    monkeypatch.setattr(runs, "HEARTBEAT_S", 0.05)
    with runs.RunLock(tmp_path) as lock:
        old = lock.path.stat().st_mtime - 3600
        os.utime(lock.path, (old, old))
        import time
        time.sleep(0.5)
        assert lock.path.stat().st_mtime > old + 3000
    assert not lock.path.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(run, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / ".lock").write_text(f"pid={dead.pid} host={socket.gethostname()} slurm_job= since=then\n")
    assert _pretrain(run.parent, "--run.resume=auto") == 0  # at step 4 of 4 already: nothing left to train
    assert "resumed from" in capsys.readouterr().out
    assert not (run / ".lock").exists()  # released at the end


def test_a_resume_under_another_seed_is_refused(run, capsys):
    """The seed draws the data order and every mixing step: a resume under another one was accepted
    silently and continued a different run."""
    before = _digest(run)
    assert _pretrain(run.parent, "--run.resume=auto", "--run.seed=7") == 2
    err = _one_error(capsys)
    assert "run.seed: 0 -> 7 (pass --run.seed=0)" in err and "start a new run" in err
    assert _digest(run) == before


def test_a_refused_resume_leaves_config_yaml_as_it_was(run, capsys):
    before = _digest(run)
    assert _pretrain(run.parent, "--run.resume=auto", "--mixing.ha=oracle") == 2
    assert "mixing.ha: 'topk' -> 'oracle'" in _one_error(capsys)
    assert _digest(run) == before


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(run, capsys):
    assert _ckpts(run) == ["ckpt-00000002.pt", "ckpt-00000004.pt"] and _metric_steps(run) == [2, 4]
    later = hashlib.sha256((run / "checkpoints" / "ckpt-00000004.pt").read_bytes()).hexdigest()
    assert _pretrain(run.parent, f"--run.resume={run}/checkpoints/ckpt-00000002.pt", "--max-steps", "3") == 0
    aside = run / "checkpoints" / "abandoned-00000002" / "ckpt-00000004.pt"
    assert hashlib.sha256(aside.read_bytes()).hexdigest() == later  # moved, not deleted
    assert _ckpts(run) == ["ckpt-00000002.pt", "ckpt-00000003.pt"]  # resume=auto / export take step 3
    assert _metric_steps(run) == [2, 3]  # the abandoned branch's row at step 4 is gone
    assert "moved to" in capsys.readouterr().out


def test_a_crash_and_resume_logs_each_step_once(run):
    (run / "checkpoints" / "ckpt-00000004.pt").unlink()  # as if killed after logging step 4, before saving it
    assert _pretrain(run.parent, "--run.resume=auto") == 0
    assert _metric_steps(run) == [2, 4]


# -- resume falls back past a damaged checkpoint ---------------------------------------------------

def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(run, capsys):
    newest = run / "checkpoints" / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    assert _pretrain(run.parent, "--run.resume=auto") == 0
    out = capsys.readouterr().out
    assert "skipped ckpt-00000004.pt, which does not load" in out
    assert "resumed from" in out and "ckpt-00000002.pt at step 2" in out
    assert (run / "checkpoints" / "abandoned-00000002" / "ckpt-00000004.pt").exists()
    assert _ckpts(run) == ["ckpt-00000002.pt", "ckpt-00000004.pt"]  # retrained


def test_a_random_bytes_checkpoint_is_one_error_line(run, capsys):
    bad = run.parent / "random.pt"
    bad.write_bytes(os.urandom(4096))
    before = _digest(run)
    assert _pretrain(run.parent, f"--run.resume={bad}") == 2
    assert "cannot read checkpoint" in _one_error(capsys)
    assert _digest(run) == before


def test_changed_optimiser_settings_resume_only_as_a_logged_override(run, capsys):
    before = _digest(run)
    assert _pretrain(run.parent, "--run.resume=auto", "--optim.base_lr=1e-5", "--optim.epochs=3") == 2
    err = _one_error(capsys)
    assert "optim.base_lr: 0.012 -> 1e-05" in err and "--run.resume_override=true" in err
    assert _digest(run) == before
    assert _pretrain(run.parent, "--run.resume=auto", "--optim.base_lr=1e-5", "--optim.epochs=3",
                     "--run.resume_override=true") == 0
    assert "resume override (run.resume_override=true): optim.base_lr: 0.012 -> 1e-05" in capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 6 and report["resume_overrides"] == ["optim.base_lr: 0.012 -> 1e-05",
                                                                   "optim.epochs: 2 -> 3"]


def test_another_global_batch_on_resume_is_one_error_line(run, capsys):
    before = _digest(run)
    assert _pretrain(run.parent, "--run.resume=auto", "--data.batch_size=4") == 2
    assert "global batch of 8" in _one_error(capsys) and _digest(run) == before


def test_an_override_never_covers_the_model(run, capsys):
    assert _pretrain(run.parent, "--run.resume=auto", "--run.resume_override=true", "--model.depth=3") == 2
    assert "model.depth: 2 -> 3" in _one_error(capsys)


# -- failures on the way -------------------------------------------------------------------------

def test_the_nan_stop_is_one_error_line(tmp_path, capsys, monkeypatch):
    from mixedae_fast.model.mixedae import MixedAutoencoderViT

    real = MixedAutoencoderViT.forward

    def diverged(self, *a, **k):
        out = real(self, *a, **k)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(MixedAutoencoderViT, "forward", diverged)
    assert _pretrain(tmp_path, "--optim.max_nan_steps=2") == 1
    err = _one_error(capsys)
    assert "non-finite" in err and "the first was step 1" in err and "No checkpoint was written before it" in err
    assert not (tmp_path / "r" / "report.json").exists()


def test_a_full_disk_is_one_error_line_and_keeps_the_checkpoints(run, capsys, monkeypatch):
    import torch

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    before = {k: v for k, v in _digest(run).items() if k.startswith("checkpoints")}
    monkeypatch.setattr(torch, "save", full)
    assert _pretrain(run.parent, "--run.resume=auto", "--optim.epochs=3", "--run.resume_override=true") == 1
    err = _one_error(capsys)
    assert "could not write" in err and "ckpt-00000006.pt" in err and "is the disk full?" in err
    assert {k: v for k, v in _digest(run).items() if k.startswith("checkpoints")} == before


def test_the_report_says_where_it_came_from(trained):
    report = json.loads((trained / "report.json").read_text())
    assert report["command"].startswith("mixedae-fast pretrain --no-progress")
    assert report["host"] == socket.gethostname() and report["git_sha"]
    assert report["versions"]["torch"] and report["versions"]["python"]


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    assert _pretrain(tmp_path, "--max-steps", "0") == 2
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("MIXEDAE_DEBUG", "1")
    assert _pretrain(tmp_path, "--max-steps", "0") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.count("\nerror: ") + err.startswith("error: ") == 1
    monkeypatch.delenv("MIXEDAE_DEBUG")
    assert _pretrain(tmp_path, "--max-steps", "-5", "--debug") == 2
    assert "Traceback" in capsys.readouterr().err


# -- bad input: one error line, nothing written ----------------------------------------------------

def _no_images(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    return [f"--data.path={tmp_path}/empty"]


def _undecodable(tmp_path):
    for i in range(3):
        (tmp_path / "bad" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "bad" / "a" / f"{i}.jpg").write_bytes(b"not a jpeg")
    return [f"--data.path={tmp_path}/bad"]


def _a_file(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    return [f"--data.path={tmp_path}/f.txt"]


def _few_images(tmp_path):
    from mixedae_fast.pipelines.synthetic import write_image_folder

    root = write_image_folder(tmp_path / "few", 4, 4, size=16, progress=False)
    return [f"--data.path={root}/train"]


def _cache_under_a_file(tmp_path):
    (tmp_path / "blocker").write_text("x")
    os.environ["MIXEDAE_CACHE"] = str(tmp_path / "blocker" / "cache")  # restored: the case's monkeypatch holds it
    return ["--num-train", "17"]  # another embedded set than the shared cache holds


@pytest.mark.parametrize("make, fragment", [
    (lambda t: ["--max-steps", "0"], "--max-steps 0: must be >= 1"),
    (lambda t: ["--max-steps", "-5"], "--max-steps -5: must be >= 1"),
    (lambda t: ["--run.name=../.."], "run.name = '../..'"),
    (lambda t: [f"--run.resume={t}/gone.pt"], "no such file; use none, auto"),
    (lambda t: ["--mixing.group_size=1", "--mixing.mask_ratio=0"], "no patch is left to reconstruct"),
    (lambda t: ["--optim.base_lr=.inf"], "must be finite"),
    (lambda t: ["--runtime.attention_backend=xformers"], "xformers has no CPU operators"),
    (_no_images, "no images"),
    (_undecodable, "can be decoded"),
    (_a_file, "is a file, not an ImageFolder root"),
    (_few_images, "no batch of 8"),
    (_cache_under_a_file, "MIXEDAE_CACHE"),
], ids=["max-steps-0", "max-steps-neg", "name-escapes", "resume-missing", "nothing-masked", "lr-inf", "xformers-cpu",
        "no-images", "undecodable", "file-as-path", "fewer-than-a-batch", "cache-unwritable"])
def test_bad_input_is_one_error_line(tmp_path, capsys, monkeypatch, make, fragment):
    monkeypatch.setenv("MIXEDAE_CACHE", os.environ["MIXEDAE_CACHE"])  # restored after the case
    extra = make(tmp_path)
    capsys.readouterr()
    code = _pretrain(tmp_path / "runs", *extra)
    assert code != 0
    assert fragment in _one_error(capsys)
    assert not (tmp_path / "runs" / "r" / "config.yaml").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_error_line(tmp_path, capsys):
    assert _pretrain(tmp_path, "--runtime.device=cuda") == 2
    assert "CUDA is not available" in _one_error(capsys)
