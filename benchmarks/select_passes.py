"""How many passes the fused kernel's K-th value search takes: its algorithm in PyTorch, run on score rows
of several distributions (no GPU needed).

    python -m mixedae_fast.benchmarks.select_passes --rows 12800 --out select_passes.json

The fused TopK kernel (``kernels/homologous_attention.py: _kth_largest_score``) finds each row's K-th
largest score with a bracket between two of the row's scores, narrowed by interpolated probes; a program
of ``BLOCK_M`` rows runs until its slowest row is settled. :func:`search_kth` is the same algorithm, pass
for pass, on ``[rows, keys]`` fp32 tensors: per row the K-th value (exact: checked against ``topk``) and
the passes it took. Rows: ViT-B/16's 196 patch keys, K = 49, by default.
"""
from __future__ import annotations

import argparse
import sys

import torch


def search_kth(s: torch.Tensor, k: int, max_passes: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """``s: fp32 [R, N]`` (every key a candidate) -> ``(K-th largest per row, passes per row)``, the kernel's
    bracketing search: ``lo`` and ``hi`` are scores of the row with ``count(s >= lo) >= K > count(s > hi)``;
    each pass probes an interpolated ``x`` in ``[lo, hi)`` and moves one end onto a score; a row is settled
    when ``count(s >= lo) == K`` or ``lo == hi``. Rows still open after ``max_passes`` take ``topk``'s value
    (the kernel's radix search; their passes say ``max_passes``)."""
    lo, hi = s.min(1).values, s.max(1).values
    c_lo = torch.full_like(lo, s.shape[1])
    g_hi = torch.zeros_like(lo)
    passes = torch.zeros(s.shape[0], dtype=torch.int64)
    open_rows = (c_lo != k) & (lo != hi)
    for _ in range(max_passes):
        if not open_rows.any():
            break
        f = (c_lo - k - 0.5) / (c_lo - g_hi - 1.0).clamp(min=1.0)
        x = lo + (hi - lo) * f
        x = torch.where(x < hi, x, torch.nextafter(hi, torch.tensor(-torch.inf)))
        x = torch.where(x > lo, x, lo)
        above = s > x[:, None]
        c = above.sum(1).float()
        least_above = torch.where(above, s, torch.inf).min(1).values
        most_below = torch.where(above, -torch.inf, s).max(1).values
        up = c >= k
        lo, c_lo = torch.where(up, least_above, lo), torch.where(up, c, c_lo)
        hi, g_hi = torch.where(up, hi, most_below), torch.where(up, g_hi, c)
        passes += open_rows
        open_rows = (c_lo != k) & (lo != hi)
    kth = torch.where(open_rows, s.topk(k, dim=1).values[:, -1], lo)
    return kth, passes


def _quarter(shape, gen):
    return (torch.randn(shape, generator=gen) * 4).round().div(4).clamp(-3.75, 3.75)


def distributions(rows: int, n: int, d: int, gen: torch.Generator) -> dict:
    """Score rows ``[rows, n]``: plain normal, bf16 q·kᵀ/√d (as the kernel's inputs), the benchmark's
    quarter-step inputs (many ties), heavy tails (Student t, 3 dof), exponential (skewed), 5 levels, and
    runs of adjacent floats (one ulp apart), each twice, shuffled (the hardest ties)."""
    groups = rows // 64
    run = (torch.tensor([1.0]).view(torch.int32) + torch.arange(n, dtype=torch.int32) // 2).view(torch.float32)

    def qk(q, k):
        return (q @ k) / d ** 0.5

    return {
        "normal": torch.randn(rows, n, generator=gen),
        "bf16 q.k": qk(torch.randn(groups, 64, d, generator=gen).bfloat16().float(),
                       torch.randn(groups, d, n, generator=gen).bfloat16().float()).reshape(rows, n),
        "quarter-step q.k": qk(_quarter((groups, 64, d), gen), _quarter((groups, d, n), gen)).reshape(rows, n),
        "student t (3)": torch.distributions.StudentT(3.0).sample((rows, n)),
        "exponential": torch.distributions.Exponential(1.0).sample((rows, n)),
        "5 levels": torch.randint(0, 5, (rows, n), generator=gen).float(),
        "adjacent floats x2": run[torch.rand(rows, n, generator=gen).argsort(1)],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=12800, help="score rows per distribution (a multiple of 128)")
    p.add_argument("--keys", type=int, default=196, help="candidate keys a row (ViT-B/16: 196)")
    p.add_argument("--k", type=int, default=49, help="K (ViT-B/16 at r = 4: n = 49)")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    if args.rows % 128 or not 1 <= args.k <= args.keys:
        p.error("--rows must be a multiple of 128 and 1 <= --k <= --keys")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    table = {}
    print(f"{'scores':<18}{'row mean':>9}{'row max':>8}" + "".join(f"{f'{m}-row prog.':>16}" for m in (32, 64, 128)))
    for name, s in distributions(args.rows, args.keys, 64, gen).items():
        s = s.float().contiguous()
        kth, passes = search_kth(s, args.k)
        if not torch.equal(kth, s.topk(args.k, dim=1).values[:, -1]):
            raise AssertionError(f"{name}: the search's K-th value differs from topk's")
        row = {"row_mean": passes.float().mean().item(), "row_max": int(passes.max())}
        for m in (32, 64, 128):
            prog = passes.view(-1, m).max(1).values.float()
            row[f"program{m}_mean"], row[f"program{m}_max"] = prog.mean().item(), int(prog.max())
        table[name] = row
        print(f"{name:<18}{row['row_mean']:>9.2f}{row['row_max']:>8}" +
              "".join(f"{row[f'program{m}_mean']:>10.2f} / {row[f'program{m}_max']:>2}" for m in (32, 64, 128)))
    if args.out:
        from mixedae_fast.benchmarks.common import write_json

        write_json({"rows": args.rows, "keys": args.keys, "k": args.k, "passes": table}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
