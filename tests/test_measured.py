"""The one table of measured choices (mixedae_fast/measured.json) and its one reader: every row valid and
measured, the rule ``runtime.kernels`` states for every op, the fused kernel's tilings, a bad entry
refused on load, and a benchmark's entries merged into a card's row."""
import json

import pytest
import torch

from mixedae_fast import measured
from mixedae_fast.choices import HA_MODES


def test_the_shipped_table_is_complete_and_only_measured():
    table = measured.table()
    for name in ("cpu", "default_cuda"):
        assert set(table[name]) == set(measured.OPS), name
        assert "triton" not in table[name].values(), "the fused kernels only where a card measured them"
    for card, row in table["devices"].items():
        for op, entry in row.items():
            assert entry["backend"] in measured.IMPLEMENTATIONS[op] and entry["measured"], (card, op)
            # the fused attention kernel only from a bench_attention result of this code on that card
            assert op != "topk" or entry["backend"] != "triton" or "bench_attention" in entry["measured"]


H200 = {"none": "sdpa", "oracle": "flex", "topk": "triton", "assignment": "triton", "patch_mix": "torch",
        "unmix": "torch"}


@pytest.mark.parametrize("card,kernels,changed", [
    ("NVIDIA H200", "auto", {}),
    ("NVIDIA H200", "torch", {"topk": "eager", "assignment": "torch"}),  # the default row's, never a kernel
    ("NVIDIA H200", "triton", {"patch_mix": "triton", "unmix": "triton"}),  # every op with a Triton kernel
    ("A card nobody measured", "auto", {"oracle": "sdpa", "topk": "eager", "assignment": "torch"}),
    ("A card nobody measured", "triton", {"oracle": "sdpa", "patch_mix": "triton", "unmix": "triton"}),
])
def test_choose_is_one_rule_for_attention_and_mixing(monkeypatch, card, kernels, changed):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: card)
    want = {**H200, **changed}
    assert {op: measured.choose(op, "cuda:0", kernels) for op in measured.OPS} == want
    assert {op: measured.choose(op, "cpu", "torch") for op in measured.OPS} == measured.table()["cpu"]
    with pytest.raises(ValueError, match="kernels='fast' is not one of auto, triton, torch"):
        measured.choose("topk", "cpu", "fast")
    with pytest.raises(ValueError, match="op 'mix' is not one of topk, oracle, none, assignment"):
        measured.choose("mix", "cpu")


def test_the_table_names_a_cards_tilings():
    """A card's ``topk`` entry may name its measured tilings; others take the defaults; a name that is
    not a tiling is an error that says which card."""
    rows = {"default_cuda": {"topk": "eager"}, "cpu": {"topk": "eager"},
            "devices": {"A": {"topk": {"backend": "triton", "triton_tiling": "m64w4"}},
                        "B": {"topk": {"backend": "flex"}}, "C": {"topk": "eager"},
                        "D": {"topk": {"backend": "triton", "triton_tiling": "m7w1"}}}}
    assert measured.tiling_in(rows, "A") == "m64w4"
    assert {measured.tiling_in(rows, c) for c in ("B", "C", "Z", None)} == {measured.DEFAULT_TILING}
    with pytest.raises(ValueError, match="'D' names the triton_tiling 'm7w1'"):
        measured.tiling_in(rows, "D")
    rows["devices"]["A"]["topk"]["triton_bwd_tiling"] = "n64m32w4"
    assert measured.tiling_in(rows, "A", "triton_bwd_tiling") == "n64m32w4"
    assert measured.tiling_in(rows, "B", "triton_bwd_tiling") == measured.DEFAULT_BWD_TILING
    assert measured.card_tiling("cpu") == measured.DEFAULT_TILING   # the shipped table parses
    assert measured.tiling("cpu", "triton_bwd_tiling") == measured.DEFAULT_BWD_TILING
    with measured.kernel_variant("m128w8", bwd_tiling="n64m32w4"):
        assert (measured.tiling("cpu"), measured.tiling("cpu", "triton_bwd_tiling")) == ("m128w8", "n64m32w4")
    assert measured.tiling("cpu") == measured.DEFAULT_TILING


@pytest.mark.parametrize("row,op,name,message", [
    ("NVIDIA H200", "topk", "tritn", "names 'tritn', not one of triton, xformers, sdpa, flex, eager"),
    ("cpu", "none", "auto", "names 'auto', not one of triton"),
    ("NVIDIA H200", "assignment", "eager", "names 'eager', not one of triton, torch"),
    ("NVIDIA H200", "unmixx", "torch", "is no op"),
])
def test_the_table_refuses_what_this_code_does_not_have(tmp_path, monkeypatch, row, op, name, message):
    """A misspelt entry was taken as is and failed, or chose another path, only on that card: refused on
    load, naming the file, the row and the op."""
    table = json.loads(measured.TABLE.read_text())
    target = table["devices"][row] if row in table["devices"] else table[row]
    if isinstance(target.get(op), dict):
        target[op]["backend"] = name
    else:
        target[op] = name
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(measured, "TABLE", path)
    measured.table.cache_clear()
    try:
        with pytest.raises(ValueError, match=rf"measured\.json: row '{row}', op '{op}' {message}"):
            measured.table()
    finally:
        measured.table.cache_clear()


def test_write_row_merges_a_benchmarks_entries_into_the_cards_row(tmp_path):
    path = tmp_path / "measured.json"
    path.write_text(measured.TABLE.read_text())
    entry = {"backend": "torch", "measured": "batch 8: triton 2 ms, eager reference 1 ms"}
    measured.write_row("NVIDIA H200", {"assignment": entry}, path)
    row = json.loads(path.read_text())["devices"]["NVIDIA H200"]
    assert row["assignment"] == entry and row["topk"]["backend"] == "triton"   # the other ops kept
    with pytest.raises(ValueError, match="op 'assignment' names 'sdpa'"):
        measured.write_row("NVIDIA H200", {"assignment": {**entry, "backend": "sdpa"}}, path)
    assert json.loads(path.read_text())["devices"]["NVIDIA H200"]["assignment"] == entry   # refused: unchanged
    assert set(HA_MODES) < set(measured.OPS)
