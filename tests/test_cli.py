"""The command line: the main job end to end at a tiny size, its outputs, resume, and bad input."""
import json
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES
from PIL import Image

from mixedae_fast.cli import main

TINY = [*TINY_OVERRIDES, "--optim.epochs=2", "--optim.warmup_epochs=1", "--run.log_every=2",
        "--run.ckpt_every=3"]


pytestmark = pytest.mark.usefixtures("cache")


def _pretrain(tmp_path, *extra):
    return main(["pretrain", "--no-progress", "--num-train", "40", "--num-val", "20", *TINY,
                 f"--run.out_dir={tmp_path}/runs", *extra])


def test_main_job_writes_report_pictures_and_config(tmp_path, cache, capsys):
    assert _pretrain(tmp_path) == 0
    run = tmp_path / "runs" / "cpu_tiny"
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 10  # 40 images / batch 8 = 5 steps an epoch, 2 epochs
    assert set(report["eval"]) == {"pretrained", "random_init"}
    assert set(report["eval"]["pretrained"]) == {"knn", "linear_probe"}
    for name in ("loss_curve.png", "reconstruction.png", "homologous.png"):
        with Image.open(run / name) as im:
            assert im.format == "PNG"
    assert (run / "config.yaml").read_text().startswith("model:")
    out = capsys.readouterr().out
    assert "knn acc %" in out and "report:" in out
    # the embedded data was written once as JPEGs and is reused
    roots = list(cache.glob("synthetic-*"))
    assert len(roots) == 1 and (roots[0] / "train").is_dir() and (roots[0] / "DONE.json").exists()


def test_resume_auto_finishes_an_interrupted_run(tmp_path):
    assert _pretrain(tmp_path, "--max-steps", "3", "--run.eval=false") == 0
    run = tmp_path / "runs" / "cpu_tiny"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000003.pt"]
    assert _pretrain(tmp_path, "--run.resume=auto", "--run.eval=false") == 0
    assert json.loads((run / "report.json").read_text())["steps"] == 10


def test_batch_size_not_a_multiple_of_group_size(tmp_path, capsys):
    assert _pretrain(tmp_path, "--data.batch_size=10") == 2
    assert "data.batch_size" in capsys.readouterr().err


def test_unwritable_output_dir_names_the_fix(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["pretrain", "--no-progress", *TINY, f"--run.out_dir={blocker}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write to the run directory" in errors[0] and "--run.out_dir" in errors[0]


def test_missing_data_path(tmp_path, capsys):
    assert _pretrain(tmp_path, f"--data.path={tmp_path}/nowhere") == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "make-data" in err


def test_unknown_override_and_malformed_argument(tmp_path, capsys):
    assert _pretrain(tmp_path, "--mixing.hca=1") == 2
    assert "did you mean" in capsys.readouterr().err
    assert main(["pretrain", "stray"]) == 2
    assert "--section.key=value" in capsys.readouterr().err


def test_make_data_is_cached(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["make-data", "--out", str(out), "--num-train", "20", "--num-val", "10", "--size", "16"]) == 0
    stamp = (out / "DONE.json").stat().st_mtime_ns
    assert main(["make-data", "--out", str(out), "--num-train", "20", "--num-val", "10", "--size", "16"]) == 0
    assert (out / "DONE.json").stat().st_mtime_ns == stamp
    assert main(["make-data", "--out", str(out), "--num-train", "30", "--num-val", "10", "--size", "16"]) == 2
    assert "delete" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("backend", ["dali", "torch", "synthetic"])
def test_main_job_runs_on_every_backend(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (the [dali] extra)")
    assert _pretrain(tmp_path, f"--data.backend={backend}", "--optim.epochs=1", "--run.eval=true") == 0
    report = json.loads((tmp_path / "runs" / "cpu_tiny" / "report.json").read_text())
    ev = report["eval"]
    assert report["steps"] == 5 and set(ev) == {"pretrained", "random_init"}
    for row in ev.values():
        assert set(row) == {"knn", "linear_probe"} and all(0 <= v <= 100 for v in row.values())


def test_corrupt_images_are_skipped_and_listed(tmp_path, capsys):
    from mixedae_fast.pipelines.synthetic import write_image_folder

    root = write_image_folder(tmp_path / "d", 40, 20, size=16, progress=False)
    cls = sorted((root / "train").iterdir())[0]
    (cls / "zero.jpg").write_bytes(b"")
    (cls / "text.jpg").write_text("not an image")
    with pytest.warns(UserWarning, match="2 .*(unreadable|corrupt|skipped|bad)"):
        code = _pretrain(tmp_path, f"--data.path={root}/train", f"--data.val_path={root}/val", "--optim.epochs=1")
    assert code == 0
    listed = json.loads((tmp_path / "runs" / "cpu_tiny" / "skipped_images.json").read_text())
    assert sorted(Path(e["file"]).name for e in listed) == ["text.jpg", "zero.jpg"]
    assert "2 unreadable images skipped" in capsys.readouterr().out


def test_make_data_offline_digits(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (the [dev] extra)")
    assert main(["make-data", "--dataset", "digits", "--out", str(tmp_path / "dg"), "--size", "16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "dg")
    assert len(list((tmp_path / "dg" / "val").iterdir())) == 10
