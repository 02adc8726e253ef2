"""Attention backends: forward, backward and forward+backward times per homologous-attention mode.

    python -m mixedae_fast.benchmarks.bench_attention --shapes vit_b,vit_b_256,vit_l --dtype bf16 \\
        --out benchmarks/results/<date>_<card>/bench_attention.json      # also writes the .csv beside

Rows: ``baseline`` (plain SDPA on the full sequence, no mask: the row every ratio divides by, measured
in the same run), then every (mode, backend) of :mod:`mixedae_fast.model.attention`: ``none`` and ``oracle``
through sdpa / xformers / flex / eager, ``topk`` (K = n, with the HC row terms of head 0 and their
gradient, as the default config trains; ``--hc-heads``) through triton / xformers / sdpa / flex / eager.
``--triton-tilings`` times the fused kernel in each forward tiling, ``--bwd-tilings`` in each backward
tiling, ``--ablate-select`` also with the 32-step radix select and without a select (the difference is
the select's time). ``--parts`` (``--only-parts``: without the rows) times each kernel alone, without
autograd: the forward per tiling and select, the backward per tiling. Inputs ``q, k, v: [G, H, 1+r*n,
d]`` need gradients; the backward is ``autograd.grad`` of the outputs against random upstream gradients.
Untimed warm-up (compiles flex and the Triton kernels), then the median of ``--iters`` runs timed
with CUDA events (wall clock on CPU). The result file is rewritten after every row. A backend that
cannot run here gets a row with the reason (xformers on CPU; flex's backward on CPU). The result carries
device, versions, git SHA, date, command.

Inputs are multiples of 1/4 in [-3.75, 3.75]: at d = 64 every score is exact in fp32 and in bf16 dots
with fp32 accumulation, so every path makes the same TopK selection, and each row records whether its
outputs (and HC rows) and q/k/v gradients match the fp32 eager path on those inputs (``correct``,
``max_err``; tolerances as the test suite's GPU rows).

The table of measured choices (``mixedae_fast/measured.json``, read for ``runtime.kernels=auto``) takes a
card's attention entries from such a result file: the fastest correct backend per mode, naming the file::

    python -m mixedae_fast.benchmarks.bench_attention --table-row benchmarks/results/<date>_<card>/bench_attention.json
    # prints {"<card>": {"none": {...}, "oracle": {...}, "topk": {...}}}; --write also merges them into the card's row
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from mixedae_fast import measured
from mixedae_fast.benchmarks.common import median_ms, result_head, write_json
from mixedae_fast.config import MixingConfig
from mixedae_fast.kernels import homologous_attention as fused
from mixedae_fast.model.attention import (
    HomologousMask,
    global_attention,
    oracle_attention,
    resolve_backend,
    topk_attention,
    xformers_problem,
)
from mixedae_fast.tolerances import tol

# name -> (G groups, H heads, r, n, head dim): L = 1 + r*n = 197 for ViT-B/16 and ViT-L/16 at 224 px
SHAPES = {
    "vit_b": (64, 12, 4, 49, 64),
    "vit_b_256": (256, 12, 4, 49, 64),
    "vit_l": (64, 16, 4, 49, 64),
    "tiny": (2, 2, 4, 4, 16),  # the CPU smoke test
}
ROWS = [("none", b) for b in ("sdpa", "xformers", "flex", "eager")] + \
       [("oracle", b) for b in ("sdpa", "xformers", "flex", "eager")] + \
       [("topk", b) for b in ("triton", "xformers", "sdpa", "flex", "eager")]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HC_HEADS = MixingConfig.hc_heads  # the HC rows of the heads the default config's loss reads (head 0)


def _forward(mode: str, backend: str, q, k, v, r: int, n: int, hc_heads: int | None = HC_HEADS):
    """The outputs that carry gradient: ``(out,)`` or ``(out, hc_rows)`` (the first ``hc_heads`` heads')."""
    if backend == "baseline":
        return (F.scaled_dot_product_attention(q, k, v),)
    if mode == "none":
        return (global_attention(q, k, v, backend),)
    if mode == "oracle":
        return (oracle_attention(q, k, v, r, n, backend),)
    out, hc_rows = topk_attention(q, k, v, HomologousMask(r, n, n, "topk"), True, backend, hc_heads)
    return out, hc_rows


def _unavailable(mode: str, backend: str, device: torch.device) -> str | None:
    if backend == "xformers":
        return xformers_problem(str(device))
    if backend in ("baseline", "flex"):
        return None
    try:
        resolve_backend(backend, str(device), mode)
    except (RuntimeError, ValueError) as e:
        return str(e)
    return None


def _inputs(shape: tuple, dtype: torch.dtype, device: torch.device):
    """q, k, v in steps of 1/4 (exact scores: every backend selects the same keys), needing gradients."""
    G, H, r, n, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(G, H, 1 + r * n, d, generator=gen, device=device) * 4).round().div(4).clamp(-3.75, 3.75)
            .to(dtype).requires_grad_(True) for _ in range(3)]


def check(mode: str, backend: str, q, k, v, r: int, n: int, with_grad: bool = True,
          hc_heads: int | None = HC_HEADS) -> dict:
    """``{"correct": bool, "max_err": float}``: this backend's outputs (and q/k/v gradients) against the
    fp32 eager path on the same inputs; ``max_err`` is the largest ``|a - b| / (atol + rtol |b|)``."""
    def run(name):
        with torch.set_grad_enabled(with_grad):
            outs = _forward(mode, name, q, k, v, r, n, hc_heads)
            if not with_grad:
                return [o.float() for o in outs]
            ups = [torch.ones_like(o) / o.shape[-1] for o in outs]
            return [o.float() for o in outs] + [g.float() for g in torch.autograd.grad(outs, (q, k, v), ups)]

    got, want = run(backend), run("eager")
    # the table's GPU rows on every device: one rounding of the output dtype, and P and dS rounded before
    # the dots on a GPU (looser than a CPU smoke run needs)
    tol_out, tol_grad = (tol(q.dtype, "cuda", kind) for kind in ("out", "grad"))
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        t = tol_grad if with_grad and i >= len(got) - 3 else tol_out
        worst = max(worst, float(((a - b).abs() / (t["atol"] + t["rtol"] * b.abs())).max()))
    return {"correct": worst <= 1.0, "max_err": worst}


FLAGS = {"no-select": "none", "radix-select": "radix"}  # a row label's select flags -> kernel_variant's select


def variant(label: str) -> tuple[str, dict]:
    """A row's backend label -> (backend, :func:`kernel_variant` options): ``triton[m64w4]`` is the fused
    kernel in that forward tiling, ``triton[m64w4,n64m64w4]`` also in that backward tiling;
    ``triton[m64w4,radix-select]`` with the 32-step radix select instead of the bracketing search (a
    TopK path, timed for comparison, never chosen for the table); ``triton[m64w4,no-select]`` without a
    select (an ablation: its time minus the tiling's is the select's share; not TopK attention)."""
    if "[" not in label:
        return label, {}
    backend, _, inner = label.partition("[")
    tiling, *flags = inner.rstrip("]").split(",")
    bwd = [f for f in flags if f in measured.BWD_TILINGS]
    selects = [FLAGS[f] for f in flags if f in FLAGS]
    if backend != "triton" or tiling not in measured.FWD_TILINGS or len(bwd) > 1 or len(selects) > 1 or \
            len(bwd) + len(selects) != len(flags):
        raise ValueError(f"unknown row {label!r}: triton[TILING] or triton[TILING,FLAG...], TILING one of "
                         f"{', '.join(measured.FWD_TILINGS)}, FLAG a backward tiling "
                         f"({', '.join(measured.BWD_TILINGS)}) "
                         f"or one of {', '.join(FLAGS)}")
    return backend, {"tiling": tiling, "select": selects[0] if selects else "search",
                     "bwd_tiling": bwd[0] if bwd else None}


def measure(mode: str, backend: str, shape: tuple, dtype: torch.dtype, device: torch.device, warmup: int,
            iters: int, hc_heads: int | None = HC_HEADS) -> dict:
    G, H, r, n, d = shape
    row = {"mode": mode, "backend": backend, "G": G, "H": H, "L": 1 + r * n, "d": d, "K": n if mode == "topk" else None}
    backend, options = variant(backend)
    reason = _unavailable(mode, backend, device)
    if reason:
        return {**row, "skipped": reason}
    if backend == "triton":
        row["tiling"] = options.get("tiling") or measured.card_tiling(device)
        row["bwd_tiling"] = options.get("bwd_tiling") or measured.card_tiling(device, "triton_bwd_tiling")
        row["select"] = options.get("select", "search")
        row["ablation"] = row["select"] == "none"
        with measured.kernel_variant(**options):
            return _timed(row, mode, backend, shape, dtype, device, warmup, iters, hc_heads)
    return _timed(row, mode, backend, shape, dtype, device, warmup, iters, hc_heads)


def _timed(row: dict, mode: str, backend: str, shape: tuple, dtype: torch.dtype, device: torch.device, warmup: int,
           iters: int, hc_heads: int | None) -> dict:
    G, H, r, n, d = shape
    q, k, v = _inputs(shape, dtype, device)
    fwd = lambda: _forward(mode, backend, q, k, v, r, n, hc_heads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if device.type == "cpu" and backend == "flex":  # forward only, without autograd
                with torch.no_grad():
                    row["fwd_ms"] = median_ms(fwd, device, warmup, iters)
                return {**row, **check(mode, backend, q, k, v, r, n, with_grad=False, hc_heads=hc_heads),
                        "skipped_bwd": "FlexAttention has no CPU backward"}
            row["fwd_ms"] = median_ms(fwd, device, warmup, iters)
            outs = fwd()
            ups = [torch.randn_like(o) for o in outs]
            bwd = lambda: torch.autograd.grad(outs, (q, k, v), ups, retain_graph=True)
            row["bwd_ms"] = median_ms(bwd, device, warmup, iters)
            outs = None  # frees the retained graph
            both = lambda: torch.autograd.grad(fwd(), (q, k, v), ups)
            row["fwd_bwd_ms"] = median_ms(both, device, warmup, iters)
            if device.type == "cuda":
                row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            row.update(check(mode, backend, q, k, v, r, n, hc_heads=hc_heads))
    except Exception as e:  # noqa: BLE001 - one backend failing must not end the run: record why
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    return row


def measure_parts(shape: tuple, dtype: torch.dtype, device: torch.device, tilings: list[str], bwd_tilings: list[str],
                  ablate: bool, warmup: int, iters: int, hc_heads: int | None = HC_HEADS) -> list[dict]:
    """The fused kernel's parts, each timed alone (no autograd) on the same inputs as the rows: per forward
    tiling the forward (``fwd``; with ``ablate`` also ``fwd_radix``, the 32-step radix select, and
    ``fwd_no_select``); per backward tiling each stage of the backward
    (:func:`~mixedae_fast.kernels.homologous_attention.backward_stages`, on the first forward tiling's
    saved state); ``sum``: the first forward tiling's forward plus the first backward tiling's stages."""
    G, H, r, n, d = shape
    head = {"mode": "topk", "backend": "triton", "G": G, "H": H, "L": 1 + r * n, "d": d, "K": n}
    reason = _unavailable("topk", "triton", device)
    if reason:
        return [{**head, "tiling": "-", "part": "all", "skipped": reason}]
    q, k, v = (t.detach() for t in _inputs(shape, dtype, device))
    src = torch.arange(r, device=device).repeat_interleave(n)
    count = H if hc_heads is None else hc_heads
    rows, state, total = [], None, None

    def timed(row, fn):
        try:
            row["ms"] = median_ms(fn, device, warmup, iters)
        except Exception as e:  # noqa: BLE001 - a part failing must not end the run: record why
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
        return row.get("ms")

    for tiling in tilings:
        selects = [("fwd", "search")] + ([("fwd_radix", "radix"), ("fwd_no_select", "none")] if ablate else [])
        for part, select in selects:
            with measured.kernel_variant(tiling, select):
                ms = timed({**head, "tiling": tiling, "part": part},
                           lambda: fused.homologous_attention_forward(q, k, v, src, n, count))
                if state is None and select == "search" and ms is not None:
                    state, total = fused.homologous_attention_forward(q, k, v, src, n, count), ms
    if state is None:
        return rows
    out, lse, hc_rows, bits = state
    gen = torch.Generator(device=device).manual_seed(1)
    do = torch.randn(out.shape, generator=gen, device=device).to(dtype)
    grad_hc = torch.randn(hc_rows.shape, generator=gen, device=device) if hc_rows is not None else None
    for i, bwd in enumerate(bwd_tilings):
        with measured.kernel_variant(bwd_tiling=bwd):
            stages, _ = fused.backward_stages(do, q, k, v, out, src, lse, hc_rows, grad_hc, bits)
            for name, run in stages:
                ms = timed({**head, "tiling": tilings[0], "bwd_tiling": bwd, "part": name}, run)
                if i == 0:
                    total = None if ms is None or total is None else total + ms
    if total is not None:
        rows.append({**head, "tiling": tilings[0], "bwd_tiling": bwd_tilings[0], "part": "sum", "ms": total})
    return rows


def table_row(result: dict, source: str) -> dict:
    """``{device: {mode: {"backend", "measured"}}}`` for ``measured.json`` from a bench_attention
    result: per mode the backend with the least fwd+bwd time summed over the result's shapes, among those
    timed and correct at every shape (the baseline row excluded); ``measured`` names ``source``.
    Raises ValueError when a mode has no such backend."""
    shapes = sorted({row["shape"] for row in result["rows"]})
    row_out = {}
    for mode in ("none", "oracle", "topk"):
        totals = {}
        for backend in sorted({r["backend"] for r in result["rows"] if r["mode"] == mode and not r.get("ablation")
                               and r.get("select", "search") == "search"}
                              - {"baseline"}):
            rows = [r for r in result["rows"] if (r["mode"], r["backend"]) == (mode, backend)]
            if {r["shape"] for r in rows} == set(shapes) and all("fwd_bwd_ms" in r and r.get("correct") for r in rows):
                totals[backend] = sum(r["fwd_bwd_ms"] for r in rows)
        if not totals:
            raise ValueError(f"{source}: no backend for mode {mode!r} is timed and correct at every shape "
                             f"({', '.join(shapes)}); rerun bench_attention on the card")
        ranked = sorted(totals, key=totals.get)
        best = ranked[0]
        per_shape = ", ".join(f"{r['shape']} {r['fwd_bwd_ms']:.3f} ms (x{r['vs_baseline']:.2f} plain SDPA)"
                              for r in result["rows"] if (r["mode"], r["backend"]) == (mode, best)
                              and "vs_baseline" in r)
        runner_up = f"; next {ranked[1]} {totals[ranked[1]]:.3f} ms summed" if len(ranked) > 1 else ""
        row_out[mode] = {"backend": variant(best)[0], "measured": (
            f"{source} ({result['date']}, git {result['git_sha']}, {result['dtype']}, torch {result['torch']}): "
            f"{best} fwd+bwd {per_shape}{runner_up}")}
        tilings = {r.get("tiling") for r in result["rows"] if (r["mode"], r["backend"]) == (mode, best)} - {None}
        if tilings:  # the fused kernel: the tilings it was timed in (one each per backend label)
            row_out[mode]["triton_tiling"] = tilings.pop()
            bwd = {r.get("bwd_tiling") for r in result["rows"] if (r["mode"], r["backend"]) == (mode, best)} - {None}
            if bwd:
                row_out[mode]["triton_bwd_tiling"] = bwd.pop()
    return {result["device"]: row_out}


def _table_row_cli(path: str, write: bool) -> int:
    """``--table-row``: print the table row of a result file; with ``--write`` put it into the table."""
    try:
        result = json.loads(Path(path).read_text())
        if result.get("benchmark") != "attention" or not result.get("rows"):
            raise ValueError(f"{path} is not a bench_attention result (no 'rows'); pass the .json it wrote")
        row = table_row(result, Path(path).as_posix())
    except (OSError, ValueError, KeyError) as e:
        print(f"error: --table-row {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(row, indent=2))
    if write and result.get("device_type") != "cuda":
        print(f"error: --write: {path} was measured on {result['device']!r}, not a CUDA device; the table's "
              "device rows are for CUDA cards (its 'cpu' row is edited by hand)", file=sys.stderr)
        return 2
    if write:
        (card, entries), = row.items()
        path = measured.write_row(card, entries)
        print(f"wrote the {card!r} attention entries into {path}", file=sys.stderr)
    return 0


CSV_FIELDS = ["shape", "mode", "backend", "tiling", "bwd_tiling", "select", "ablation", "part", "G", "H", "L", "d",
              "K", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "ms", "vs_baseline", "correct", "max_err", "peak_mem_mib",
              "skipped", "skipped_bwd", "error"]


def write_result(result: dict, out: Path, csv_too: bool = True) -> None:
    """The result as JSON at ``out`` and (``csv_too``) CSV beside it, each replaced whole (written after every
    row, so a run cut short keeps the rows that finished)."""
    write_json(result, out)
    if not csv_too:
        return
    header = {k: result[k] for k in ("device", "torch", "triton", "xformers", "git_sha", "date", "dtype")}
    tmp = out.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*header, *CSV_FIELDS], extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"] + result.get("parts", []):
            writer.writerow({**header, **row})
    tmp.replace(out.with_suffix(".csv"))


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("triton", "xformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed or broken: say so
            out[name] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="vit_b,vit_b_256,vit_l", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--rows", default=None, help="comma-separated mode:backend pairs (default: all)")
    p.add_argument("--triton-tilings", default=None, metavar="NAMES",
                   help=f"time the fused kernel in each of these forward tilings (comma-separated from "
                        f"{', '.join(measured.FWD_TILINGS)}, or 'all'), a row each, instead of the card's one")
    p.add_argument("--bwd-tilings", default=None, metavar="NAMES",
                   help=f"also time the fused kernel in each of these backward tilings (comma-separated from "
                        f"{', '.join(measured.BWD_TILINGS)}, or 'all'), with the first forward tiling")
    p.add_argument("--ablate-select", action="store_true",
                   help="also time the fused kernel with the 32-step radix select and without a select, per "
                        "forward tiling (the latter rows marked ablation)")
    p.add_argument("--parts", action="store_true",
                   help="also time the fused kernel's parts alone (forward per tiling, its select variants with "
                        "--ablate-select, the backward per backward tiling), rows in the result's 'parts'")
    p.add_argument("--only-parts", action="store_true", help="--parts without the backend rows (baseline kept)")
    p.add_argument("--hc-heads", default=str(HC_HEADS), metavar="N",
                   help="topk rows: the HC row terms of the first N heads, as the config's mixing.hc_heads "
                        f"(default {HC_HEADS}, the default config's) or 'all'")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="write the results as JSON here, and as CSV beside it")
    p.add_argument("--no-csv", action="store_true", help="with --out: the JSON only")
    p.add_argument("--table-row", default=None, metavar="JSON",
                   help="measure nothing: print the measured.json entries built from this result file")
    p.add_argument("--write", action="store_true",
                   help="with --table-row: also merge them into the card's row of the table")
    args = p.parse_args(argv)
    if args.table_row:
        return _table_row_cli(args.table_row, args.write)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    rows = list(ROWS) if args.rows is None else [tuple(item.split(":")) for item in args.rows.split(",") if item]
    bad = [row for row in rows if row not in ROWS]
    if bad:
        p.error(f"unknown row(s) {bad}; choose mode:backend from {', '.join(f'{m}:{b}' for m, b in ROWS)}")
    tilings = list(measured.FWD_TILINGS) if args.triton_tilings == "all" else \
        [t for t in (args.triton_tilings or "").split(",") if t]
    unknown = [t for t in tilings if t not in measured.FWD_TILINGS]
    if unknown:
        p.error(f"unknown tiling(s) {unknown}; choose from {', '.join(measured.FWD_TILINGS)} or all")
    bwd_tilings = list(measured.BWD_TILINGS) if args.bwd_tilings == "all" else \
        [t for t in (args.bwd_tilings or "").split(",") if t]
    unknown = [t for t in bwd_tilings if t not in measured.BWD_TILINGS]
    if unknown:
        p.error(f"unknown backward tiling(s) {unknown}; choose from {', '.join(measured.BWD_TILINGS)} or all")
    if ("topk", "triton") in rows and (tilings or bwd_tilings or args.ablate_select):
        first = (tilings or [measured.card_tiling(device)])[0]
        timed = [f"triton[{t}]" for t in tilings] or ["triton"]
        timed += [f"triton[{first},{b}]" for b in bwd_tilings if b != measured.card_tiling(device, "triton_bwd_tiling")]
        ablations = [f"triton[{t},{flag}]" for t in tilings or [first] for flag in FLAGS] if args.ablate_select else []
        at = rows.index(("topk", "triton"))
        rows[at:at + 1] = [("topk", b) for b in timed + ablations]
    if args.hc_heads != "all" and not (args.hc_heads.isdigit() and int(args.hc_heads) >= 1):
        p.error(f"--hc-heads {args.hc_heads!r}: a number of heads >= 1, or all")
    hc_heads = None if args.hc_heads == "all" else int(args.hc_heads)
    parts = (tilings or [measured.card_tiling(device)]) if args.parts or args.only_parts else []
    bwd_parts = bwd_tilings or [measured.card_tiling(device, "triton_bwd_tiling")]
    if args.only_parts:
        rows = []
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the eager rows in fp32: true fp32 matmuls
    result = result_head("attention", device, ["python", "-m", "mixedae_fast.benchmarks.bench_attention"], argv,
                         device_type=device.type, **_versions(), dtype=str(dtype).removeprefix("torch."),
                         warmup=args.warmup, iters=args.iters, hc_heads=hc_heads, rows=[], parts=[])
    width = max([9, *(len(b) + 1 for _, b in rows)])
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        base = measure("none", "baseline", shape, dtype, device, args.warmup, args.iters, hc_heads)
        for mode, backend in [("none", "baseline"), *rows]:
            row = base if backend == "baseline" else measure(mode, backend, shape, dtype, device, args.warmup,
                                                             args.iters, hc_heads)
            row = {"shape": shape_name, **row}
            if "fwd_bwd_ms" in row and "fwd_bwd_ms" in base:
                row["vs_baseline"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            result["rows"].append(row)
            times = "  ".join(f"{key} {row[key]:8.3f}" for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms") if key in row)
            note = row.get("skipped") or row.get("error") or row.get("skipped_bwd") or ""
            ratio = f"  x{row['vs_baseline']:.2f}" if "vs_baseline" in row else ""
            ok = "" if "correct" not in row else "  ablation (not TopK)" if row.get("ablation") else "  ok" \
                if row["correct"] else f"  WRONG (err x{row['max_err']:.1f})"
            print(f"{shape_name:<10}{mode:<7}{backend:<{width}}{times}{ratio}{ok}  {note}"[:200], flush=True)
            if args.out:
                write_result(result, Path(args.out), not args.no_csv)
        if parts:
            for row in measure_parts(shape, dtype, device, parts, bwd_parts, args.ablate_select, args.warmup,
                                     args.iters, hc_heads):
                row = {"shape": shape_name, **row}
                if "ms" in row and "fwd_bwd_ms" in base:
                    row["vs_baseline"] = row["ms"] / base["fwd_bwd_ms"]
                result["parts"].append(row)
                label = f"{row['tiling']}{',' + row['bwd_tiling'] if 'bwd_tiling' in row else ''}:{row['part']}"
                note = row.get("error", "")
                ms = f"{row['ms']:8.3f}" if "ms" in row else ""
                print(f"{shape_name:<10}part   {label:<{width + 6}}{ms}  {note}"[:200], flush=True)
                if args.out:
                    write_result(result, Path(args.out), not args.no_csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
