"""The Triton unmix kernels (issue 4): ``unmix_triton`` against ``unmix_reference``, and the model's
``kernels`` switch.

Runs compiled on CUDA and through Triton's interpreter on CPU: odd shapes (B = r, r*n < N, r = 1, D
not a power of two and over one channel block, N + 1 over several row blocks) in fp32, bf16 and
fp16; outputs and every gradient; a bitwise-reproducible backward; the model's loss and gradients with
``kernels=triton`` vs ``torch`` (and from ``--runtime.kernels=triton``); ViT-B/16 shapes on a GPU.
"""
import warnings

import pytest
import torch
from tolerances import tol

from mixedae_fast.config import load_config
from mixedae_fast.kernels.assignment import draw_assignment
from mixedae_fast.kernels.unmix import unmix, unmix_reference, unmix_triton
from mixedae_fast.model.mixedae import MixedAutoencoderViT, build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tolerances: mixedae_fast/tolerances.py (unmix_out, unmix_grad; fp64_oracle for the mask-token gradient's
# float64 sum), with their reasons.

# (G, r, n, N, D)
SHAPES = [
    (1, 4, 6, 25, 24),     # B = r (G = 1); r*n = 24 < N = 25; D not a power of two
    (2, 3, 2, 9, 40),      # r*n = 6 < N = 9
    (3, 1, 4, 16, 32),     # r = 1 (MAE)
    (2, 2, 12, 49, 160),   # 50 rows: 16-row blocks, the last ragged; D = 160: 128 + 32 fwd, 64+64+32 bwd
]


def _inputs(G, r, n, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dec_tokens = torch.randn(G, 1 + r * n, D, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    mask_token = torch.randn(1, 1, D, generator=g).to(DEVICE).requires_grad_(True)  # fp32, as the model's
    dec_pos = torch.randn(1, N + 1, D, generator=g).to(DEVICE)
    upstream = torch.randn(G * r, N + 1, D, generator=g).to(dtype).to(DEVICE)
    ids = draw_assignment(G, N, r, n, seed=seed, step=1, device=DEVICE)
    return dec_tokens, ids, mask_token, dec_pos, upstream


def _run(fn, dec_tokens, ids, mask_token, dec_pos, upstream, r):
    dec_tokens.grad = mask_token.grad = None
    out = fn(dec_tokens, ids, mask_token, dec_pos, r)
    out.backward(upstream)
    return out.detach(), dec_tokens.grad.clone(), mask_token.grad.clone()


# On a GPU each new shape and dtype compiles the kernels: there two shapes (G = 1; several row and channel
# blocks) in fp32 and bf16 keep these tests under a minute; the interpreter sweeps all.
ON_GPU = torch.cuda.is_available()
SWEEP = [SHAPES[0], SHAPES[3]] if ON_GPU else SHAPES
SWEEP_DTYPES = DTYPES[:2] if ON_GPU else DTYPES


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=str)
@pytest.mark.parametrize("G,r,n,N,D", SWEEP)
def test_kernel_matches_reference(G, r, n, N, D, dtype):
    args = _inputs(G, r, n, N, D, dtype)
    dec_tokens, ids, mask_token, dec_pos, upstream = args
    out, g_tok, g_mask = _run(unmix_triton, *args, r)
    ref_out, ref_tok, ref_mask = _run(unmix_reference, *args, r)
    t_out, t_grad = tol(dtype, DEVICE, "unmix_out"), tol(dtype, DEVICE, "unmix_grad")
    assert out.dtype == dtype and g_tok.dtype == dtype and g_mask.dtype == torch.float32
    assert g_mask.shape == mask_token.shape
    torch.testing.assert_close(out, ref_out, **t_out)
    torch.testing.assert_close(g_tok, ref_tok, **t_grad)
    torch.testing.assert_close(g_mask, ref_mask, **t_grad)
    # exact: one fp32 add, rounded once to the dtype
    with torch.no_grad():
        assert torch.equal(out, unmix_reference(dec_tokens.float(), ids, mask_token, dec_pos, r).to(dtype))
    # the mask-token gradient: every masked row's gradient, summed (float64 oracle)
    masked = torch.ones(G, r, N, dtype=torch.bool, device=DEVICE)
    masked.scatter_(2, ids.view(G, r, n).long(), False)
    want = upstream[:, 1:].double()[masked.view(G * r, N)].sum(0)
    torch.testing.assert_close(g_mask.reshape(D).double(), want, **tol(torch.float32, DEVICE, "fp64_oracle"))


def test_no_gradient_to_dec_pos_and_flat_mask_token():
    dec_tokens, ids, mask_token, dec_pos, upstream = _inputs(2, 3, 2, 9, 40, torch.float32)
    dec_pos.requires_grad_(True)
    flat = mask_token.detach().reshape(-1).requires_grad_(True)
    unmix_triton(dec_tokens, ids, flat, dec_pos, 3).backward(upstream)
    assert dec_pos.grad is None and flat.grad.shape == flat.shape


def test_backward_is_bitwise_reproducible():
    args = _inputs(2, 2, 12, 49, 160, torch.bfloat16)
    first = _run(unmix_triton, *args, 2)
    second = _run(unmix_triton, *args, 2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_backend_switch_and_errors():
    dec_tokens, ids, mask_token, dec_pos, _ = _inputs(1, 4, 6, 25, 24, torch.float32)
    with torch.no_grad():
        want = unmix_reference(dec_tokens, ids, mask_token, dec_pos, 4)
        for backend in ("auto", "triton", "torch"):
            assert torch.equal(unmix(dec_tokens, ids, mask_token, dec_pos, 4, backend=backend), want)
        with pytest.raises(ValueError, match="kernels='fast' is not one of"):
            unmix(dec_tokens, ids, mask_token, dec_pos, 4, backend="fast")
        with pytest.raises(ValueError, match="do not fit group_size"):
            unmix_triton(dec_tokens[:, :-1], ids, mask_token, dec_pos, 4)


# -- the model's kernels switch -------------------------------------------------------------------
def _tiny(**kw):
    # eager attention: this pins the kernels switch, so the attention must not move between two runs (on a
    # GPU `auto` takes compiled flex for TopK, which recomputes its scores in another order than the
    # threshold's and is not promised bitwise run to run)
    cfg = dict(img_size=20, patch_size=4, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=40,
               decoder_depth=1, decoder_num_heads=4, mlp_ratio=2.0, group_size=2, mask_ratio=0.7,
               attention_backend="eager")
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MixedAutoencoderViT(**cfg).to(DEVICE)


@pytest.fixture
def _fp32_matmuls():
    """True fp32 matmuls on a GPU (TF32 would round the operands to 10 bits and turn a last-bit difference
    from a kernel into a 1e-3 one)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.usefixtures("_fp32_matmuls")
@pytest.mark.parametrize("kw", [dict(), dict(group_size=1, ha="none", hc_weight=0.0), dict(norm_pix_loss=False)],
                         ids=["mixed", "mae", "raw_pixels"])
def test_model_loss_and_grads_same_on_both_backends(kw):
    """One flag, the same module: kernels=triton gives the loss and gradients of kernels=torch (fp32). A
    second torch run first shows the model itself repeats on this device, so a failure is the kernels'."""
    torch.manual_seed(0)
    model = _tiny(kernels="torch", **kw)
    with torch.no_grad():
        model.mask_token.normal_()  # unequal mask-token entries, so its gradient is checked entrywise
    images = torch.randn(4, 3, 20, 20, device=DEVICE)
    results = []
    for kernels in ("torch", "torch", "triton"):
        model.kernels = kernels
        model.zero_grad(set_to_none=True)
        out = model(images, seed=1, step=2)
        out["loss"].backward()
        results.append((out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), control, (got, got_grads) = results
    runs = (("the model run twice with kernels=torch", control), ("kernels=triton", (got, got_grads)))
    for what, (out, grads) in runs:
        assert torch.equal(out["ids"], ref["ids"]) and torch.equal(out["loss_mask"], ref["loss_mask"]), what
        torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-6, atol=1e-6, msg=what)
        torch.testing.assert_close(out["pred"], ref["pred"], rtol=1e-5, atol=1e-5, msg=what)
        assert grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")


def test_config_threads_kernels_into_the_model():
    cfg = load_config("cpu_tiny", ["--runtime.kernels=triton"])
    assert cfg.runtime.kernels == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_model(cfg).kernels == "triton"
    with pytest.raises(ValueError, match="kernels='cuda' is not one of auto, triton, torch"):
        _tiny(kernels="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_vit_base_shapes_on_gpu(dtype):
    """ViT-B/16 decoder input: B = 256 sources, r = 4, N = 196, n = 49, D = 512."""
    G, r, n, N, D = 64, 4, 49, 196, 512
    args = _inputs(G, r, n, N, D, dtype)
    out, g_tok, g_mask = _run(unmix_triton, *args, r)
    ref_out, ref_tok, ref_mask = _run(unmix_reference, *args, r)
    t_grad = tol(dtype, DEVICE, "unmix_grad")
    torch.testing.assert_close(out, ref_out, **tol(dtype, DEVICE, "unmix_out"))
    torch.testing.assert_close(g_tok, ref_tok, **t_grad)
    # ~37K masked rows summed: fp32 ordering error grows with the count
    torch.testing.assert_close(g_mask, ref_mask, rtol=max(t_grad["rtol"], 1e-5), atol=1e-3)
