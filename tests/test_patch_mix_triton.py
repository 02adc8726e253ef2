"""The Triton patch_mix and assignment kernels (issue 4) against ``patch_mix_reference`` and the torch
``draw_assignment``.

Runs compiled on CUDA and through Triton's interpreter on CPU (conftest sets ``TRITON_INTERPRET=1``
before the kernel modules import): odd shapes (B = r so G = 1, N not a multiple of the position
block, r*n < N, grids of 3x3 and 5x5, patches of 4, 8 and 16, r = 1, 2, 3, 4) in fp32, bf16 and fp16;
strided images and padding that must never be read; determinism; the backend switch and its errors;
the assignment kernel bitwise against the torch draw; ViT-B/16 shapes on a GPU.
"""
import pytest
import torch

import mixedae_fast.kernels.patch_mix as pm
from mixedae_fast.kernels.patch_mix import draw_assignment, patch_mix, patch_mix_forward, patch_mix_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The mixed patches and the loss mask are copies: exact in every dtype (compared with torch.equal).
# The targets are fp32 whatever the image dtype: the same formula on the same exactly-upcast pixels,
# only the order of the mean/variance sums differs (tree in a tile vs torch's), ~1e-7 relative on
# values of size ~3; the bound leaves room for a GPU's approximate fp32 division and sqrt.
TOL = {dtype: dict(targets=dict(rtol=1e-5, atol=1e-5)) for dtype in DTYPES}

# (B, S, P, r, mask_ratio): N positions, n = int(N * (1 - mask_ratio)) visible per source
SHAPES = [
    (4, 20, 4, 4, 0.75),   # B = r (G = 1); 5x5 grid: N = 25 in blocks of 16, n = 6, r*n = 24 < N
    (6, 24, 8, 3, 0.75),   # 3x3 grid of 8 px patches (3P² = 192): N = 9 in blocks of 4, r*n = 6 < N
    (4, 48, 16, 2, 0.6),   # 3P² = 768 (one patch a program), n = 3, r*n = 6 < N = 9
    (3, 20, 4, 1, 0.75),   # r = 1: MAE's random masking
    (8, 16, 4, 4, 0.75),   # r*n = N: nothing dropped
]


def _images(B, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, S, S, generator=g).to(dtype).to(DEVICE)


def _case(B, S, P, r, mask_ratio, dtype, seed=0):
    N = (S // P) ** 2
    n = int(N * (1 - mask_ratio))
    return _images(B, S, dtype, seed), draw_assignment(B // r, N, r, n, seed=seed, step=3, device=DEVICE), n


def _assert_matches(got, want, dtype):
    mixed, targets, loss_mask = got
    assert mixed.dtype == dtype and targets.dtype == torch.float32 and loss_mask.dtype == torch.bool
    assert torch.equal(mixed, want[0]), "mixed patches are a copy: must be exact"
    assert torch.equal(loss_mask, want[2]), "loss mask must be exact"
    torch.testing.assert_close(targets, want[1], **TOL[dtype]["targets"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,S,P,r,mask_ratio", SHAPES)
def test_kernel_matches_reference(B, S, P, r, mask_ratio, dtype):
    images, ids, n = _case(B, S, P, r, mask_ratio, dtype)
    got = patch_mix_forward(images, ids, r, n, P)
    _assert_matches(got, patch_mix_reference(images, ids, r, n, P), dtype)
    assert not got[1].requires_grad and torch.isfinite(got[1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_raw_targets_without_norm_pix(dtype):
    images, ids, n = _case(6, 24, 8, 3, 0.75, dtype)
    got = patch_mix_forward(images, ids, 3, n, 8, norm_pix=False)
    want = patch_mix_reference(images, ids, 3, n, 8, norm_pix=False)
    _assert_matches(got, want, dtype)
    assert torch.equal(got[1], want[1]), "raw targets are an exact upcast"


def test_strided_images_and_padding_never_read():
    """Images as a view into a NaN-filled buffer (the kernel reads strides, never a copy) and in
    channels_last: the same outputs, and no NaN leaks from outside the view."""
    B, S, P, r = 4, 20, 4, 2
    images, ids, n = _case(B, S, P, r, 0.6, torch.float32)
    want = patch_mix_reference(images, ids, r, n, P)
    big = torch.full((B, 4, S + 3, S + 5), float("nan"), device=DEVICE)
    big[:, 1:, 2:2 + S, 1:1 + S] = images
    view = big[:, 1:, 2:2 + S, 1:1 + S]
    assert not view.is_contiguous()
    for x in (view, images.contiguous(memory_format=torch.channels_last)):
        _assert_matches(patch_mix_forward(x, ids, r, n, P), want, torch.float32)


def test_constant_patches_stay_finite():
    """A constant patch has variance 0: eps keeps the target at 0 (as MAE), never NaN."""
    images, ids, n = _case(2, 16, 4, 2, 0.5, torch.float32)
    images[:, :, :4, :4] = 0.25
    mixed, targets, _ = patch_mix_forward(images, ids, 2, n, 4)
    assert torch.isfinite(targets).all() and torch.equal(targets[:, 0], torch.zeros_like(targets[:, 0]))
    _assert_matches((mixed, targets, _), patch_mix_reference(images, ids, 2, n, 4), torch.float32)


# (G, N, r, n, seed, step, first_group)
ASSIGNMENTS = [
    (4, 196, 4, 49, 0, 0, 0),                  # ViT-B/16: N = 196 over 7 chunks of 32 keys
    (3, 25, 2, 7, 12345678901234, 99, 5),      # r*n = 14 < N: 11 dropped; a seed past 2**32
    (5, 16, 3, 4, 2 ** 40 + 3, 2 ** 33, 2 ** 32 - 2),  # global group indices wrap past 2**32
    (6, 9, 1, 2, 1, 2, 3),                     # r = 1
    (2, 50, 4, 1, 7, 7, 2 ** 31 - 1),          # n = 1; first_group at the int32 limit
]


@pytest.mark.parametrize("G,N,r,n,seed,step,first_group", ASSIGNMENTS)
def test_assignment_kernel_is_bitwise_the_torch_draw(G, N, r, n, seed, step, first_group):
    want = draw_assignment(G, N, r, n, seed, step, first_group, device=DEVICE, backend="torch")
    got = draw_assignment(G, N, r, n, seed, step, first_group, device=DEVICE, backend="triton")
    assert got.dtype == torch.int32 and torch.equal(got, want)


def test_same_input_gives_bitwise_same_output():
    images, ids, n = _case(6, 24, 8, 3, 0.75, torch.bfloat16)
    first = patch_mix_forward(images, ids, 3, n, 8)
    second = patch_mix_forward(images, ids, 3, n, 8)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_backend_switch():
    images, ids, n = _case(4, 20, 4, 2, 0.6, torch.float32)
    want = patch_mix_reference(images, ids, 2, n, 4)
    for backend in ("auto", "triton", "torch"):
        _assert_matches(patch_mix(images, ids, 2, n, 4, backend=backend), want, torch.float32)
    assert pm.use_triton("auto", images, ids) == (images.is_cuda and pm.kernels_verified(images.device))
    assert pm.use_triton("triton", images, ids) and not pm.use_triton("torch", images, ids)
    with pytest.raises(ValueError, match="kernels='cuda' is not one of auto, triton, torch"):
        patch_mix(images, ids, 2, n, 4, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error path")
def test_triton_on_cpu_without_interpreter_fails_clearly(monkeypatch):
    images, ids, n = _case(4, 20, 4, 2, 0.6, torch.float32)
    monkeypatch.setattr(pm, "_interpreted", lambda kernel: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        patch_mix(images, ids, 2, n, 4, backend="triton")
    assert pm.use_triton("auto", images, ids) is False  # auto never needs the interpreter


def test_self_check_passes_on_this_device():
    device = torch.device(DEVICE)
    assert pm._self_check(device) is None


def test_auto_takes_the_kernels_on_cuda_only_after_the_self_check(monkeypatch):
    asked = []
    monkeypatch.setattr(pm, "kernels_verified", lambda device: asked.append(device) or len(asked) > 1)
    cuda = torch.device("cuda", 0)
    assert pm.use_triton("auto", cuda) is False and asked == [cuda]   # check failed: the reference
    assert pm.use_triton("auto", cuda) is True                         # check passed: the kernels
    assert pm.use_triton("auto", torch.device("cpu")) is False and len(asked) == 2  # CPU: never asked


def test_failed_self_check_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(pm, "_VERIFIED", {})
    broken = lambda images, ids, r, n, P, norm_pix=True: [t + 1 for t in pm.patch_mix_reference(images, ids, r, n, P)]
    monkeypatch.setattr(pm, "patch_mix_forward", broken)
    with pytest.warns(RuntimeWarning, match=r"failed their self-check on cpu \(patch_mix: mixed patches"):
        assert pm.kernels_verified(torch.device("cpu")) is False
    assert pm.kernels_verified(torch.device("cpu")) is False             # cached: no second check or warning
    monkeypatch.setattr(pm, "_self_check", lambda device: 1 / 0)
    with pytest.warns(RuntimeWarning, match="ZeroDivisionError"):
        assert pm.kernels_verified(torch.device("meta")) is False
    monkeypatch.setenv("MIXEDAE_KERNEL_SELFCHECK", "0")
    assert pm.kernels_verified(torch.device("cuda", 1)) is True


def test_launcher_errors():
    images, ids, n = _case(6, 16, 4, 3, 0.75, torch.float32)
    with pytest.raises(ValueError, match="not a multiple of the group size 4"):
        patch_mix_forward(images, ids, 4, n, 4)
    with pytest.raises(ValueError, match="ids has shape"):
        patch_mix_forward(images, ids[:, :-1], 3, n, 4)
    with pytest.raises(ValueError, match="S % 5 == 0"):
        patch_mix_forward(images, ids, 3, n, 5)


@pytest.mark.gpu
def test_assignment_kernel_at_vit_base_shapes_on_gpu():
    for step in range(20):
        want = draw_assignment(64, 196, 4, 49, seed=3, step=step, first_group=64 * step, device="cuda",
                               backend="torch")
        assert torch.equal(draw_assignment(64, 196, 4, 49, seed=3, step=step, first_group=64 * step,
                                           device="cuda", backend="triton"), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_vit_base_shapes_on_gpu(dtype):
    B, S, P, r = 256, 224, 16, 4
    images, ids, n = _case(B, S, P, r, 0.75, dtype)
    assert n == 49
    _assert_matches(patch_mix_forward(images, ids, r, n, P), patch_mix_reference(images, ids, r, n, P), dtype)
