"""benchmarks/bench_attention.py at a tiny shape on CPU: every row present (timed, or skipped with the
reason), the baseline row in the same run, each timed row checked against eager, and the result files'
fields (JSON and CSV); the ``measured.json`` entries built from a (fabricated) result file."""
import copy
import csv
import json

import pytest
import torch

from mixedae_fast import measured
from mixedae_fast.benchmarks import bench_attention


def test_bench_attention_smoke(tmp_path):
    out = tmp_path / "bench_attention.json"
    assert bench_attention.main(["--shapes", "tiny", "--warmup", "1", "--iters", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("benchmark", "device", "torch", "triton", "xformers", "git_sha", "date", "dtype", "command"):
        assert key in result, key
    assert result["benchmark"] == "attention" and result["torch"] == torch.__version__
    assert result["hc_heads"] == 1   # the HC rows of head 0, as the default config trains
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
        if "fwd_ms" in row:
            assert row["correct"] is True and row["max_err"] <= 1.0, row
    assert rows[("topk", "triton")]["K"] == 4
    with open(out.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert {"device", "git_sha", "torch", "shape", "mode", "backend", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
            "vs_baseline", "skipped"} <= set(table[0])


def test_the_correctness_check_can_fail(monkeypatch):
    """A backend whose output is off by 10% is flagged: ``check`` compares, it does not echo."""
    q, k, v = bench_attention._inputs((1, 2, 2, 3, 16), torch.float32, torch.device("cpu"))
    assert bench_attention.check("topk", "sdpa", q, k, v, 2, 3)["correct"]
    real = bench_attention._forward
    monkeypatch.setattr(bench_attention, "_forward", lambda mode, backend, *a: tuple(
        o * (1.1 if backend == "sdpa" else 1.0) for o in real(mode, backend, *a)))
    bad = bench_attention.check("topk", "sdpa", q, k, v, 2, 3)
    assert not bad["correct"] and bad["max_err"] > 1


def _row(shape, mode, backend, ms, correct=True, base=1.0):
    return {"shape": shape, "mode": mode, "backend": backend, "fwd_bwd_ms": ms, "vs_baseline": ms / base,
            "correct": correct, "max_err": 0.1 if correct else 7.0}


FABRICATED = {
    "benchmark": "attention", "device": "NVIDIA Test Card", "device_type": "cuda", "date": "2026-12-01",
    "git_sha": "abc1234", "dtype": "bfloat16", "torch": "2.11.0",
    "rows": [_row(shape, "none", "baseline", 1.0) for shape in ("vit_b", "vit_l")] + [
        _row("vit_b", "none", "sdpa", 1.0), _row("vit_l", "none", "sdpa", 1.2),
        _row("vit_b", "none", "flex", 0.9), _row("vit_l", "none", "flex", 1.5),       # sum 2.4 > 2.2: sdpa
        _row("vit_b", "oracle", "sdpa", 1.0), _row("vit_l", "oracle", "sdpa", 1.0),
        _row("vit_b", "oracle", "flex", 0.5), _row("vit_l", "oracle", "flex", 0.5, correct=False),
        _row("vit_b", "topk", "triton", 2.0), _row("vit_l", "topk", "triton", 2.5),
        _row("vit_b", "topk", "flex", 6.0), _row("vit_l", "topk", "flex", 7.0),
        _row("vit_b", "topk", "sdpa", 1.0),                                             # vit_l missing
        {"shape": "vit_b", "mode": "topk", "backend": "xformers", "error": "RuntimeError: no kernel"},
    ]}


def test_table_row_takes_the_fastest_correct_backend_and_names_the_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bench_attention.json"
    path.write_text(json.dumps(FABRICATED))
    row = bench_attention.table_row(FABRICATED, "results/x/bench_attention.json")
    choice = {mode: entry["backend"] for mode, entry in row["NVIDIA Test Card"].items()}
    # none: least summed time; oracle: flex is wrong at vit_l; topk: sdpa lacks vit_l, xformers failed
    assert choice == {"none": "sdpa", "oracle": "sdpa", "topk": "triton"}
    for entry in row["NVIDIA Test Card"].values():
        assert entry["measured"].startswith("results/x/bench_attention.json (2026-12-01, git abc1234")
    assert "vit_b 2.000 ms (x2.00 plain SDPA), vit_l 2.500 ms" in row["NVIDIA Test Card"]["topk"]["measured"]

    # the CLI prints it and merges it into the card's row of the table auto reads; auto then takes the fused
    # kernel there, and the card's other ops (none measured here) keep the default row's choice
    table_file = tmp_path / "measured.json"
    table_file.write_text(measured.TABLE.read_text())
    monkeypatch.setattr(measured, "TABLE", table_file)
    measured.table.cache_clear()
    try:
        assert bench_attention.main(["--table-row", str(path), "--write"]) == 0
        assert json.loads(capsys.readouterr().out) == {"NVIDIA Test Card": json.loads(json.dumps(
            bench_attention.table_row(FABRICATED, path.as_posix())))["NVIDIA Test Card"]}
        assert json.loads(table_file.read_text())["devices"]["NVIDIA Test Card"]["topk"]["backend"] == "triton"
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test Card")
        assert measured.choose("topk", "cuda") == "triton" and measured.choose("assignment", "cuda") == "torch"
    finally:
        measured.table.cache_clear()


@pytest.mark.parametrize("edit,message", [
    (lambda r: r["rows"].__setitem__(slice(None), [x for x in r["rows"] if x["mode"] != "topk"]),
     "no backend for mode 'topk'"),
    (lambda r: r.pop("rows"), "not a bench_attention result"),
    (lambda r: r.__setitem__("device_type", "cpu"), "not a CUDA device"),
])
def test_table_row_refuses_bad_result_files(tmp_path, capsys, edit, message):
    result = copy.deepcopy(FABRICATED)
    edit(result)
    path = tmp_path / "bench_attention.json"
    path.write_text(json.dumps(result))
    assert bench_attention.main(["--table-row", str(path), "--write"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_tiling_rows_select_variants_and_parts(tmp_path):
    """``--triton-tilings`` times the fused kernel once per forward tiling and ``--bwd-tilings`` once per
    other backward tiling (each row says its tilings and is checked against eager); ``--ablate-select``
    adds each forward tiling with the radix select (TopK: correct) and without a select (an ablation: not
    TopK, so never correct at K < r*n); ``--parts`` times the forward variants and the backward alone."""
    out = tmp_path / "bench_attention.json"
    assert bench_attention.main(["--shapes", "tiny", "--rows", "topk:triton,topk:eager", "--triton-tilings",
                                 "m32w8,m64w4", "--bwd-tilings", "n64m32w4", "--ablate-select", "--parts",
                                 "--warmup", "0", "--iters", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["backend"]: r for r in result["rows"]}
    assert list(rows) == ["baseline", "triton[m32w8]", "triton[m64w4]", "triton[m32w8,n64m32w4]",
                          "triton[m32w8,no-select]", "triton[m32w8,radix-select]", "triton[m64w4,no-select]",
                          "triton[m64w4,radix-select]", "eager"]
    for name in ("m32w8", "m64w4"):
        assert rows[f"triton[{name}]"]["tiling"] == name and rows[f"triton[{name}]"]["correct"] is True
        ablation = rows[f"triton[{name},no-select]"]
        assert ablation["tiling"] == name and ablation["ablation"] is True and ablation["correct"] is False
        radix = rows[f"triton[{name},radix-select]"]
        assert (radix["select"], radix["ablation"], radix["correct"]) == ("radix", False, True)
    assert rows["triton[m32w8,n64m32w4]"]["bwd_tiling"] == "n64m32w4" and rows["triton[m32w8,n64m32w4]"]["correct"]
    parts = [(p["tiling"], p.get("bwd_tiling"), p["part"]) for p in result["parts"]]
    assert parts == [("m32w8", None, "fwd"), ("m32w8", None, "fwd_radix"), ("m32w8", None, "fwd_no_select"),
                     ("m64w4", None, "fwd"), ("m64w4", None, "fwd_radix"), ("m64w4", None, "fwd_no_select"),
                     ("m32w8", "n64m32w4", "backward"), ("m32w8", "n64m32w4", "sum")]
    assert all(p["ms"] > 0 for p in result["parts"])
    assert out.with_suffix(".csv").read_text().count("\n") == 1 + len(rows) + len(parts)
    assert bench_attention.ROWS.count(("topk", "triton")) == 1   # the module's row list is not edited
    with pytest.raises(SystemExit):
        bench_attention.main(["--shapes", "tiny", "--triton-tilings", "m16w2"])
    with pytest.raises(SystemExit):
        bench_attention.main(["--shapes", "tiny", "--bwd-tilings", "m64w4"])
    for bad in ("triton[m16w2]", "triton[m64w4,n64m32w4,n128m16w8]", "triton[m64w4,no-select,radix-select]",
                "triton[m64w4,sorted]"):
        with pytest.raises(ValueError, match="unknown row"):
            bench_attention.variant(bad)
    assert bench_attention.variant("triton[m64w4,n64m32w4,radix-select]") == \
        ("triton", {"tiling": "m64w4", "select": "radix", "bwd_tiling": "n64m32w4"})


def test_table_row_names_the_fastest_tiling_and_skips_ablations(tmp_path):
    """The fastest correct tiling wins the topk entry as ``triton`` with its ``triton_tiling``, which the
    kernel then reads for that card; an ablation row, however fast, is never chosen."""
    result = copy.deepcopy(FABRICATED)
    result["rows"] = [r for r in result["rows"] if (r["mode"], r["backend"]) != ("topk", "triton")]
    for label, tiling, ms, extra in (("triton[m32w8]", "m32w8", 2.0, {}), ("triton[m64w4]", "m64w4", 1.1, {}),
                                     ("triton[m64w4,no-select]", "m64w4", 0.4,
                                      {"ablation": True, "correct": False})):
        for shape in ("vit_b", "vit_l"):
            result["rows"].append({**_row(shape, "topk", label, ms), "tiling": tiling, **extra})
    result["rows"] += [{**_row(shape, "topk", "triton[m64w4,radix-select]", 0.5), "tiling": "m64w4",
                        "select": "radix"} for shape in ("vit_b", "vit_l")]   # correct, but not the kernel's select
    entry = bench_attention.table_row(result, "r.json")["NVIDIA Test Card"]["topk"]
    assert (entry["backend"], entry["triton_tiling"]) == ("triton", "m64w4") and "triton_bwd_tiling" not in entry
    for row in result["rows"]:
        if row["backend"] == "triton[m64w4]":
            row["bwd_tiling"] = "n64m32w4"
    assert bench_attention.table_row(result, "r.json")["NVIDIA Test Card"]["topk"]["triton_bwd_tiling"] == "n64m32w4"
    assert "triton[m64w4] fwd+bwd vit_b 1.100 ms" in entry["measured"]
    assert measured.tiling_in({"devices": {"NVIDIA Test Card": {"topk": entry}}, "default_cuda": {}},
                              "NVIDIA Test Card") == "m64w4"
