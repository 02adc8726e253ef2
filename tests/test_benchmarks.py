"""Smoke tests of the benchmark harnesses at tiny sizes on CPU: they run, and their result files carry
what a reader needs (device, versions, SHA, command, and rows whose figures are consistent)."""
import json
import statistics

import pytest
import torch

from mixedae_fast.benchmarks import bench_kernels, bench_step


def test_bench_kernels_result_file(tmp_path):
    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--config", "cpu_tiny", "--batch", "8", "--warmup", "0", "--iters", "1",
                               "--triton", "--no-compile", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "git_sha", "date", "command"):
        assert result[key], key
    (batch,) = result["batches"]
    assert batch["shapes"]["batch"] == 8 and batch["shapes"]["N"] == 64
    rows = batch["rows"]
    ops = ("assignment", "patch_mix", "unmix_fwd", "unmix_fwd_bwd")
    assert set(rows) == {"copy/reference", *(f"{op}/{v}" for op in ops for v in ("triton", "reference"))}
    for row in rows.values():
        assert row["ms"] > 0 and row["bytes"] > 0
        assert row["gb_per_s"] == pytest.approx(row["bytes"] / row["ms"] / 1e6)
    assert rows["copy/reference"]["of_copy"] == 1.0
    # patch_mix must at least read the images (8*3*32*32 fp32) and write the fp32 targets (same size)
    assert rows["patch_mix/triton"]["bytes"] > 2 * 8 * 3 * 32 * 32 * 4


def test_bench_kernels_rejects_batches_not_a_multiple_of_r():
    with pytest.raises(SystemExit):
        bench_kernels.main(["--config", "cpu_tiny", "--batch", "6"])


def test_bench_step_result_file(tmp_path):
    out = tmp_path / "step.json"
    assert bench_step.main(["--config", "cpu_tiny", "--batch", "8", "--modes", "mae,topk", "--warmup", "0",
                            "--iters", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["git_sha"] and result["device"] and set(result["rows"]) == {"mae", "topk"}
    for row in result["rows"].values():
        assert row["img_per_s"] == pytest.approx(8 / row["ms_per_step"] * 1e3)


def _bench_train(tmp_path, *extra):
    from mixedae_fast.benchmarks import bench_train

    out = tmp_path / "out"
    assert bench_train.main(["--config", "cpu_tiny", "--batch", "8", "--warmup", "1", "--windows", "2",
                             "--steps", "1", "--breakdown-steps", "1", "--out", str(out), *extra]) == 0
    return json.loads((out / "bench_train.json").read_text()), out


def test_bench_train_rows_fields_and_files(tmp_path):
    result, out = _bench_train(tmp_path, "--modes", "official,mixedae", "--source", "synthetic,files",
                               "--num-images", "64", "--profile", str(tmp_path / "prof"))
    for key in ("device", "torch", "triton", "git_sha", "date", "command", "matmul_tflops"):
        assert result[key], key
    assert set(result["rows"]) == {f"{m}/eager/{s}" for m in ("official", "mixedae") for s in ("synthetic", "files")}
    for label, row in result["rows"].items():
        assert row["img_per_s"] == pytest.approx(8 / row["ms_per_step"] * 1e3)
        assert row["ms_per_step"] == pytest.approx(statistics.median(row["window_ms"]))
        assert row["flops_per_step"] > 0 and row["mfu"] > 0
        assert set(row["breakdown_ms"]) == {"data", "assign", "mix", "encoder", "decoder", "losses", "backward",
                                            "optimizer"}
        assert 0 <= row["data_wait_fraction"] < 1
        assert row["loader"] == ("device tensors" if row["source"] == "synthetic" else "torch")
        trace = json.loads(open(row["profile"]).read())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"encoder", "backward", "optimizer"} <= names, label
        assert (row["vs_official"] is None) == (row["mode"] == "official")
    # MixedAE's encoder is shared by r = 4 sources and adds TopK / HC logits: FLOPs per step differ from MAE's
    assert result["rows"]["mixedae/eager/synthetic"]["flops_per_step"] != \
        result["rows"]["official/eager/synthetic"]["flops_per_step"]
    header = (out / "bench_train.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["row", "mode", "variant"] and "encoder_ms" in header
    assert (out / "bench_train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_train_compiled_row(tmp_path):
    result, _ = _bench_train(tmp_path, "--modes", "mixedae", "--source", "synthetic", "--compile", "both")
    eager, compiled = result["rows"]["mixedae/eager/synthetic"], result["rows"]["mixedae/compiled/synthetic"]
    assert "breakdown_ms" in eager and "breakdown_ms" not in compiled   # instrumented steps are eager only
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-3)   # same model, seed and steps


def test_phased_step_is_the_model_step():
    """The breakdown's spelled-out step computes the same loss and update as ``StepRunner.step``."""
    from mixedae_fast.benchmarks.bench_train import Clock, StepRunner
    from mixedae_fast.config import load_config

    cfg = load_config("cpu_tiny", ["--data.batch_size=8"])
    images = torch.randn(8, 3, 32, 32)
    a, b = (StepRunner(cfg, torch.device("cpu"), official=False, compile_mode=None) for _ in range(2))
    loss_a = a.step(images, step=3)
    loss_b, phases = b.phased_step(lambda: images, step=3, clock=Clock(torch.device("cpu")))
    assert torch.equal(loss_a, loss_b) and all(v >= 0 for v in phases.values())
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_bench_cli_and_errors(capsys):
    from mixedae_fast.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--modes", "fast"])
    assert "unknown or no mode(s) ['fast']" in capsys.readouterr().err
