"""``mixedae-fast finetune`` as a user runs it, on a tiny trained run: the bad values it refuses, the
folder it writes (checkpoints, the timm export, results), resume, evaluation only, accumulation and the
line per epoch."""
import hashlib
import json

import pytest

from mixedae_fast.cli import main

pytestmark = pytest.mark.usefixtures("cache")




def _one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--weight-decay", "nan"), ("--blr", "-inf"),
                                           ("--min-lr", "nan"), ("--mixup", "inf"), ("--warmup-epochs", "nan")])
def test_non_finite_values_are_refused_before_any_work(tiny_run, capsys, option, value):
    """Before: ``--lr inf`` / ``--weight-decay nan`` trained to chance and exited 0."""
    before = _digest(tiny_run)
    assert main(["finetune", str(tiny_run), f"{option}={value}", "--epochs", "1", "--batch-size", "8",
                 "--no-progress"]) == 2
    line = _one_error(capsys)
    name = option[2:].replace("-", "_")
    assert f"{name} = {float(value)!r} ({option}): must be" in line and "finite" in line, line
    assert "Traceback" not in capsys.readouterr().err
    assert _digest(tiny_run) == before


def _ft(tiny_run, out, *extra):
    return main(["finetune", str(tiny_run), "--epochs", "2", "--batch-size", "8", "--no-progress", "--out", str(out),
                 *extra])


def _classifier(state, tiny_run):
    from mixedae_fast.downstream.evaluate import load_encoder
    from mixedae_fast.downstream.finetune import ViTClassifier

    model, _, _ = load_encoder(tiny_run, device="cpu")
    clf = ViTClassifier(model, state["num_classes"])
    clf.load_state_dict(state["classifier"])
    return clf.eval()


def test_finetune_keeps_checkpoints_a_timm_classifier_and_its_results(tiny_run, tmp_path, capsys):
    import re

    import torch

    from mixedae_fast._compat import import_timm
    from mixedae_fast.downstream.finetune_folder import load_finetune_checkpoint

    out = tmp_path / "ft"
    assert _ft(tiny_run, out) == 0
    stdout = capsys.readouterr().out
    lines = [line for line in stdout.splitlines() if line.startswith("pretrained epoch")]
    assert len(lines) == 2 and all(re.fullmatch(r"pretrained epoch [12]/2: train loss \d+\.\d+, val top-1 [\d.]+ top-5 "
                                                r"[\d.]+, lr \S+, \d+ img/s", line) for line in lines), lines
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    report = json.loads((out / "results.json").read_text())
    r = report["results"]["pretrained"]
    assert [h["epoch"] for h in r["history"]] == [1, 2] and r["steps"] == 2 * 5 and r["settings"]["batch_size"] == 8
    assert 0 <= r["val_top5"] <= 100 and r["val_top1"] <= r["val_top5"] and report["num_classes"] == 10
    state = load_finetune_checkpoint(out / "checkpoints" / "ckpt-00000002.pt")
    assert state["epoch"] == 2 and state["history"] == r["history"]
    timm_model = import_timm().create_model(f"local-dir:{out / 'export_timm'}", pretrained=True).eval()
    assert timm_model.num_classes == 10
    assert json.loads((out / "export_timm" / "config.json").read_text())["label_names"] == report["classes"]
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(timm_model(images), _classifier(state, tiny_run)(images), rtol=1e-5, atol=1e-6)
    assert "timm export" in stdout and "logits within" in stdout


def test_resume_continues_exactly_after_an_interruption_and_from_an_older_checkpoint(tiny_run, tmp_path, capsys,
                                                                                     monkeypatch):
    """The mae recipe (RandAugment in the loader, Mixup/CutMix, erasing, drop path): an uninterrupted run,
    one stopped (Ctrl-C) while saving its third epoch and continued with --resume auto, and a resume of
    the first from its second epoch's checkpoint end with bitwise the same weights."""
    import torch

    import mixedae_fast.downstream.finetune_folder as folder

    mae = ["--epochs", "3", "--recipe", "mae", "--seed", "3"]
    assert _ft(tiny_run, tmp_path / "a", *mae) == 0
    real = folder.save_finetune_checkpoint

    def stop_at_epoch_3(out_dir, clf, opt, epoch, *a):
        if epoch == 3:
            raise KeyboardInterrupt
        return real(out_dir, clf, opt, epoch, *a)

    monkeypatch.setattr(folder, "save_finetune_checkpoint", stop_at_epoch_3)
    capsys.readouterr()
    assert _ft(tiny_run, tmp_path / "b", *mae) == 130
    assert "the same command with --resume auto continues it" in capsys.readouterr().err
    monkeypatch.setattr(folder, "save_finetune_checkpoint", real)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["ckpt-00000001.pt",
                                                                                   "ckpt-00000002.pt"]
    assert not (tmp_path / "b" / ".lock").exists()
    capsys.readouterr()
    assert _ft(tiny_run, tmp_path / "b", *mae, "--resume", "auto") == 0
    assert "resuming after epoch 2 of 3" in capsys.readouterr().out
    old_a3 = (tmp_path / "a" / "checkpoints" / "ckpt-00000003.pt").read_bytes()
    assert _ft(tiny_run, tmp_path / "a", *mae, "--resume",
               str(tmp_path / "a" / "checkpoints" / "ckpt-00000002.pt")) == 0
    aside = tmp_path / "a" / "checkpoints" / "abandoned-00000002"
    assert (aside / "ckpt-00000003.pt").read_bytes() == old_a3                  # the abandoned branch kept
    assert (aside / "export_timm" / "model.safetensors").is_file() and (aside / "results.json").is_file()
    final = [folder.load_finetune_checkpoint(p) for p in (aside / "ckpt-00000003.pt",
                                                          tmp_path / "a" / "checkpoints" / "ckpt-00000003.pt",
                                                          tmp_path / "b" / "checkpoints" / "ckpt-00000003.pt")]
    for name, value in final[0]["classifier"].items():
        assert all(torch.equal(f["classifier"][name], value) for f in final[1:]), name
    histories = [[{k: v for k, v in h.items() if k not in ("img_per_s", "seconds")} for h in f["history"]]
                 for f in final]
    assert histories[0] == histories[1] == histories[2] and len(histories[0]) == 3
    assert (tmp_path / "b" / "export_timm" / "model.safetensors").is_file()


def test_eval_only_scores_the_fine_tuned_classifier_and_writes_nothing(tiny_run, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", str(tiny_run), "--eval-only", "--out", str(out)]) == 2
    assert "no fine-tune checkpoint in" in _one_error(capsys)
    assert not out.exists()
    assert _ft(tiny_run, out) == 0
    last = json.loads((out / "results.json").read_text())["results"]["pretrained"]["history"][-1]
    before = _digest(out)
    capsys.readouterr()
    assert main(["finetune", str(tiny_run), "--eval-only", "--out", str(out)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "(eval only)" in x]
    assert len(line) == 1 and "ckpt-00000002.pt, after epoch 2" in line[0], line
    assert f"val top-1 {last['val_top1']:.1f} top-5 {last['val_top5']:.1f}, loss {last['val_loss']:.4f}" in line[0]
    assert main(["finetune", str(tiny_run), "--eval-only", "--out", str(out),
                 "--resume", str(out / "checkpoints" / "ckpt-00000001.pt")]) == 0
    assert "after epoch 1" in capsys.readouterr().out
    assert _digest(out) == before


def test_a_folder_in_use_or_holding_something_else_is_refused_and_left_as_it_was(tiny_run, tmp_path, capsys):
    import os

    done = tmp_path / "done"
    assert _ft(tiny_run, done) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "busy").mkdir()
    cases = [
        ([], done, "already holds a fine-tune (checkpoints, export_timm, results.json); continue it with --resume"),
        (["--resume", "auto"], tmp_path / "mine", "holds other files (notes.txt)"),
        ([], tmp_path / "a_file", "is a file; --out takes a folder"),
        (["--resume", "auto", "--epochs", "3"], done, "cannot be continued by this fine-tune: --epochs 2 -> 3"),
        (["--resume", "auto", "--accum-steps", "2", "--batch-size", "4"], done, "--batch-size 8 -> 4"),
        (["--resume", str(tiny_run / "checkpoints" / "ckpt-00000005.pt")], done, "is not a fine-tune checkpoint"),
        (["--resume", str(tmp_path / "nowhere.pt")], done, f"--resume {tmp_path / 'nowhere.pt'}: no such file"),
        (["--resume", str(done / "checkpoints" / "ckpt-00000002.pt"), "--baseline"], done, "use --resume auto"),
        (["--accum-steps", "0"], tmp_path / "new", "accum_steps = 0 (--accum-steps): must be >= 1"),
        (["--resume", str(tmp_path / "torn.pt")], done, "cannot read fine-tune checkpoint"),
    ]
    (tmp_path / "torn.pt").write_bytes((done / "checkpoints" / "ckpt-00000002.pt").read_bytes()[:5000])
    (tmp_path / "busy" / ".lock").write_text(f"pid={os.getpid()} host={os.uname().nodename} slurm_job= since=now\n")
    cases.append(([], tmp_path / "busy", "is in use by process"))
    capsys.readouterr()
    for extra, out, fragment in cases:
        before = _digest(tmp_path)
        assert _ft(tiny_run, out, *extra) == 2, (extra, out)
        line = _one_error(capsys)
        assert fragment in line, (extra, line)
        assert _digest(tmp_path) == before and not (tmp_path / "new").exists(), extra
