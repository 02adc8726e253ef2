"""benchmarks/bench_attention.py at a tiny shape on CPU: every row present (timed, or skipped with the
reason), the baseline row in the same run, and the result files' fields (JSON and CSV)."""
import csv
import json

import torch

from mixedae_fast.benchmarks import bench_attention


def test_bench_attention_smoke(tmp_path):
    out = tmp_path / "bench_attention.json"
    assert bench_attention.main(["--shapes", "tiny", "--warmup", "1", "--iters", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("benchmark", "device", "torch", "triton", "xformers", "git_sha", "date", "dtype", "command"):
        assert key in result, key
    assert result["benchmark"] == "attention" and result["torch"] == torch.__version__
    rows = {(r["mode"], r["backend"]): r for r in result["rows"]}
    assert set(rows) == {("none", "baseline"), *bench_attention.ROWS}
    base = rows[("none", "baseline")]
    assert base["vs_baseline"] == 1.0 and base["fwd_bwd_ms"] > 0
    for (_, backend), row in rows.items():
        assert (row["L"], row["d"]) == (17, 16)
        if backend == "xformers" and not torch.cuda.is_available():
            assert row["skipped"] == "xformers has no CPU operators"
        elif backend == "flex" and not torch.cuda.is_available():
            assert row["fwd_ms"] > 0 and "no CPU backward" in row["skipped_bwd"]
        else:
            assert "error" not in row, row
            assert min(row["fwd_ms"], row["bwd_ms"], row["fwd_bwd_ms"], row["vs_baseline"]) > 0, row
    assert rows[("topk", "triton")]["K"] == 4
    with open(out.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert {"device", "git_sha", "torch", "shape", "mode", "backend", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
            "vs_baseline", "skipped"} <= set(table[0])
