"""eval, finetune, export and visualize on a tiny trained run, through the command line: their result
files and pictures, and the errors bad input gives."""
import json
from pathlib import Path

import pytest
from PIL import Image

from mixedae_fast.cli import main

pytestmark = pytest.mark.usefixtures("cache")




def test_eval_reports_pretrained_beside_random_init(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--pool", "both", "--probe-epochs", "3", "--k", "5"]) == 0
    report = json.loads((tiny_run / "eval_embedded.json").read_text())
    assert report["dataset"] == "embedded" and (report["num_train"], report["num_val"]) == (40, 20)
    assert report["step"] == 5 and report["k"] == 5 and report["git_sha"]
    for model in ("pretrained", "random_init"):
        assert set(report["results"][model]) == {"avg", "cls"}
        assert set(report["results"][model]["avg"]) == {"knn", "linear_probe"}
    out = capsys.readouterr().out
    assert "kNN k=5 (avg)" in out and "linear probe (cls)" in out and "random init" in out


def test_eval_of_a_checkpoint_file_to_a_chosen_file(tiny_run, tmp_path):
    ckpt = sorted((tiny_run / "checkpoints").iterdir())[0]
    assert main(["eval", str(ckpt), "--no-probe", "--out", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["step"] == 3 and set(report["results"]["pretrained"]["avg"]) == {"knn"}


def test_finetune_writes_its_results(tiny_run, capsys):
    assert main(["finetune", str(tiny_run), "--epochs", "2", "--batch-size", "8", "--baseline", "--no-progress"]) == 0
    report = json.loads((tiny_run / "finetune_embedded" / "results.json").read_text())
    ft = tiny_run / "finetune_embedded"
    for model, folder in (("pretrained", ft), ("random_init", ft / "baseline")):
        r = report["results"][model]
        assert len(r["history"]) == 2 and 0 <= r["val_top1"] <= 100 and r["steps"] == 2 * 5
        assert r["checkpoint"] == str(folder / "checkpoints" / "ckpt-00000002.pt") and Path(r["checkpoint"]).is_file()
        assert (folder / "export_timm" / "model.safetensors").is_file()
    assert report["results"]["pretrained"]["settings"]["batch_size"] == 8
    out = capsys.readouterr().out
    assert "pretrained epoch 2/2: train loss" in out and "random init epoch 2/2: train loss" in out


def test_export_loads_back_in_timm(tiny_run, capsys):
    assert main(["export", str(tiny_run)]) == 0
    config = json.loads((tiny_run / "export_timm" / "config.json").read_text())
    assert config["model_args"]["embed_dim"] == 32 and config["model_args"]["global_pool"] == "avg"
    assert "check: timm loaded it strictly" in capsys.readouterr().out


def test_visualize_writes_pictures(tiny_run, tmp_path, capsys):
    assert main(["visualize", str(tiny_run), "--out", str(tmp_path), "--query", "2"]) == 0
    sizes = {"reconstruction.png": (800, 830), "homologous.png": (750, 300), "loss_curve.png": (700, 400)}
    for name, size in sizes.items():
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size == size, name
    assert "query token 2" in capsys.readouterr().out


def test_the_jobs_run_without_the_command_line(tiny_run, tmp_path):
    """run_eval and run_visualize called from Python: their reports (eval's as written, with where; the
    pictures' paths) and the summaries the command line prints from them."""
    from mixedae_fast.downstream.jobs import eval_summary, run_eval, run_visualize, visualize_summary

    report = run_eval(str(tiny_run), out=str(tmp_path / "e.json"), k=3, probe=False,
                      command=["mixedae-fast", "eval", "x"])
    written = json.loads((tmp_path / "e.json").read_text())
    assert report["path"] == tmp_path / "e.json" and written["command"] == report["command"] == "mixedae-fast eval x"
    assert written["results"] == report["results"] and set(written["results"]["pretrained"]["avg"]) == {"knn"}
    summary = eval_summary(report)
    assert "kNN k=3 (avg)" in summary and summary.endswith(f"results: {tmp_path / 'e.json'}")
    pictures = run_visualize(str(tiny_run), out=str(tmp_path / "pics"))
    assert pictures["reconstruction"] == tmp_path / "pics" / "reconstruction.png" and pictures["loss_curve"].is_file()
    assert visualize_summary(pictures).splitlines()[0] == str(pictures["reconstruction"])


def test_bad_input_names_the_problem(tiny_run, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory or checkpoint" in capsys.readouterr().err
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    assert main(["export", str(tmp_path / "fresh")]) == 2
    assert "config.yaml but no checkpoint" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--model.depth=3"]) == 2
    assert "only runtime" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--k", "0"]) == 2
    assert "--k 0" in capsys.readouterr().err
    assert main(["visualize", str(tiny_run), "--data-dir", str(tmp_path)]) == 2
    assert "no train or val/ folder" in capsys.readouterr().err
    assert main(["finetune", str(tiny_run), "--layer-decay", "2"]) == 2
    assert "layer_decay = 2.0" in capsys.readouterr().err
    assert main(["visualize", str(tiny_run), "--query", "99"]) == 2
    assert "query 99 out of range" in capsys.readouterr().err


def _one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def _digest(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_that_cannot_take_the_result_is_refused_before_the_work(tiny_run, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    for argv, fragment in (
            (["eval", str(tiny_run), "--out", str(tmp_path)], "is a folder; --out takes the result file"),
            (["finetune", str(tiny_run), "--out", str(tmp_path)], "holds other files (a_file)"),
            (["eval", str(tiny_run), "--out", str(tmp_path / "a_file" / "e.json")], "is a file, not a folder"),
            (["export", str(tiny_run), "--out", str(tmp_path / "a_file")], "is a file; --out takes a folder"),
            (["export", str(tiny_run), "--out", str(tmp_path / "a_file" / "x")], "is a file, not a folder"),
            (["visualize", str(tiny_run), "--out", str(tmp_path / "a_file" / "x")], "is a file, not a folder")):
        before = _digest(tmp_path)
        assert main(argv) == 2, argv
        assert fragment in _one_error(capsys), argv
        assert _digest(tmp_path) == before


def test_export_that_fails_its_check_writes_nothing(tiny_run, tmp_path, capsys, monkeypatch):
    import mixedae_fast.downstream.export as export

    out = tmp_path / "export"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    before = _digest(out)
    real = export.load_export

    def off_by_one(*a, **k):
        model = real(*a, **k)
        model.register_forward_hook(lambda m, i, o: o + 1)
        return model

    monkeypatch.setattr(export, "load_export", off_by_one)
    capsys.readouterr()
    assert main(["export", str(tiny_run), "--out", str(out)]) == 1
    assert "does not reproduce the encoder" in _one_error(capsys)
    assert _digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "new")]) == 1
    assert not (tmp_path / "new").exists()


def test_a_damaged_checkpoint_is_one_error_line_downstream(tiny_run, tmp_path, capsys):
    import os

    (tmp_path / "random.pt").write_bytes(os.urandom(2048))
    truncated = tmp_path / "checkpoints" / "ckpt-00000005.pt"
    truncated.parent.mkdir()
    truncated.write_bytes((tiny_run / "checkpoints" / "ckpt-00000005.pt").read_bytes()[:3000])
    for target in (tmp_path / "random.pt", truncated):
        for command in ("eval", "export", "visualize", "finetune"):
            assert main([command, str(target)]) == 2
            assert "cannot read checkpoint" in _one_error(capsys)


def test_export_never_replaces_a_folder_that_is_not_its_own(tiny_run, tmp_path, capsys):
    """A cloned Hub repo (``.git``, notes, and a ``config.json`` of its own) is not an export: refused,
    untouched; a folder our export wrote is replaced as before."""
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (clone / "notes.md").write_text("mine\n")
    (clone / "config.json").write_text('{"architecture": "vit_base_patch16_224"}')
    before = _digest(clone)
    assert main(["export", str(tiny_run), "--out", str(clone)]) == 2
    assert "is not an export of mixedae-fast" in _one_error(capsys)
    assert _digest(clone) == before and (clone / ".git" / "HEAD").is_file()
    (clone / "notes.md").unlink()
    (clone / ".git" / "HEAD").unlink()
    (clone / ".git").rmdir()
    assert main(["export", str(tiny_run), "--out", str(clone)]) == 2  # only our names, but not our config.json
    capsys.readouterr()
    ours = tmp_path / "ours"
    assert main(["export", str(tiny_run), "--out", str(ours)]) == 0
    assert main(["export", str(tiny_run), "--out", str(ours)]) == 0
