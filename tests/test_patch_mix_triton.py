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
from tolerances import tol

import mixedae_fast.kernels._triton as kt
import mixedae_fast.kernels.patch_mix as pm
from mixedae_fast import measured
from mixedae_fast.kernels.assignment import draw_assignment
from mixedae_fast.kernels.patch_mix import patch_mix, patch_mix_forward, patch_mix_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The mixed patches and the loss mask are copies: exact in every dtype (compared with torch.equal).
# The targets are fp32 whatever the image dtype: mixedae_fast/tolerances.py's "targets" rows.
TARGETS = tol(torch.float32, DEVICE, "targets")

# (B, S, P, r, mask_ratio): N positions, n = int(N * (1 - mask_ratio)) visible per source. Under the
# interpreter a program takes min(row, 1024 / (4 P²)) patches of a patch row.
SHAPES = [
    (4, 20, 4, 4, 0.75),   # B = r (G = 1); 5x5 grid: N = 25 in blocks of 16, n = 6, r*n = 24 < N
    (6, 24, 8, 3, 0.75),   # 3x3 grid of 8 px patches (3P² = 192): N = 9 in blocks of 4, r*n = 6 < N
    (4, 48, 16, 2, 0.6),   # 3P² = 768 (one patch a program), n = 3, r*n = 6 < N = 9
    (3, 20, 4, 1, 0.75),   # r = 1: MAE's random masking
    (8, 16, 4, 4, 0.75),   # r*n = N: nothing dropped
    (2, 40, 8, 2, 0.75),   # rows of 5 patches in blocks of 4: the second block ragged
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
    torch.testing.assert_close(targets, want[1], **TARGETS)


# On a GPU each new shape and dtype compiles the kernel and autotunes it (up to six configs): there a few
# cases keep these tests under a minute (G = 1 with a ragged block, P = 8, r = 1); the interpreter sweeps all.
ON_GPU = torch.cuda.is_available()
SWEEP = [SHAPES[0], SHAPES[1], SHAPES[3]] if ON_GPU else SHAPES
SWEEP_DTYPES = DTYPES[:2] if ON_GPU else DTYPES


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=str)
@pytest.mark.parametrize("B,S,P,r,mask_ratio", SWEEP)
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


@pytest.mark.parametrize("value", [0.25, 1000.1, -37.3])
def test_constant_patches_stay_finite(value):
    """A constant patch has variance 0: eps keeps the target at exactly 0 (as MAE), never NaN, also where
    the value does not sum exactly in fp32 (1000.1 * 48 needs 26 bits) or a GPU divides approximately."""
    images, ids, n = _case(2, 16, 4, 2, 0.5, torch.float32)
    images[:, :, :4, :4] = value
    mixed, targets, _ = patch_mix_forward(images, ids, 2, n, 4)
    assert torch.isfinite(targets).all() and not targets[:, 0].any()
    _assert_matches((mixed, targets, _), patch_mix_reference(images, ids, 2, n, 4), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_targets_far_from_zero_match_float64(dtype):
    """Pixels at 1000 with a spread of 1e-3 (raw 0-255 data, a flat bright sky): the variance is 1e-6, so
    an fp32 mean off by an ulp of the patch's sum (~4e-3 / 48) would move every target by ~0.06."""
    images, ids, n = _case(4, 16, 4, 2, 0.5, torch.float32)
    images = (1000.0 + 1e-3 * images).to(dtype)
    if dtype == torch.bfloat16:  # bf16 keeps no 1e-3 detail at 1000: a spread of a few of its ulps instead
        images = (images.float() + 8.0 * torch.randint(-2, 3, images.shape, device=DEVICE)).to(dtype)
    t = pm.patchify(images.double(), 4)
    want = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    for got in (patch_mix_forward(images, ids, 2, n, 4)[1], patch_mix_reference(images, ids, 2, n, 4)[1]):
        torch.testing.assert_close(got.double(), want, **TARGETS)


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
    if not images.is_cuda:
        assert not pm.use_triton("auto", images, ids)
    assert pm.use_triton("triton", images, ids) and not pm.use_triton("torch", images, ids)
    with pytest.raises(ValueError, match="kernels='cuda' is not one of auto, triton, torch"):
        patch_mix(images, ids, 2, n, 4, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error path")
def test_triton_on_cpu_without_interpreter_fails_clearly(monkeypatch):
    images, ids, n = _case(4, 20, 4, 2, 0.6, torch.float32)
    monkeypatch.setattr(kt, "_interpreted", lambda kernel: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        patch_mix(images, ids, 2, n, 4, backend="triton")
    assert pm.use_triton("auto", images, ids) is False  # auto never needs the interpreter


def test_self_check_passes_on_this_device():
    assert kt._self_check(torch.device(DEVICE)) is None


def test_each_kernel_file_registers_its_check_and_a_late_one_is_run(monkeypatch):
    """_triton imports no kernel file: each registers its own check; one registered after a device was
    checked makes the next decision for that device run the checks again."""
    import mixedae_fast.kernels.unmix  # noqa: F401  (registers "unmix")

    assert {"assignment", "patch_mix", "unmix"} <= set(kt.SELF_CHECKS)
    ran, device = [], torch.device("meta")
    monkeypatch.setattr(kt, "SELF_CHECKS", {"probe": lambda device: ran.append(device) or None})
    kt.reset_self_check()
    try:
        assert kt.kernels_verified(device) and ran == [device]
        assert kt.kernels_verified(device) and ran == [device]          # cached
        kt.register_self_check("late")(lambda device: "differs")
        with pytest.warns(RuntimeWarning, match="late: differs"):
            assert kt.kernels_verified(device) is False
        assert ran == [device, device]
    finally:
        kt.reset_self_check()


def test_auto_follows_the_measured_table_then_the_self_check(monkeypatch):
    """``auto`` asks the table for the op on this card; only a Triton entry runs the self-check."""
    asked = []
    monkeypatch.setattr(kt, "kernels_verified", lambda device: asked.append(device) or len(asked) > 1)
    monkeypatch.setattr(measured, "card", lambda device: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    assert pm.use_triton("auto", cuda, op="patch_mix") is False and asked == []   # measured: the reference
    assert pm.use_triton("auto", cuda, op="unmix") is False and asked == []       # measured: the reference
    assert pm.use_triton("auto", cuda, op="assignment") is False and asked == [cuda]   # check failed: the reference
    assert pm.use_triton("auto", cuda, op="assignment") is True                         # check passed: the kernel
    assert pm.use_triton("auto", torch.device("cpu"), op="assignment") is False and len(asked) == 2  # CPU: never
    monkeypatch.setattr(measured, "card", lambda device: "A card nobody measured")
    assert not any(pm.use_triton("auto", cuda, op=op) for op in kt.KERNEL_OPS) and len(asked) == 2
    with pytest.raises(ValueError, match="op 'mix' is not one of assignment, patch_mix, unmix"):
        pm.use_triton("auto", cuda, op="mix")


def test_failed_self_check_warns_once_and_falls_back(monkeypatch):
    """On this test's device (on a GPU machine CPU tensors cannot reach a compiled kernel, so a check
    on ``cpu`` there fails at launch, not at the broken result)."""
    monkeypatch.setattr(kt, "_VERIFIED", {"stale": True})
    kt.reset_self_check()
    assert kt._VERIFIED == {}
    device = torch.device(DEVICE)
    broken = lambda images, ids, r, n, P, norm_pix=True: [t + 1 for t in pm.patch_mix_reference(images, ids, r, n, P)]
    monkeypatch.setattr(pm, "patch_mix_forward", broken)
    with pytest.warns(RuntimeWarning, match=rf"failed their self-check on {device} \(patch_mix: mixed patches"):
        assert kt.kernels_verified(device) is False
    assert kt.kernels_verified(device) is False             # cached: no second check or warning
    monkeypatch.setattr(kt, "_self_check", lambda device: 1 / 0)
    with pytest.warns(RuntimeWarning, match="ZeroDivisionError"):
        assert kt.kernels_verified(torch.device("meta")) is False
    monkeypatch.setenv("MIXEDAE_KERNEL_SELFCHECK", "0")
    assert kt.kernels_verified(torch.device("cuda", 1)) is True


def test_autotune_configs_fit_the_patch():
    """The CUDA configs that survive pruning: tiles of 1K-4K elements (fewer only where a patch row runs
    out), never past the patch row, at most six to compile and time per shape."""
    configs = pm._patch_mix_tuned.configs
    for P, grid_w, sizes in ((16, 14, {1, 2, 4}), (32, 7, {1}), (8, 28, {4, 8, 16}), (4, 5, {8}), (4, 2, {2})):
        kept = pm._prune_patch_mix_configs(configs, {"GRID_W": grid_w}, P=P)
        assert {c.kwargs["BLOCK_WI"] for c in kept} == sizes and len(kept) <= 6, (P, grid_w)


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
