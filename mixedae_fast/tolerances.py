"""The one tolerance table, of the test suite and of the benchmarks' correctness checks:
``tol(dtype, device, kind)`` -> ``dict(rtol=, atol=)``.

Every entry says why it is as loose as it is. Keys are ``(kind, dtype, device type)``:

- ``out``: a fast path's output against its reference (same inputs, same selection);
- ``grad``: gradients of the same comparison (summed over more terms, so looser on a GPU);
- ``hc``: the HC loss's row terms (log-sum-exps of fp32 scores in every path);
- ``kernel``: the fused TopK kernel's fp32 results (outputs, HC rows, gradients) against its reference;
- ``targets``: norm-pix targets (fp32 whatever the image dtype) of a fast path against its reference.

Use it as ``torch.testing.assert_close(a, b, **tol(a.dtype, a.device))``. A test that needs a
tolerance not here adds a row with its reason rather than a literal at the call site. The tests import
it as ``tests/tolerances.py`` re-exports it.
"""
from __future__ import annotations

import torch

# (kind, dtype, device type) -> (rtol, atol, reason)
TABLE: dict[tuple[str, torch.dtype, str], tuple[float, float, str]] = {
    ("out", torch.float64, "cpu"): (1e-10, 1e-10, "float64 on both sides: only the summation order differs"),
    ("grad", torch.float64, "cpu"): (1e-10, 1e-10, "float64 on both sides: only the summation order differs"),
    ("out", torch.float32, "cpu"): (1e-5, 1e-5, "fp32 on both sides; blocked vs. whole-row sums differ by a few "
                                               "ulps, amplified through softmax and a 64-wide dot to ~1e-6"),
    ("grad", torch.float32, "cpu"): (1e-5, 1e-5, "as out: fp32, only the summation order differs"),
    ("hc", torch.float32, "cpu"): (1e-5, 1e-5, "log-sum-exp of fp32 scores; summation order only"),
    ("kernel", torch.float32, "cpu"): (2e-6, 2e-6, "the fused TopK kernel under Triton's interpreter against its "
                                                  "fp32 reference (same exact scores, tiled sums): measured <= 3.3e-7 "
                                                  "for outputs, HC rows, gradients (test_homologous_attention_triton)"),
    ("kernel", torch.float32, "cuda"): (1e-4, 1e-4, "as ('out', fp32, cuda): GPU exp/log approximations, another "
                                                   "dot order"),
    ("out", torch.float32, "cuda"): (1e-4, 1e-4, "GPU exp/log are approximations (a few ulps) and the kernel's "
                                                "fp32 dots may run in another order than cuBLAS"),
    ("grad", torch.float32, "cuda"): (1e-4, 1e-4, "as out, and gradients sum over every query row"),
    ("hc", torch.float32, "cuda"): (1e-4, 1e-4, "fp32 scores; GPU exp/log approximations"),
    ("targets", torch.float32, "cpu"): (2e-6, 2e-6, "same shifted two-pass formula on the same upcast pixels, "
                                                   "only the sums' order differs: measured <= 7.2e-7 on "
                                                   "targets below 5 (1.5 ulps there); 4 ulps allowed"),
    ("targets", torch.float32, "cuda"): (1e-5, 1e-5, "as on CPU, and torch's CUDA mean/var sum in yet another "
                                                    "order; not measured on a GPU since div_rn/sqrt_rn"),
    ("gather", torch.float32, "cpu"): (1e-6, 1e-6, "unmix gathers tokens and adds one position embedding: exact up "
                                                  "to the rounding of that one add"),
    ("gather", torch.bfloat16, "cpu"): (1e-2, 1e-2, "the one add rounded to bf16's 8-bit mantissa (eps 3.9e-3)"),
    ("reference", torch.bfloat16, "cpu"): (2e-2, 2e-2, "a PyTorch reference in bf16 rounds at several points (scores, "
                                                      "softmax, P@V: 2^-8 relative each)"),
    # Triton's interpreter miscomputes native bf16/fp16 math, so on CPU the kernels compute in fp32 and
    # round once at the end: one rounding of the output's dtype (bf16 eps 2**-8, fp16 eps 2**-11).
    ("out", torch.bfloat16, "cpu"): (1e-2, 1e-2, "one bf16 rounding of each side (eps 3.9e-3), twice over"),
    ("grad", torch.bfloat16, "cpu"): (1e-2, 1e-2, "one bf16 rounding of each side (eps 3.9e-3), twice over"),
    ("out", torch.float16, "cpu"): (2e-3, 2e-3, "one fp16 rounding of each side (eps 4.9e-4), twice over"),
    ("grad", torch.float16, "cpu"): (2e-3, 2e-3, "one fp16 rounding of each side (eps 4.9e-4), twice over"),
    # On a GPU the operands of every dot are bf16/fp16 (tensor cores, fp32 accumulation): P = softmax is
    # rounded to the input dtype before P @ V, and backward recomputes P and rounds dS as well.
    ("out", torch.bfloat16, "cuda"): (2e-2, 2e-2, "bf16 operands in both dots (P rounded before P@V)"),
    ("grad", torch.bfloat16, "cuda"): (5e-2, 5e-2, "bf16 P and dS recomputed and rounded in the backward"),
    ("out", torch.float16, "cuda"): (4e-3, 4e-3, "fp16 operands in both dots (P rounded before P@V)"),
    ("grad", torch.float16, "cuda"): (5e-3, 5e-3, "fp16 P and dS recomputed and rounded in the backward"),
    # unmix kernel against its reference in the same dtype, inputs randn (|values| < 8); the same on CPU
    # (interpreter) and GPU: the kernel does one fp32 add and rounds once, the reference rounds before it
    **{("unmix_out", dt, dev): v for dev in ("cpu", "cuda") for dt, v in {
        torch.float32: (0.0, 0.0, "the same single fp32 add: exact"),
        torch.bfloat16: (1.6e-2, 2 ** -4, "the reference rounds mask_token and dec_pos to bf16 before the add, "
                                          "the kernel once after: up to 2 ulps of an input below 8 (2^-5 each)"),
        torch.float16: (2e-3, 2 ** -7, "as bf16 with fp16's ulp below 8 (2^-8)"),
    }.items()},
    **{("unmix_grad", dt, dev): v for dev in ("cpu", "cuda") for dt, v in {
        torch.float32: (1e-6, 1e-5, "token gradients are copies; the CLS a sum of r rows and the mask-token "
                                    "gradient an fp32 sum in another order (~1e-7 relative on ~100 unit values)"),
        torch.bfloat16: (1.6e-2, 1e-5, "the reference rounds the CLS and mask-token sums to bf16 (half an ulp)"),
        torch.float16: (2e-3, 1e-5, "the reference rounds the CLS and mask-token sums to fp16 (half an ulp)"),
    }.items()},
    **{("selfcheck", torch.float32, dev): (1e-4, 1e-4, "the kernels' start-up check that they run correctly on "
                                                       "this card, not a precision test: room for GPU exp/rsqrt "
                                                       "approximations on targets of images near 1000 (a wrong "
                                                       "kernel misses by O(1))") for dev in ("cpu", "cuda")},
    **{("fp64_oracle", torch.float32, dev): (1e-5, 1e-5, "an fp32 result (norm-pix targets of values ~3, the "
                                                         "unmix mask-token gradient summed over ~100 rows) "
                                                         "against a float64 formula: fp32 rounding and "
                                                         "accumulation order") for dev in ("cpu", "cuda")},
}


def tol(dtype: torch.dtype, device: torch.device | str = "cpu", kind: str = "out") -> dict[str, float]:
    """``dict(rtol=, atol=)`` for comparing a ``dtype`` result on ``device`` (``kind``: out | grad | hc | kernel |
    targets | gather | reference | unmix_out | unmix_grad | fp64_oracle | selfcheck)."""
    dev = torch.device(device).type
    key = (kind, dtype, dev)
    if key not in TABLE:
        raise KeyError(f"no tolerance for {key}: add a row with its reason to mixedae_fast/tolerances.py")
    rtol, atol, _ = TABLE[key]
    return dict(rtol=rtol, atol=atol)
