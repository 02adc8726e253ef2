"""The fused TopK kernel (issue 5): ``homologous_attention_triton`` (a custom op) against
``homologous_attention_reference``.

Runs compiled on CUDA and through Triton's interpreter on CPU: odd L (13, 17, 65, 66, one 197), head
dims that are not a power of two, K = 1 and K = r*n, r = 1; fp32, bf16 and fp16; the output, the HC
row terms and every q/k/v gradient (through both at once, and through the HC rows alone); ties at the
K-th value; the CLS rows and column; rows whose scores are all equal (no NaN); strided q/k/v views;
a bitwise-reproducible forward and backward; errors; ViT-B/16 and ViT-L shapes on a GPU.

Inputs are multiples of 1/4 of size < 4 (exact in bf16 and fp16): every score is then exact in fp32
whatever the summation order, so the kernel and the reference make the *same* selection (docs/method.md §3:
"tests that compare paths use well-separated scores or share the selection"), and ties at the K-th
value are common — every case exercises the tie rule.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tolerances import tol

import mixedae_fast.kernels.homologous_attention as ha
from mixedae_fast import measured
from mixedae_fast.kernels.homologous_attention import (
    homologous_attention,
    homologous_attention_reference,
    homologous_attention_triton,
    topk_keep_mask,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = DEVICE == "cuda"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The fp32 reference on one CPU thread. With two, torch's reductions over ViT-B's 196 x 196 patch
    scores came out differently from call to call when the interpreter ran in between (seen: the HC
    rows' log-sum-exps 6.5e-6 apart, against the kernel row's 2e-6 tolerance, in about a third of runs);
    on one thread the reference is the same every call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tol(dtype, kind="out"):
    """Tolerances from mixedae_fast/tolerances.py. fp32 (and the HC rows, fp32 in every dtype): the kernel's
    own row, sized from measurement. bf16 / fp16: the reference rounds its fp32 output once; under the
    interpreter the kernel computes in fp32 and rounds once too; on a GPU it also rounds P (forward)
    and dS, P (backward) to the input dtype before the tensor-core dots, as flash attention does."""
    if dtype == torch.float32 or kind == "hc":
        return tol(torch.float32, DEVICE, "kernel")
    return tol(dtype, DEVICE, kind)


# (G, H, r, n, d, K): L = 1 + r*n
SHAPES = [
    (2, 2, 4, 4, 16, 4),     # L = 17: one query block, keys padded to 32
    (1, 2, 4, 16, 24, 16),   # L = 65: keys padded to 128 (one or two backward key blocks), d = 24 padded to 32
    (2, 1, 3, 4, 8, 1),      # K = 1, d = 8 (below tl.dot's 16: padded)
    (1, 3, 5, 13, 16, 65),   # L = 66, K = r*n: every patch key (global attention)
    (2, 2, 1, 12, 16, 5),    # r = 1 (MAE's sequence; HC has no positives)
]
# the whole sweep under the interpreter; on a GPU every (shape, dtype) is a compile: three of them
CASES = ([(SHAPES[0], torch.bfloat16), (SHAPES[1], torch.float32), (SHAPES[3], torch.float16)] if CUDA
         else [(shape, dtype) for shape in SHAPES for dtype in DTYPES])


def _quantised(shape, gen, scale=4):
    return (torch.randn(shape, generator=gen) * scale).round().div(scale).clamp(-3.75, 3.75)


def _case(G, H, r, n, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = 1 + r * n
    q, k, v = (_quantised((G, H, L, d), gen).to(dtype).to(DEVICE).requires_grad_(True) for _ in range(3))
    up_out = torch.randn(G, H, L, d, generator=gen).to(DEVICE)
    up_hc = torch.randn(G, H, L - 1, 2, generator=gen).to(DEVICE)
    return q, k, v, torch.arange(r, device=DEVICE).repeat_interleave(n), up_out, up_hc


def _grads(fn, q, k, v, src, K, up_out, up_hc, hc=True):
    out, hc_rows = fn(q, k, v, src, K, hc)
    loss = (out.float() * up_out).sum() + ((hc_rows * up_hc).sum() if hc else 0)
    return out.detach(), (hc_rows.detach() if hc else None), torch.autograd.grad(loss, (q, k, v))


def _kernel(q, k, v, src, K, hc):
    return homologous_attention_triton(q, k, v, src, K, hc)


def _assert_matches(got, want, dtype):
    """``(out, hc_rows, grads)`` of the kernel against the reference's, at the dtype's tolerances."""
    (out, hc_rows, grads), (ref, ref_hc, ref_grads) = got, want
    torch.testing.assert_close(out, ref, **_tol(dtype))
    torch.testing.assert_close(hc_rows, ref_hc, **_tol(dtype, "hc"))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **_tol(dtype, "grad"))


@pytest.mark.parametrize("shape,dtype", CASES, ids=str)
def test_kernel_matches_reference(shape, dtype):
    G, H, r, n, d, K = shape
    q, k, v, src, up_out, up_hc = _case(G, H, r, n, d, dtype)
    out, hc_rows, grads = _grads(_kernel, q, k, v, src, K, up_out, up_hc)
    ref, ref_hc, ref_grads = _grads(homologous_attention_reference, q, k, v, src, K, up_out, up_hc)
    assert out.dtype == dtype and hc_rows.dtype == torch.float32 and tuple(hc_rows.shape) == (G, H, r * n, 2)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    torch.testing.assert_close(hc_rows, ref_hc, **_tol(dtype, "hc"))
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **_tol(dtype, "grad"), msg=lambda m, name=name: f"d{name}: {m}")


def test_one_sequence_of_197_tokens():
    """ViT-B/16's mixed sequence (r = 4, n = 49): keys padded to 256 in one tile, 7 query blocks."""
    q, k, v, src, up_out, up_hc = _case(1, 1, 4, 49, 16, torch.float32, seed=3)
    _assert_matches(_grads(_kernel, q, k, v, src, 49, up_out, up_hc),
                    _grads(homologous_attention_reference, q, k, v, src, 49, up_out, up_hc), torch.float32)


def test_gradient_through_the_hc_rows_alone_and_without_hc():
    q, k, v, src, up_out, up_hc = _case(2, 2, 3, 4, 16, torch.float32, seed=1)
    _, hc_rows = homologous_attention_triton(q, k, v, src, 3, True)
    got = torch.autograd.grad((hc_rows * up_hc).sum(), (q, k, v), allow_unused=True)
    _, ref_hc = homologous_attention_reference(q, k, v, src, 3, True)
    want = torch.autograd.grad((ref_hc * up_hc).sum(), (q, k, v), allow_unused=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, torch.zeros_like(q) if b is None else b, **_tol(torch.float32, "grad"))
    # hc=False: no HC rows, the gradient of the attention alone
    out, none = homologous_attention(q, k, v, src, 3, hc=False, backend="triton")
    assert none is None
    ref, _, ref_grads = _grads(homologous_attention_reference, q, k, v, src, 3, up_out, up_hc, hc=False)
    torch.testing.assert_close(out, ref, **_tol(torch.float32))
    for a, b in zip(torch.autograd.grad((out * up_out).sum(), (q, k, v)), ref_grads, strict=True):
        torch.testing.assert_close(a, b, **_tol(torch.float32, "grad"))


def test_ties_at_the_kth_value_are_kept_and_cls_handled():
    """v = identity: the output rows are the attention weights, so the kept set is visible.
    Integer q, k with every patch key twice: the K-th value of an odd K always has a tie beyond K."""
    gen = torch.Generator().manual_seed(2)
    G, H, r, n = 2, 2, 2, 4
    L = 1 + r * n
    distinct = torch.randint(-2, 3, (G, H, 4, 16), generator=gen).float()
    k = torch.cat([torch.randint(-2, 3, (G, H, 1, 16), generator=gen).float(),
                   distinct.repeat_interleave(2, dim=2)], dim=2)
    q = torch.randint(-2, 3, (G, H, L, 16), generator=gen).float() / 4
    v = torch.eye(L, 16).expand(G, H, L, 16).contiguous()
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    src = torch.arange(r, device=DEVICE).repeat_interleave(n)
    for K in (1, 3, 5, 8):
        w, _ = homologous_attention_triton(q, k, v, src, K, False)
        ref, _ = homologous_attention_reference(q, k, v, src, K)
        torch.testing.assert_close(w, ref, **_tol(torch.float32))
        s = (q @ k.transpose(-2, -1)) * 0.25
        keep = topk_keep_mask(s[..., 1:, 1:], K)
        assert torch.equal(w[..., 1:, 1:L] > 0, keep), "kept patch keys differ from the tie rule"
        if K % 2:  # the K-th value's duplicate sits at K + 1
            assert (keep.sum(-1) >= K + 1).all(), "a duplicate of the K-th key was dropped"
        assert (w[..., 1:, 0] > 0).all(), "every patch query keeps the CLS key"
        assert (w[..., 0, :L] > 0).all(), "the CLS query sees every key"
        torch.testing.assert_close(w[..., :L].sum(-1), torch.ones(G, H, L, device=DEVICE), **_tol(torch.float32))


@pytest.mark.parametrize("which", ["q_zero", "k_constant"])
def test_rows_of_equal_scores_give_no_nan(which):
    """All of a row's scores equal: every patch key ties with the K-th, all are kept (the mean of v)."""
    q, k, v, src, up_out, up_hc = _case(1, 2, 3, 5, 16, torch.float32, seed=4)
    with torch.no_grad():
        if which == "q_zero":
            q.zero_()
        else:
            k.copy_(k[:, :, :1].expand_as(k))
    out, hc_rows, grads = _grads(_kernel, q, k, v, src, 2, up_out, up_hc)
    ref, ref_hc, ref_grads = _grads(homologous_attention_reference, q, k, v, src, 2, up_out, up_hc)
    assert all(torch.isfinite(t).all() for t in (out, hc_rows, *grads))
    torch.testing.assert_close(out, ref, **_tol(torch.float32))
    torch.testing.assert_close(hc_rows, ref_hc, **_tol(torch.float32, "hc"))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **_tol(torch.float32, "grad"))


def test_strided_views_as_the_module_makes_them():
    """q, k, v as the attention module slices them out of one qkv projection (not contiguous)."""
    gen = torch.Generator().manual_seed(5)
    G, H, r, n, d = 2, 2, 3, 4, 16
    L = 1 + r * n
    qkv = _quantised((G, L, 3, H, d), gen).to(DEVICE).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    src = torch.arange(r, device=DEVICE).repeat_interleave(n)
    up_out = torch.randn(G, H, L, d, generator=gen).to(DEVICE)
    out, hc_rows = homologous_attention_triton(q, k, v, src, 4, True)
    grad = torch.autograd.grad((out * up_out).sum() + hc_rows.sum(), qkv)[0]
    ref, ref_hc = homologous_attention_reference(q, k, v, src, 4, True)
    ref_grad = torch.autograd.grad((ref * up_out).sum() + ref_hc.sum(), qkv)[0]
    torch.testing.assert_close(out, ref, **_tol(torch.float32))
    torch.testing.assert_close(grad, ref_grad, **_tol(torch.float32, "grad"))


def test_forward_and_backward_are_bitwise_reproducible():
    args = _case(2, 2, 4, 16, 16, torch.bfloat16, seed=6)
    first = _grads(_kernel, *args[:4], 16, *args[4:])
    second = _grads(_kernel, *args[:4], 16, *args[4:])
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2], strict=True):
        assert torch.equal(a, b)


def test_errors():
    q = torch.zeros(1, 1, 258, 16, device=DEVICE)
    src = torch.zeros(257, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="L <= 256"):
        homologous_attention_triton(q, q, q, src, 4, False)
    q = torch.zeros(1, 1, 9, 16, device=DEVICE)
    with pytest.raises(ValueError, match="need L-1 = 8 and 1 <= topk"):
        homologous_attention_triton(q, q, q, src[:8], 9, False)
    with pytest.raises(ValueError, match="need L-1 = 8"):
        homologous_attention_triton(q, q, q, src[:7], 2, False)
    with pytest.raises(ValueError, match="share one shape"):
        homologous_attention_triton(q, q[..., :8], q, src[:8], 2, False)


@pytest.mark.parametrize("hc_heads", [1] if CUDA else [1, 2])   # on a GPU each value is a compile
def test_hc_rows_of_the_first_heads_only(hc_heads):
    """``hc_heads`` (the loss's heads; the default config trains head 0 only): the rows of those heads,
    equal to the reference's, and gradients in which the other heads get none of the HC terms (the
    kernels skip their HC work in both passes). On a GPU: one compile, bf16."""
    dtype = torch.bfloat16 if CUDA else torch.float32
    q, k, v, src, up_out, up_hc = _case(2, 3, 4, 4, 16, dtype, seed=4)
    up_hc = up_hc[:, :hc_heads]

    def run(fn):
        out, rows = fn(q, k, v, src, 5, True, hc_heads)
        loss = (out.float() * up_out).sum() + (rows * up_hc).sum()
        return out.detach(), rows.detach(), torch.autograd.grad(loss, (q, k, v))

    got = run(homologous_attention_triton)
    assert tuple(got[1].shape) == (2, hc_heads, 16, 2)
    _assert_matches(got, run(homologous_attention_reference), dtype)
    with pytest.raises(ValueError, match="hc_heads=4: need 1 <= hc_heads <= 3"):
        homologous_attention_triton(q, k, v, src, 5, True, 4)


# -- the forward's tilings and its select ablation -------------------------------------------------
@pytest.mark.parametrize("tiling", sorted(measured.FWD_TILINGS))
def test_every_forward_tiling_computes_the_contract(tiling):
    """Each tiling the bench may time and a card's table may name: ViT-B/16's sequence (L = 197, 2, 4 or
    7 query blocks, the last one partial; quarter-step inputs, so ties at the K-th value), outputs, HC
    rows and every gradient (the backward reads the forward's keep bits and LSE, so it checks those too).
    bf16 on a GPU: one compile a tiling."""
    dtype = torch.bfloat16 if CUDA else torch.float32
    q, k, v, src, up_out, up_hc = _case(2, 2, 4, 49, 16, dtype, seed=5)
    with measured.kernel_variant(tiling):
        got = _grads(_kernel, q, k, v, src, 49, up_out, up_hc)
    _assert_matches(got, _grads(homologous_attention_reference, q, k, v, src, 49, up_out, up_hc), dtype)


@pytest.mark.parametrize("bwd_tiling", sorted(measured.BWD_TILINGS))
def test_every_backward_tiling_computes_the_contract(bwd_tiling):
    """Each backward tiling (one, two, four or eight key blocks at L = 197: dQ summed through the scratch
    rows, or written at once): every gradient, through the output and the HC rows together."""
    dtype = torch.bfloat16 if CUDA else torch.float32
    q, k, v, src, up_out, up_hc = _case(2, 2, 4, 49, 16, dtype, seed=8)
    with measured.kernel_variant(bwd_tiling=bwd_tiling):
        got = _grads(_kernel, q, k, v, src, 49, up_out, up_hc)
    _assert_matches(got, _grads(homologous_attention_reference, q, k, v, src, 49, up_out, up_hc), dtype)


@pytest.mark.parametrize("passes", [0, 1, 2])
def test_rows_the_search_leaves_open_are_finished_exactly(passes, monkeypatch):
    """``MAX_PASSES`` cut short (0: every row, 1-2: most rows still open): the radix search finishes the
    open rows, the settled ones keep theirs, and the keep set is the reference's (quarter-step scores: ties
    at the K-th value in many rows). The 32-step radix select alone (the bench's ``radix-select``) too."""
    monkeypatch.setattr(ha, "MAX_PASSES", passes)
    q, k, v, src, up_out, up_hc = _case(1, 2, 4, 12, 16, torch.float32, seed=9)
    ref = homologous_attention_reference(q, k, v, src, 7, True)
    with torch.no_grad():
        for select in ("search", "radix"):
            with measured.kernel_variant(select=select):
                out, hc_rows = homologous_attention_triton(q, k, v, src, 7, True)
            torch.testing.assert_close(out, ref[0], **_tol(torch.float32))
            torch.testing.assert_close(hc_rows, ref[1], **_tol(torch.float32, "hc"))


def test_select_ablation_keeps_every_patch_key_and_is_scoped():
    """``select="none"`` (the bench's ablation row) is attention over every key, i.e. TopK with K = r*n,
    whatever K it is handed; outside the block the kernel selects again."""
    q, k, v, src, up_out, up_hc = _case(1, 2, 4, 4, 16, torch.float32, seed=2)
    with measured.kernel_variant(select="none"):
        got = _grads(_kernel, q, k, v, src, 3, up_out, up_hc)
    _assert_matches(got, _grads(homologous_attention_reference, q, k, v, src, 16, up_out, up_hc), torch.float32)
    assert measured._VARIANT == {"tiling": None, "select": "search", "bwd_tiling": None}
    out3, _ = homologous_attention_triton(q, k, v, src, 3, False)
    torch.testing.assert_close(out3, homologous_attention_reference(q, k, v, src, 3)[0], **_tol(torch.float32))
    for bad, match in ((dict(tiling="m16w2"), "unknown tiling 'm16w2'; choose from m32w8"),
                       (dict(select="sort"), "unknown select 'sort'; choose from search"),
                       (dict(bwd_tiling="n1m1w1"), "unknown backward tiling 'n1m1w1'; choose from n128m32w8")):
        with pytest.raises(ValueError, match=match):
            with measured.kernel_variant(**bad):
                pass


# -- compiled for a GPU without one ---------------------------------------------------------------
_AOT = textwrap.dedent("""
    from mixedae_fast import measured
    from mixedae_fast.benchmarks.kernel_sass import attention_cases, lower

    # inductor once handed the scale over as a float64: every kernel must still lower (fp32 scores)
    for case in attention_cases(tilings=(measured.DEFAULT_TILING,)):
        lower(**case, scale="fp64")
    print("fp64 scale lowers")
    # specialised as a real launch: 16-byte aligned pointers and strides, so the loads are vectorised
    for dtype, seq in (("bf16", 197), ("fp16", 65), ("fp32", 197)):
        for case in attention_cases(seq, dtype, tilings=(measured.DEFAULT_TILING,)):
            row = lower(**case)
            print(dtype, seq, row["kernel"], row["spill_stores"], row["spill_loads"], row["global"].get("LDG.E.128", 0))
    # every other tiling a card's table may name lowers too (ViT-B bf16); its spills are printed, not judged
    others = tuple(t for t in measured.FWD_TILINGS if t != measured.DEFAULT_TILING)
    bwd = tuple(t for t in measured.BWD_TILINGS if t != measured.DEFAULT_BWD_TILING)
    for case in attention_cases(tilings=others, bwd_tilings=bwd):
        row = lower(**case)
        print("tiling", row["kernel"], row["spill_stores"], row["spill_loads"])
""")


@pytest.mark.skipif(sys.platform != "linux", reason="Triton ships ptxas for Linux only")
def test_kernels_compile_for_sm90_without_spills_in_bf16():
    """The interpreter runs Python: it cannot tell whether a kernel lowers for a GPU. Triton compiles
    for a target without one (its bundled ptxas; benchmarks/kernel_sass.py specialises each kernel as a
    real launch would): both kernels at ViT-B's L = 197, d = 64 for sm_90 in their default tilings (every
    other tiling must at least lower), in bf16 / fp16 without register spills (at most 16 bytes in the
    forward) and with 16-byte loads (fp32's IEEE dots spill a little; they are not the training path), and
    with the softmax scale handed over as a float64 (as inductor once did) still in fp32."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    others = len(measured.FWD_TILINGS) - 1 + len(measured.BWD_TILINGS) - 1
    assert lines[0] == "fp64 scale lowers" and len(lines) == 7 + others, run.stdout
    for line in lines[1:7]:
        dtype, _, kernel, stores, loads, wide = line.split()
        if dtype != "fp32":  # the forward may spill a register or two: ptxas keeps 2 programs an SM that way
            assert int(stores) <= (16 if "fwd" in kernel else 0) and int(wide) > 0, line
    assert [line.split()[1] for line in lines[7:]] == [f"topk_fwd[{t}]" for t in measured.FWD_TILINGS
                                                       if t != measured.DEFAULT_TILING] + \
        [f"topk_bwd[{t}]" for t in measured.BWD_TILINGS if t != measured.DEFAULT_BWD_TILING]


# -- GPU: the shapes that matter --------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("G,H,K", [(64, 12, 49), (16, 16, 1), (16, 12, 196)], ids=["vit_b", "vit_l_k1", "k_all"])
def test_vit_shapes_on_gpu(G, H, K, dtype):
    """ViT-B/16 (and ViT-L's 16 heads): L = 197, d = 64, r = 4, n = 49."""
    q, k, v, src, up_out, up_hc = _case(G, H, 4, 49, 64, dtype, seed=7)
    out, hc_rows, grads = _grads(_kernel, q, k, v, src, K, up_out, up_hc)
    ref, ref_hc, ref_grads = _grads(homologous_attention_reference, q, k, v, src, K, up_out, up_hc)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    torch.testing.assert_close(hc_rows, ref_hc, **_tol(dtype, "hc"))  # exact scores; GPU exp/log approximations
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **_tol(dtype, "grad"))  # bf16: ~200 bf16-rounded dS/P products
