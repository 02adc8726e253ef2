"""``mixedae-fast finetune`` as a user runs it, on a tiny trained run: the bad values it refuses, the
folder it writes (checkpoints, the timm export, results), resume, evaluation only, accumulation and the
line per epoch."""
import hashlib

import pytest
from conftest import TINY_OVERRIDES

from mixedae_fast.cli import main

TINY = [*TINY_OVERRIDES, "--optim.epochs=1", "--optim.warmup_epochs=1", "--run.log_every=2", "--run.ckpt_every=5",
        "--run.eval=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """runs/cpu_tiny after 5 steps on 40 embedded images (the cache in a temporary folder)."""
    root = tmp_path_factory.mktemp("finetune_cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXEDAE_CACHE", str(root / "cache"))
        assert main(["pretrain", "--no-progress", "--num-train", "40", "--num-val", "20", *TINY,
                     f"--run.out_dir={root}/runs"]) == 0
        yield root / "runs" / "cpu_tiny"


@pytest.fixture(autouse=True)
def _cache(run, monkeypatch):
    monkeypatch.setenv("MIXEDAE_CACHE", str(run.parent.parent / "cache"))


def _one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--weight-decay", "nan"), ("--blr", "-inf"),
                                           ("--min-lr", "nan"), ("--mixup", "inf"), ("--warmup-epochs", "nan")])
def test_non_finite_values_are_refused_before_any_work(run, capsys, option, value):
    """Before: ``--lr inf`` / ``--weight-decay nan`` trained to chance and exited 0."""
    before = _digest(run)
    assert main(["finetune", str(run), f"{option}={value}", "--epochs", "1", "--batch-size", "8", "--no-progress"]) == 2
    line = _one_error(capsys)
    name = option[2:].replace("-", "_")
    assert f"{name} = {float(value)!r} ({option}): must be" in line and "finite" in line, line
    assert "Traceback" not in capsys.readouterr().err
    assert _digest(run) == before
