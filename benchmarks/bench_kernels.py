"""Effective bandwidth of the mixing kernels against their references and a device copy.

    python -m mixedae_fast.benchmarks.bench_kernels --config vit_base --batch 256,1024 --out kernels.json

For each batch it times, on synthetic tensors of the config's shapes (images in the autocast dtype,
decoder tokens of ``decoder_embed_dim``):

* ``copy``: a device-to-device copy of the image batch, the bandwidth ceiling of this run;
* ``assignment``: ``draw_assignment`` (Triton kernel vs the torch draw);
* ``patch_mix``: images -> mixed patches, fp32 norm-pix targets and loss mask;
* ``unmix_fwd`` and ``unmix_fwd_bwd``: encoder tokens -> per-source decoder input, and its backward;

each as ``triton``, ``reference`` (eager) and ``compiled`` (``torch.compile`` of the reference; CUDA
only unless ``--compile``). Effective bandwidth = the bytes the op must move (every input read once,
every output written once; listed in ``bytes``) / median time. CUDA events on a GPU, the wall clock on
CPU; untimed warm-up. The Triton rows run on CUDA only (``--triton`` forces them, e.g. under
``TRITON_INTERPRET=1`` for a smoke test). ``--step-json`` takes a ``bench_step`` result of the same run
and reports the kernels' share of a training step.

``--table-row RESULT.json`` prints, from such a result file, the mixing ops' entries of ``measured.json``
for its card (what ``runtime.kernels=auto`` takes there): per op the Triton kernel only where it beat both
the eager and the compiled reference at every batch of the file (``unmix`` judged on forward + backward);
``--write`` also merges them into the card's row.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

from mixedae_fast import measured
from mixedae_fast.benchmarks.common import median_ms, result_head, write_json
from mixedae_fast.config import derive, load_config
from mixedae_fast.kernels.assignment import assignment_forward, draw_assignment
from mixedae_fast.kernels.patch_mix import patch_mix_forward, patch_mix_reference
from mixedae_fast.kernels.unmix import unmix_reference, unmix_triton
from mixedae_fast.train.device import resolve_precision


def _unmix_step(unmix_fn):
    """Forward and backward of an unmix implementation (the gradients of the tokens and mask token)."""
    def run(tokens, ids, mask_token, pos, r, grad):
        return torch.autograd.grad(unmix_fn(tokens, ids, mask_token, pos, r), (tokens, mask_token), grad)
    return run


def bench_batch(cfg, batch: int, device: torch.device, dtype: torch.dtype, variants: list[str],
                warmup: int, iters: int) -> dict:
    d = derive(cfg)
    r, n, N, P = cfg.mixing.group_size, d.n_visible, d.num_patches, cfg.model.patch_size
    S, Dd, G = cfg.model.img_size, cfg.model.decoder_embed_dim, batch // cfg.mixing.group_size
    e = torch.tensor([], dtype=dtype).element_size()
    images = torch.randn(batch, 3, S, S, device=device).to(dtype)
    ids = draw_assignment(G, N, r, n, seed=0, step=0, device=device, backend="torch")
    tokens = torch.randn(G, 1 + r * n, Dd, device=device).to(dtype).requires_grad_()
    mask_token = torch.randn(1, 1, Dd, device=device).to(dtype).requires_grad_()
    pos = torch.randn(1, N + 1, Dd, device=device).to(dtype)
    grad = torch.randn(batch, N + 1, Dd, device=device).to(dtype)
    copy_dst = torch.empty_like(images)

    ids_bytes, dec_in_bytes, tokens_bytes = G * r * n * 4, batch * (N + 1) * Dd * e, tokens.numel() * e
    unmix_fwd_bytes = tokens_bytes + ids_bytes + (Dd + (N + 1) * Dd) * e + dec_in_bytes
    unmix_args = (tokens.detach(), ids, mask_token.detach(), pos, r)
    # op: (bytes that must move, {variant: function}, its arguments); `compiled` = torch.compile(reference)
    ops = {
        "copy": (2 * images.numel() * e, {"reference": copy_dst.copy_}, (images,)),
        "assignment": (ids_bytes, {"triton": assignment_forward,
                                   "reference": partial(draw_assignment, backend="torch")},
                       (G, N, r, n, 0, 0, 0, device)),
        "patch_mix": (images.numel() * e + ids_bytes + G * r * n * 3 * P * P * e + batch * N * 3 * P * P * 4
                      + batch * N, {"triton": patch_mix_forward, "reference": patch_mix_reference},
                      (images, ids, r, n, P)),
        # forward: tokens, ids, mask token, pos embed in; the decoder input out. backward: grad out in,
        # grad tokens (and the mask token's) out
        "unmix_fwd": (unmix_fwd_bytes, {"triton": unmix_triton, "reference": unmix_reference}, unmix_args),
        "unmix_fwd_bwd": (unmix_fwd_bytes + dec_in_bytes + tokens_bytes + ids_bytes + Dd * e,
                          {"triton": _unmix_step(unmix_triton), "reference": _unmix_step(unmix_reference)},
                          (tokens, ids, mask_token, pos, r, grad)),
    }
    rows = {}
    for op, (nbytes, impls, op_args) in ops.items():
        if "compiled" in variants and op not in ("copy", "assignment"):
            impls = {**impls, "compiled": torch.compile(impls["reference"], dynamic=False)}
        for variant, fn in impls.items():
            if variant not in variants:
                continue
            ms = median_ms(partial(fn, *op_args), device, warmup, iters)
            rows[f"{op}/{variant}"] = {"op": op, "variant": variant, "ms": ms, "bytes": nbytes,
                                       "gb_per_s": nbytes / ms / 1e6}
    return {"shapes": {"batch": batch, "groups": G, "r": r, "N": N, "n": n, "patch": P, "img_size": S,
                       "decoder_dim": Dd, "dtype": str(dtype).removeprefix("torch.")}, "rows": rows}


# the table's ops and the rows that decide them (unmix as training runs it: forward and backward)
TABLE_OPS = {"assignment": "assignment", "patch_mix": "patch_mix", "unmix": "unmix_fwd_bwd"}
_LABELS = {"reference": "eager reference", "compiled": "compiled reference"}


def table_row(result: dict, source: str) -> tuple[str, dict]:
    """``(card, row)``: the mixing ops' entries of ``measured.json`` from a result of this benchmark
    (``source``: its path).
    Raises ValueError when the result cannot decide (no Triton rows, an op missing)."""
    if not result.get("batches"):
        raise ValueError(f"{source} holds no batches, so it is no bench_kernels result; pass the .json that "
                         "bench_kernels wrote (run it on the card first)")
    row = {}
    for op, bench_op in TABLE_OPS.items():
        wins, figures = [], []
        for batch in result["batches"]:
            rows = {r["variant"]: r["ms"] for r in batch["rows"].values() if r["op"] == bench_op}
            if "triton" not in rows or len(rows) < 2:
                raise ValueError(f"{source} has no triton and reference rows for {bench_op} at batch "
                                 f"{batch['shapes']['batch']}: rerun bench_kernels on the card (CUDA times them)")
            others = [ms for variant, ms in rows.items() if variant != "triton"]
            wins.append(rows["triton"] < min(others))
            figures.append(f"batch {batch['shapes']['batch']}: " + ", ".join(
                f"{_LABELS.get(v, v)} {ms:.3f} ms" for v, ms in rows.items()))
        row[op] = {"backend": "triton" if all(wins) else "torch",
                   "measured": ("fwd+bwd; " if op == "unmix" else "") + "; ".join(figures),
                   "source": f"{source}: {result.get('command', 'bench_kernels')}, {result.get('date')}, "
                             f"git {result.get('git_sha')}, torch {result.get('torch')}"}
    return result["device"], row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="vit_base")
    p.add_argument("--batch", default="256,1024", help="comma-separated source-image batch sizes")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--triton", action=argparse.BooleanOptionalAction, default=None,
                   help="time the Triton kernels (default: on CUDA only)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time torch.compile of the references (default: on CUDA only)")
    p.add_argument("--step-json", default=None, help="a bench_step result of the same run: report the share")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--table-row", default=None, metavar="RESULT_JSON",
                   help="print measured.json's mixing-op entries for the card of this result file, then exit")
    p.add_argument("--write", action="store_true", help="with --table-row: also merge them into the card's row")
    args, overrides = p.parse_known_args(argv)
    if args.table_row:
        try:
            card, row = table_row(json.loads(Path(args.table_row).read_text()), args.table_row)
        except (OSError, ValueError, KeyError, TypeError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            print(f"error: cannot make measured.json entries from {args.table_row} ({detail}); pass the "
                  "JSON that bench_kernels --out wrote on the card", file=sys.stderr)
            return 2
        print(json.dumps({card: row}, indent=2))
        if args.write:
            print(f"wrote the {card!r} mixing-op entries into {measured.write_row(card, row)}", file=sys.stderr)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(args.config, overrides)
    dtype = resolve_precision(cfg.runtime.precision, device) or torch.float32
    on_cuda = device.type == "cuda"
    variants = ["reference"]
    if args.triton if args.triton is not None else on_cuda:
        variants.append("triton")
    if args.compile if args.compile is not None else on_cuda:
        variants.append("compiled")
    batches = [int(b) for b in args.batch.split(",") if b]
    bad = [b for b in batches if b % cfg.mixing.group_size]
    if bad:
        p.error(f"--batch {args.batch}: {bad} are not multiples of mixing.group_size = {cfg.mixing.group_size}; "
                "pass multiples of it")
    import triton

    result = result_head("kernels", device, ["python", "-m", "mixedae_fast.benchmarks.bench_kernels"], argv,
                         triton=triton.__version__, config=args.config, batches=[])
    step = None
    if args.step_json:
        with open(args.step_json) as f:
            step = json.load(f)
    print(f"{'batch':>6} {'op':<15}{'variant':<11}{'ms':>9}{'GB/s':>9}{'of copy':>9}", flush=True)
    for batch in batches:
        res = bench_batch(cfg, batch, device, dtype, variants, args.warmup, args.iters)
        copy_bw = res["rows"]["copy/reference"]["gb_per_s"]
        for row in res["rows"].values():
            row["of_copy"] = row["gb_per_s"] / copy_bw
            print(f"{batch:>6} {row['op']:<15}{row['variant']:<11}{row['ms']:>9.3f}{row['gb_per_s']:>9.1f}"
                  f"{row['of_copy']:>9.2f}", flush=True)
        if step and step.get("batch") == batch and "triton" in variants:
            ms = sum(res["rows"][f"{op}/triton"]["ms"] for op in ("assignment", "patch_mix", "unmix_fwd_bwd"))
            step_ms = step["rows"]["topk"]["ms_per_step"] if "topk" in step["rows"] else None
            if step_ms:
                res["share_of_step"] = {"kernels_ms": ms, "step_ms": step_ms, "fraction": ms / step_ms}
                print(f"{batch:>6} kernels {ms:.3f} ms = {ms / step_ms:.2%} of a {step_ms:.1f} ms TopK step")
        result["batches"].append(res)
        if args.out:  # after every batch: a run cut short keeps the batches that finished
            write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
