"""``mixedae-fast study``: the variant registry, the evaluation splits kept apart, the few-shot and
mean ± std arithmetic, a tiny study end to end, its resume, and bad input."""
import json
import sys

import pytest
import torch
from conftest import TINY_OVERRIDES

from mixedae_fast import study
from mixedae_fast.cli import main
from mixedae_fast.config import load_config

TINY = [*TINY_OVERRIDES, "--model.depth=1", "--optim.warmup_epochs=0", "--run.log_every=2"]


@pytest.mark.parametrize("name", list(study.VARIANTS))
def test_every_variant_is_a_valid_config(name):
    cfg = load_config("cpu_tiny", list(study.variant_overrides(name)))
    assert cfg.mixing.group_size >= 1


@pytest.mark.parametrize("argv, message", [
    (["--variants", "mae,nope"], "error: unknown variant 'nope'; valid variants: mae, oracle, naive"),
    (["--select-split", "val"], "error: --select-split and --report-split are both 'val'"),
    (["--seeds", "0,x"], "error: --seeds '0,x': not a comma-separated list of ints"),
    (["--seeds", "1,1"], "error: --seeds '1,1': give at least one, without repeats"),
])
def test_bad_input_is_one_error_line(argv, message, capsys):
    assert main(["study", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_select_and_report_splits_are_disjoint_and_fixed():
    bank, held = study.split_indices(500, 0.2)
    assert len(held) == 100 and len(bank) == 400
    assert not set(bank.tolist()) & set(held.tolist())
    again = study.split_indices(500, 0.2)
    assert torch.equal(bank, again[0]) and torch.equal(held, again[1])


def test_mean_and_sample_std():
    m, s = study.mean_std([1.0, 2.0, 4.0, None])
    assert m == pytest.approx(7 / 3) and s == pytest.approx((7 / 3) ** 0.5)  # squares 42/9 over n - 1 = 2
    assert study.mean_std([3.0]) == (3.0, None) and study.mean_std([None]) == (None, None)


def test_few_shot_nearest_class_mean():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(10)
    x = torch.eye(4)[y] * 5 + torch.randn(40, 4, generator=g) * 0.1
    assert study.few_shot_accuracy(x, y, x, y, shots=2) == 100.0
    assert study.few_shot_accuracy(x, y, x, (y + 1) % 4, shots=2) == 0.0


def test_tiny_study_end_to_end_then_resumed(tmp_path, cache, image_folder, monkeypatch, capsys):
    data = image_folder(48, 24)
    argv = ["study", "--data-dir", str(data), "--out", str(tmp_path / "st"), "--variants", "mae,supcon_head0",
            "--seeds", "0", "--epochs", "1", "--probe-epochs", "2", "--no-progress", "--jobs", "1", *TINY]
    assert main(argv) == 0
    out = tmp_path / "st"
    table = json.loads((out / "study.json").read_text())
    assert (table["select_split"], table["report_split"]) == ("heldout", "val")
    assert [r["variant"] for r in table["rows"]] == ["mae", "supcon_head0"]
    assert table["meta"]["steps"] == 6 and table["meta"]["sizes"] == {"bank": 39, "heldout": 9, "val": 24}
    supcon = json.loads((out / "results" / "supcon_head0-seed0.json").read_text())
    assert supcon["steps"] == 6 and set(supcon["eval"]) == {"heldout", "val", "sizes"}
    assert 0 <= supcon["final"]["jaccard_b0"] <= 1
    assert "jaccard_b0" in (out / "runs" / "supcon_head0-seed0" / "metrics.csv").read_text().splitlines()[0]
    md = (out / "study.md").read_text()
    assert "Select split: heldout (9 images); report split: val (24 images)" in md
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun skips finished runs and only rewrites the table
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(study, "run_one", no_training)
    assert main(argv) == 0
    assert json.loads((out / "study.json").read_text())["rows"] == table["rows"]
    assert (out / "runs" / "supcon_head0-seed0" / "report.json").is_file()  # a run folder as `pretrain` writes it
    # another budget in the same folder is refused, not mixed into the table
    assert main([a if a != "1" else "2" for a in argv]) == 2
    assert "was trained for --epochs 1, this call asks for 2" in capsys.readouterr().err


def test_a_run_that_failed_before_its_first_checkpoint_continues_with_the_same_command(tmp_path, cache, image_folder):
    """What a run leaves when it fails before its first checkpoint (its config and metrics rows, no
    checkpoints/): the same study command trains it from step 0 in its folder instead of refusing it."""
    data = image_folder(48, 24)
    out = tmp_path / "st"
    left = out / "runs" / "mae-seed0"
    left.mkdir(parents=True)
    (left / "config.yaml").write_text("run:\n  name: mae-seed0\n")
    (left / "metrics.csv").write_text("step,loss\n1,99.5\n")
    assert main(["study", "--data-dir", str(data), "--out", str(out), "--variants", "mae", "--seeds", "0",
                 "--epochs", "1", "--probe-epochs", "2", "--no-progress", "--jobs", "1", *TINY]) == 0
    assert json.loads((out / "results" / "mae-seed0.json").read_text())["steps"] == 6
    assert "99.5" not in (left / "metrics.csv").read_text()   # the failed attempt's rows are not mixed in


def test_jobs_runs_children_side_by_side_and_stamps_the_study_command(tmp_path, cache, image_folder, monkeypatch):
    """--jobs 2: each run is a child process (one thread each on 2 cores), its log kept; the results carry
    the study's command (as main() received it, not the process's argv), not the child's; the parent writes
    the table."""
    import shlex

    monkeypatch.setattr(sys, "argv", ["/x/pytest", "-q"])  # not the study's command
    data = image_folder(48, 24)
    out = tmp_path / "st"
    argv = ["study", "--data-dir", str(data), "--out", str(out), "--variants", "mae,naive", "--seeds", "0",
            "--epochs", "1", "--probe-epochs", "2", "--no-progress", "--jobs", "2", *TINY]
    assert main(argv) == 0
    command = shlex.join(["mixedae-fast", *argv])
    for name in ("mae-seed0", "naive-seed0"):
        result = json.loads((out / "results" / f"{name}.json").read_text())
        assert result["steps"] == 6 and result["command"] == command
        assert result["omp_num_threads"] == str(max(1, study.usable_cores() // 2))
        assert (out / "logs" / f"{name}.log").read_text().strip()
    table = json.loads((out / "study.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["mae", "naive"]
    assert table["meta"]["command"] == command


def test_a_failed_child_is_named_with_its_error_line_and_log(tmp_path):
    from tqdm import tqdm

    from mixedae_fast.errors import RunFailure

    def argv_of(v, s):
        code = ("print('step 1'); print('error: the disk is full'); raise SystemExit(3)" if v == "bad"
                else "import time; time.sleep(2)")  # finishes after the failure is seen
        return [sys.executable, "-c", code]

    bar = tqdm(total=3, disable=True)
    with pytest.raises(RunFailure, match=r"study run bad-seed0 failed \(exit 3\): the disk is full; its log: .*"
                                         r"bad-seed0.log; finished runs are kept"):
        study.run_children([("ok", 0), ("bad", 0), ("ok", 1)], 2, 1, argv_of, tmp_path / "logs", bar)
    assert (tmp_path / "logs" / "ok-seed0.log").is_file()
    assert not (tmp_path / "logs" / "ok-seed1.log").exists()   # nothing new is started after a failure


def test_sigterm_reaches_the_children_and_a_rerun_keeps_their_logs(tmp_path):
    """SIGTERM to the study passes to each child (which saves and exits, as a run does) and is waited
    for; the logs of earlier attempts are appended to, not truncated."""
    import os
    import signal
    import threading

    from tqdm import tqdm

    from mixedae_fast.train.engine import StopRequested

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a-seed0.log").write_text("what an earlier attempt wrote\n")

    def argv_of(v, s):
        code = ("import signal, sys, time\n"
                f"signal.signal(signal.SIGTERM, lambda *a: (open({str(tmp_path / v)!r}, 'w').write('saved'), "
                "sys.exit(0)))\nprint('training', flush=True)\ntime.sleep(30)")
        return [sys.executable, "-c", code]

    def outer(signum, frame):  # what the test process does with a SIGTERM run_children leaves to it
        raise StopRequested("SIGTERM")

    before = signal.signal(signal.SIGTERM, outer)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(StopRequested):
            study.run_children([("a", 0), ("b", 0)], 2, 1, argv_of, tmp_path / "logs", tqdm(disable=True))
        assert signal.getsignal(signal.SIGTERM) is outer   # its own handler put back
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, before)
    assert [(tmp_path / v).is_file() and (tmp_path / v).read_text() for v in "ab"] == ["saved", "saved"]
    assert (tmp_path / "logs" / "a-seed0.log").read_text().startswith("what an earlier attempt wrote\n")


@pytest.mark.parametrize("jobs, device, todo, want", [
    ("auto", "cpu", 30, min(study.usable_cores(), 8)), ("auto", "cpu", 1, 1), ("3", "cpu", 2, 2), ("1", "cpu", 9, 1)])
def test_resolve_jobs(jobs, device, todo, want):
    n, threads = study.resolve_jobs(jobs, device, todo)
    assert n == want and threads == max(1, study.usable_cores() // n)


def test_jobs_must_be_a_count(capsys):
    assert main(["study", "--jobs", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --jobs '0': give a number of processes >= 1, or auto")


def test_curve_and_transfer_follow_ups_and_their_resume(tmp_path, cache, image_folder, monkeypatch):
    """--curve evaluates every kept checkpoint (its last point is the table's own kNN of that run);
    --transfer evaluates the final encoders on another set, and fine-tunes them there; a rerun reuses both."""
    from mixedae_fast import study_eval

    data = image_folder(48, 24)
    out = tmp_path / "st"
    argv = ["study", "--data-dir", str(data), "--out", str(out), "--variants", "mae,default", "--seeds", "0",
            "--epochs", "1", "--probe-epochs", "2", "--no-progress", "--jobs", "1", "--curve", "--context",
            "--transfer", "digits",
            "--transfer-finetune-epochs", "1", *TINY, "--run.ckpt_every=3", "--run.keep_last=5"]
    assert main(argv) == 0
    curve = json.loads((out / "curve.json").read_text())["rows"]
    assert [(r["variant"], r["step"]) for r in curve] == [("mae", 3), ("mae", 6), ("default", 3), ("default", 6)]
    table = {r["variant"]: r for r in json.loads((out / "study.json").read_text())["rows"]}
    for r in curve:
        if r["step"] == 6:  # the final checkpoint, evaluated as the table evaluates it
            assert r["val_knn"][0] == pytest.approx(table[r["variant"]]["val/knn"][0])
            assert r["heldout_knn"][0] == pytest.approx(table[r["variant"]]["heldout/knn"][0])
    default6 = curve[3]
    assert 0 <= default6["recognition"][0] <= 1 and curve[1]["recognition"][0] is None  # MAE mode has no TopK
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG" and "| default | 6 |" in (out / "curve.md").read_text()
    context = {r["variant"]: r for r in json.loads((out / "context.json").read_text())["rows"]}
    assert context["mae"]["mixed/val_knn"][0] == pytest.approx(context["mae"]["alone/val_knn"][0])  # r = 1
    assert context["default"]["full/val_knn"][0] == pytest.approx(table["default"]["val/knn"][0])
    transfer = json.loads((out / "transfer.json").read_text())
    assert transfer["meta"]["targets"] == ["digits"]
    for r in transfer["rows"]:
        assert all(0 <= r[f"digits/{m}"][0] <= 100 for m in ("knn", "linear_probe", "few_shot", "finetune_top1"))
    assert (out / "results" / "transfer" / "finetune" / "mae-seed0-digits" / "results.json").is_file()

    def no_work(*a, **k):
        raise AssertionError("a finished evaluation was done again")
    monkeypatch.setattr(study_eval, "evaluate_run", no_work)
    monkeypatch.setattr(study, "evaluate_run", no_work)
    monkeypatch.setattr(study_eval, "finetune_top1", no_work)
    monkeypatch.setattr(study_eval, "_load", no_work)
    assert main(argv) == 0
    assert json.loads((out / "curve.json").read_text())["rows"] == curve


@pytest.mark.parametrize("argv, message", [
    (["--transfer", "mnist"], "error: --transfer mnist: 'mnist' is not a data set"),
    (["--transfer-finetune-epochs", "2"], "error: --transfer-finetune-epochs 2: give >= 1 together with --transfer"),
])
def test_follow_up_options_refuse_bad_input(argv, message, capsys):
    assert main(["study", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_context_features_alone_is_mixed_at_r1_and_differs_when_mixed(tiny):
    """The three contexts of study --context: at r = 1 (MAE mode) a group holds one image, so its tokens
    "mixed" are exactly its visible patches "alone"; at r = 2 with global attention (naive mixing) the other
    source's tokens change them; "full" sees every patch, so it differs from both."""
    from mixedae_fast.study_eval import context_features

    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mae = tiny.build(group_size=1, ha="none")
    f = context_features(mae, images, batch_groups=3)
    assert set(f) == {"full", "alone", "mixed"} and all(v.shape == (8, 32) for v in f.values())
    torch.testing.assert_close(f["mixed"], f["alone"], rtol=1e-5, atol=1e-5)  # fp32: the same sums, other order
    assert (f["full"] - f["alone"]).abs().max() > 1e-3
    naive = tiny.build(group_size=2, ha="none")
    g = context_features(naive, images, batch_groups=3)
    assert (g["mixed"] - g["alone"]).abs().max() > 1e-3


def test_the_curve_plot_gives_a_variant_one_colour_in_every_panel(tmp_path, monkeypatch):
    """MAE mode has no recognition or attention mass: the panels for those must not shift the colours, so
    the TopK variant drawn there is the colour the kNN panel and its legend give it."""
    from mixedae_fast import study_eval
    from mixedae_fast.downstream import visualize

    figs = []
    monkeypatch.setattr(visualize, "_save", lambda fig, path: figs.append(fig) or path)

    def row(variant, step, logged):
        value = (0.4, 0.01) if logged else (None, None)
        return {"variant": variant, "step": step, "heldout_knn": (50.0 + step, 1.0), "recognition": value,
                "w_other": value}

    rows = [row("mae", s, False) for s in (1, 2)] + [row("default", s, True) for s in (1, 2)]
    study_eval.plot_curve(rows, tmp_path / "c.png", {"dataset": "x", "seeds": [0]})
    knn, rec, other = figs[0].axes
    colour = {c.get_label(): c.lines[0].get_color() for c in knn.containers}
    assert set(colour) == {"mae", "default"} and colour["mae"] != colour["default"]
    for ax in (rec, other):
        assert {c.get_label(): c.lines[0].get_color() for c in ax.containers} == {"default": colour["default"]}
