"""Smoke tests of the benchmark harnesses at tiny sizes on CPU: they run, and their result files carry
what a reader needs (device, versions, SHA, command, and rows whose figures are consistent)."""
import json

import pytest

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
