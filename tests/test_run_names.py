"""Running the main job again without naming the run starts a new folder (<name>-1, as timm does); an
explicitly named run folder that is taken is refused (tests/test_run_safety.py)."""
import hashlib

import pytest
from conftest import TINY_OVERRIDES

from mixedae_fast.cli import main

TINY = [*TINY_OVERRIDES, "--data.num_workers=0", "--optim.epochs=1",
        "--run.log_every=1", "--run.eval=false"]


def _digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_an_unnamed_rerun_gets_the_next_free_folder(tmp_path, capsys):
    argv = ["pretrain", "--no-progress", "--num-train", "16", "--num-val", "8", "--max-steps", "1", *TINY,
            f"--run.out_dir={tmp_path}"]
    assert main(argv) == 0
    first = _digest(tmp_path / "cpu_tiny")
    capsys.readouterr()
    assert main(argv) == 0
    assert "this run is" in capsys.readouterr().out and (tmp_path / "cpu_tiny-1" / "metrics.csv").is_file()
    assert _digest(tmp_path / "cpu_tiny") == first                     # the earlier run untouched
    assert main([*argv, "--run.name=cpu_tiny"]) == 2                   # named explicitly: refused
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("words, named, name", [
    ([], False, "cpu_tiny"),
    (["--run.name=mine"], True, "mine"),
    (["--run.name", "mine"], True, "mine"),                            # an option of pretrain's parser
    (["--run.out_dir=elsewhere", "--run.resume=auto"], False, "cpu_tiny"),
])
def test_whether_a_name_was_given_is_the_parser_s_answer(monkeypatch, words, named, name):
    import mixedae_fast.pretrain as pretrain_module

    seen = {}
    monkeypatch.setattr(pretrain_module, "pretrain", lambda cfg, **kw: seen.update(kw, name=cfg.run.name))
    assert main(["pretrain", "--max-steps", "1", *words]) == 0
    assert (seen["name_given"], seen["name"]) == (named, name)
