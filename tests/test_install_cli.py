"""What a user meets first: the install (no CUDA library for the CPU quickstart, DALI extras per CUDA
version), ``--version``, the progress bar only on a terminal, ``--help`` with the given preset's values."""
import io
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
from conftest import TINY_OVERRIDES

import mixedae_fast
from mixedae_fast.cli import main

ROOT = Path(__file__).resolve().parent.parent
CUDA_BUILDS = ("nvidia", "cuda", "triton", "xformers", "cupy")  # packages that are, or bundle, CUDA libraries


@pytest.fixture(scope="module")
def setup_kwargs():
    """The keyword arguments setup.py passes to setuptools.setup."""
    seen = {}
    real, cwd = setuptools.setup, os.getcwd()
    setuptools.setup = lambda **kw: seen.update(kw)
    try:
        os.chdir(ROOT)
        runpy.run_path(str(ROOT / "setup.py"))
    finally:
        setuptools.setup = real
        os.chdir(cwd)
    return seen


def _names(requirements):
    return [r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements]


def test_the_quickstart_install_pulls_no_cuda_build(setup_kwargs):
    """scripts/main.sh installs setup.py's install_requires alone (no extra): none of them may be, or bundle,
    a CUDA library (nvidia-dali-cuda130 brought ~591 MB of them, triton its CUDA toolchain)."""
    assert not [n for n in _names(setup_kwargs["install_requires"]) if any(c in n for c in CUDA_BUILDS)]


def test_dali_extras_for_cuda_12_and_13(setup_kwargs):
    extras = setup_kwargs["extras_require"]
    assert _names(extras["dali-cu12"]) == ["nvidia-dali-cuda120"]
    assert _names(extras["dali-cu13"]) == ["nvidia-dali-cuda130"]
    assert extras["dali"] == extras["dali-cu13"]                      # the name older docs use
    assert "triton" in _names(extras["dev"])                            # the tests run Triton's interpreter
    assert setup_kwargs["version"] == mixedae_fast.__version__


def _fake_venv(tmp_path):
    """A venv whose python only records how it was called (scripts/env.sh's pip calls)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for tool in ("python", "mixedae-fast"):
        (venv / "bin" / tool).write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> "{venv}/calls.log"\n')
        (venv / "bin" / tool).chmod(0o755)
    return venv


def _calls(venv):
    log = venv / "calls.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    log.unlink(missing_ok=True)
    return [line for line in lines if " -e " in line or line.startswith("mixedae-fast")]


def test_main_job_installs_without_extras_and_the_tests_with_theirs(tmp_path):
    venv = _fake_venv(tmp_path)
    env = dict(os.environ, MIXEDAE_VENV=str(venv))
    run = lambda *cmd: subprocess.run(["bash", *cmd], env=env, check=True, capture_output=True, text=True)
    run(str(ROOT / "scripts/main.sh"), "--max-steps", "1")
    installed, ran = _calls(venv)
    assert installed.endswith(f"-e {ROOT}") and ran == "mixedae-fast pretrain --max-steps 1"  # no [extras]
    run(str(ROOT / "scripts/main.sh"))
    assert _calls(venv) == ["mixedae-fast pretrain"]                                    # nothing to install
    run(str(ROOT / "scripts/env.sh"), "dev,dali,log")
    assert [c.split()[-1] for c in _calls(venv)] == [f"{ROOT}[dali,dev,log]"]
    run(str(ROOT / "scripts/main.sh"))
    assert _calls(venv) == ["mixedae-fast pretrain"]                  # the test extras stay: no reinstall


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"mixedae-fast {mixedae_fast.__version__}") and out.count("\n") == 1


@pytest.mark.parametrize("argv, model_line", [
    (["pretrain", "--config", "vit_base", "--help"], "model.embed_dim              int = 768"),
    (["config", "--config=vit_large", "--model.depth=6", "--help"], "model.depth                  int = 6"),
    (["pretrain", "--help"], "model.embed_dim              int = 128"),
])
def test_help_lists_the_values_of_the_config_given(capsys, argv, model_line):
    with pytest.raises(SystemExit):
        main(argv)
    assert model_line in capsys.readouterr().out


def test_help_with_an_unknown_preset_is_one_error_line(capsys):
    assert main(["pretrain", "--config", "vit_huge", "--help"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown preset 'vit_huge'") and "\n" not in err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal, flags, shown", [
    (False, [], False),                    # a redirected log, a cluster job: the plain log lines only
    (True, [], True),
    (False, ["--progress"], True),         # forced
    (True, ["--no-progress"], False),
])
def test_progress_bar_only_on_a_terminal(monkeypatch, terminal, flags, shown):
    import mixedae_fast.pretrain as pretrain_module

    seen = {}
    monkeypatch.setattr(pretrain_module, "pretrain", lambda cfg, **kw: seen.update(kw))
    if terminal:
        monkeypatch.setattr(sys, "stderr", _Terminal())
    assert main(["pretrain", *flags, "--max-steps", "1", *TINY_OVERRIDES]) == 0
    assert seen["progress"] is shown


def test_launch_passes_the_progress_options_on_as_given(capsys):
    """Each rank decides on its own stderr: the torchrun command is the one the user typed."""
    assert main(["launch", "local", "--nproc", "2", "--dry-run", "--max-steps", "5"]) == 0
    command = capsys.readouterr().out.splitlines()[-1]
    assert command.endswith("pretrain --config cpu_tiny --max-steps 5") and "progress" not in command


@pytest.mark.slow
def test_no_bar_frames_in_a_redirected_log(tmp_path):
    """A real run with stderr to a file (as `> log 2>&1` or a SLURM job): no tqdm frame lands there."""
    log = tmp_path / "stderr.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "mixedae_fast.cli", "pretrain", "--max-steps", "2", "--num-train", "8",
                        "--num-val", "8", *TINY_OVERRIDES, "--run.eval=false", f"--run.out_dir={tmp_path}/runs"],
                       stdout=subprocess.DEVNULL, stderr=f, check=True, cwd=tmp_path,
                       env=dict(os.environ, MIXEDAE_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT)))
    text = log.read_text()
    assert "\r" not in text and "it/s" not in text and "pretrain:" not in text
