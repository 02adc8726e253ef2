"""run.loggers: every metrics row and picture reaches each sink (TensorBoard events read back,
wandb offline files), a resumed run keeps its wandb id, a missing package is named with its extra."""
import sys

import numpy as np
import pytest

from mixedae_fast.train.loggers import Loggers, MissingLogger


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_every_row_and_picture(tmp_path):
    log = Loggers(["csv", "tensorboard"], tmp_path)
    log.scalars({"step": 10, "loss": 0.5, "lr": 1e-3, "note": "x"}, 10)
    log.scalars({"step": 20, "loss": 0.25, "lr": 2e-3}, 20)
    log.image("reconstruction", np.full((8, 12, 3), 7, np.uint8), 20)
    log.close()
    acc, scalars = _scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(10, 0.5), (20, 0.25)]
    assert [s for s, _ in scalars["train/lr"]] == [10, 20] and "train/note" not in scalars
    assert [e.step for e in acc.Images("pictures/reconstruction")] == [20]
    assert not (tmp_path / "pictures").exists()                 # a picture sink exists: no PNG files


def test_without_a_picture_sink_pictures_are_png_files(tmp_path):
    log = Loggers(["csv"], tmp_path)
    log.image("homologous", np.zeros((4, 4, 3), np.uint8), 300)
    assert (tmp_path / "pictures" / "homologous-00000300.png").is_file()


def test_wandb_offline_logs_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = Loggers(["wandb"], tmp_path, config={"model": {"depth": 2}}, run_name="t")
    run_id = log._wandb.id
    assert log._wandb.config["model"] == {"depth": 2}
    log.scalars({"step": 1, "loss": 0.75}, 1)
    log.image("reconstruction", np.zeros((4, 4, 3), np.uint8), 1)
    log.close()
    offline = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and list(offline[0].glob("*.wandb"))            # the run's records, to `wandb sync` later
    again = Loggers(["wandb"], tmp_path, run_name="t")
    assert again._wandb.id == run_id
    again.close()


def test_unknown_and_missing_sinks_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\['mlflow'\] not among csv, tensorboard, wandb"):
        Loggers(["csv", "mlflow"], tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)               # as if not installed
    with pytest.raises(MissingLogger, match=r"pip install 'mixedae_fast\[log\]'"):
        Loggers(["wandb"], tmp_path)


def test_a_training_run_logs_to_tensorboard_and_traces_its_profile_window(tiny, tmp_path):
    import torch

    from mixedae_fast.downstream.visualize import training_pictures
    from mixedae_fast.pipelines.torch_loader import TensorBatchLoader
    from mixedae_fast.train.engine import Trainer

    cfg = tiny.config("--data.batch_size=8", "--optim.epochs=1", "--run.log_every=2", "--run.vis_every=4",
                      "--run.loggers=[csv,tensorboard]", "--run.profile_steps=2:3")
    rng = np.random.default_rng(0)
    loader = TensorBatchLoader(rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8), np.zeros(32), 8, 16)
    from mixedae_fast.model.mixedae import build_model
    trainer = Trainer(cfg, build_model(cfg), loader, tmp_path / "run", torch.device("cpu"), progress=False,
                   pictures=training_pictures)
    trainer.fit()
    acc, scalars = _scalars(tmp_path / "run" / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [2, 4]
    assert {t.split("/")[1] for t in acc.Tags()["images"]} == {"reconstruction", "homologous"}
    assert not (tmp_path / "run" / "pictures").exists()
    trace = tmp_path / "run" / "profile" / "steps-2-3.rank0.pt.trace.json"
    assert trace.is_file() and '"forward"' in trace.read_text() and '"backward"' in trace.read_text()


def test_a_missing_logger_is_refused_before_the_run_folder_exists(tiny, tmp_path, monkeypatch, capsys):
    from mixedae_fast.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)                # as if not installed
    argv = ["pretrain", "--no-progress", "--num-train", "16", "--num-val", "8", *tiny.overrides,
            "--run.loggers=[csv,wandb]", f"--run.out_dir={tmp_path}", "--run.name=r"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: run.loggers has wandb") and "mixedae_fast[log]" in err[0]
    assert not (tmp_path / "r").exists()


def test_wandb_mode_follows_wandbs_own_login_state(tmp_path):
    from mixedae_fast.train.loggers import wandb_mode

    netrc_file = tmp_path / "netrc"
    home = {"HOME": str(tmp_path), "NETRC": str(netrc_file)}
    assert wandb_mode(home) == "offline"                                   # never logged in
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc_file.chmod(0o600)
    assert wandb_mode(home) == "online"                                    # what `wandb login` writes
    assert wandb_mode({**home, "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"  # another host
    assert wandb_mode({**home, "WANDB_MODE": "disabled"}) == "disabled"   # the user's choice wins
    assert wandb_mode({"NETRC": str(tmp_path / "none"), "WANDB_API_KEY": "k"}) == "online"


def test_wandb_project_and_entity_come_from_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = Loggers(["wandb"], tmp_path, run_name="t", project="my-proj", entity="my-team")
    assert (log._wandb.project, log._wandb.entity) == ("my-proj", "my-team")
    log.close()


def test_the_final_evaluation_reaches_tensorboard_and_wandb(tiny, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from mixedae_fast.pretrain import log_final_eval

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny.config("--run.loggers=[csv,tensorboard,wandb]")
    evaluation = {"pretrained": {"knn": 71.4, "linear_probe": 90.0}, "random_init": {"knn": 47.9}}
    seen = {}
    monkeypatch.setattr("wandb.sdk.wandb_run.Run.log", lambda self, values, step=None: seen.update(values))
    log_final_eval(cfg, tmp_path, evaluation, step=12)
    _, scalars = _scalars(tmp_path / "tb")
    assert scalars["eval/pretrained/knn"] == [(12, pytest.approx(71.4))]
    assert set(scalars) == {"eval/pretrained/knn", "eval/pretrained/linear_probe", "eval/random_init/knn"}
    assert seen == pytest.approx({"eval/pretrained/knn": 71.4, "eval/pretrained/linear_probe": 90.0,
                                  "eval/random_init/knn": 47.9})


def test_a_pretraining_run_logs_its_final_evaluation_to_tensorboard(tiny, tmp_path):
    import json

    from mixedae_fast.cli import main

    argv = ["pretrain", "--no-progress", "--num-train", "16", "--num-val", "8", *tiny.overrides, "--optim.epochs=1",
            "--run.loggers=[csv,tensorboard]", f"--run.out_dir={tmp_path}", "--run.name=r"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    _, scalars = _scalars(tmp_path / "r" / "tb")
    knn = report["eval"]["pretrained"]["knn"]
    assert scalars["eval/pretrained/knn"] == [(report["steps"], pytest.approx(knn))]


def test_the_knn_monitor_runs_every_n_epochs_to_the_console_and_tensorboard(tiny, tmp_path, capsys):
    from mixedae_fast.cli import main

    argv = ["pretrain", "--no-progress", "--num-train", "16", "--num-val", "8", *tiny.overrides, "--optim.epochs=2",
            "--data.batch_size=8", "--run.monitor_every=1", "--run.eval=false", "--run.loggers=[csv,tensorboard]",
            f"--run.out_dir={tmp_path}", "--run.name=r"]
    assert main(argv) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("monitor:")]
    assert [line.split(" knn ")[0] for line in said] == ["monitor: epoch 1 step 2", "monitor: epoch 2 step 4"]
    _, scalars = _scalars(tmp_path / "r" / "tb")
    assert [step for step, _ in scalars["monitor/knn"]] == [2, 4]
    assert all(0 <= value <= 100 for _, value in scalars["monitor/knn"])


def test_the_knn_monitor_is_off_by_default():
    from mixedae_fast.config import load_config

    assert load_config("cpu_tiny").run.monitor_every == 0 and load_config("vit_base").run.monitor_every == 0
