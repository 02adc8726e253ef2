"""The attention backends (issue 5): one module, ``attention_backend = auto | triton | xformers | sdpa |
flex | eager``, every mode (``none``, ``oracle``, ``topk`` with the HC rows) against ``dense_oracle``,
a float64 dense computation written here from the definition (the module's eager path is one of the
backends under test, never the reference).

CPU: sdpa, triton (Triton's interpreter), eager with outputs and q/k/v gradients; flex forward only
(torch has no FlexAttention backward on CPU: a clear error is pinned instead); xformers has no CPU
operators, so its glue (the [B, L, H, d] layout, the 8-aligned additive bias) runs against a stand-in
``memory_efficient_attention`` built on SDPA, and the real library is tested on a GPU. Also:
``HomologousMask`` (from the assignment, materialised, the flex threshold), ``auto``'s table, the env
override, the xformers startup check and its SDPA fallback, the model's encoder with each backend.

Inputs are multiples of 1/4 (exact scores: every path makes the same TopK selection, ties included);
the exact K-th value search is tested apart, on runs of adjacent floats.
"""
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from tolerances import tol

import mixedae_fast.model.attention as attention
from mixedae_fast import measured
from mixedae_fast.config import ATTENTION_BACKENDS, load_config
from mixedae_fast.kernels.assignment import draw_assignment
from mixedae_fast.kernels.homologous_attention import topk_keep_mask
from mixedae_fast.model.attention import (
    BACKENDS,
    ENV_BACKEND,
    HomologousAttention,
    HomologousMask,
    MixLayout,
    global_attention,
    oracle_attention,
    resolve_backend,
    set_attention_backend,
    topk_attention,
)
from mixedae_fast.model.mixedae import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = ("none", "oracle", "topk")


def _qkv(G, H, r, n, d, dtype=torch.float32, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    L = 1 + r * n
    out = [(torch.randn(G, H, L, d, generator=gen) * 4).round().div(4).clamp(-3.75, 3.75) for _ in range(3)]
    return [t.to(dtype).to(device).requires_grad_(True) for t in out]


def _attend(mode, q, k, v, r, n, K, backend):
    """(out, hc_rows | None) of one mode through one backend."""
    if mode == "none":
        return global_attention(q, k, v, backend), None
    if mode == "oracle":
        return oracle_attention(q, k, v, r, n, backend), None
    return topk_attention(q, k, v, HomologousMask(r, n, K, "topk"), True, backend)


def dense_oracle(mode, q, k, v, r, n, K, hc=True):
    """Every mode written out densely in float64 from the definition (no code shared with the module):
    scores ``q·kᵀ/√d``; who-sees-whom from token indices (oracle) or, for TopK, the K-th largest patch
    score found by sorting each row (ties kept, the CLS key always, the CLS query all keys); a softmax;
    for TopK the HC log-sum-exps. Gradients flow back to q, k, v in their own dtype."""
    d, L = q.shape[-1], q.shape[-2]
    s = (q.double() @ k.double().transpose(-2, -1)) * d ** -0.5
    idx = torch.arange(L, device=q.device)
    src = torch.cat([idx.new_full((1,), -1), torch.arange(r, device=q.device).repeat_interleave(n)])
    keep = torch.ones(s.shape, dtype=torch.bool, device=q.device)
    if mode == "oracle":
        keep = keep & ((src[:, None] == src[None, :]) | (idx[:, None] == 0) | (idx[None, :] == 0))
    if mode == "topk":
        kth = s[..., 1:, 1:].detach().sort(dim=-1, descending=True).values[..., K - 1:K]
        keep[..., 1:, 1:] = s[..., 1:, 1:].detach() >= kth
    out = (s.masked_fill(~keep, float("-inf")).softmax(dim=-1) @ v.double()).to(q.dtype)
    if mode != "topk" or not hc:
        return out, None
    s_pp, eye = s[..., 1:, 1:], torch.eye(L - 1, dtype=torch.bool, device=q.device)
    same = (src[1:, None] == src[None, 1:]) & ~eye
    rows = torch.stack([s_pp.masked_fill(eye, float("-inf")).logsumexp(-1),
                        s_pp.masked_fill(~same, float("-inf")).logsumexp(-1)], dim=-1)
    return out, rows.float()


def _out_and_grads(mode, q, k, v, r, n, K, backend, up, with_grad=True):
    out, hc_rows = (dense_oracle(mode, q, k, v, r, n, K) if backend == "oracle"
                    else _attend(mode, q, k, v, r, n, K, backend))
    if not with_grad:
        return out, hc_rows, None
    loss = (out.float() * up).sum() + (hc_rows.sum() if hc_rows is not None else 0)
    return out, hc_rows, torch.autograd.grad(loss, (q, k, v))


def _compare(mode, backend, G=2, H=2, r=3, n=5, d=16, K=4, dtype=torch.float32, with_grad=True):
    """``backend`` against :func:`dense_oracle` on the same inputs: outputs, HC rows, q/k/v gradients."""
    q, k, v = _qkv(G, H, r, n, d, dtype)
    up = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.device)
    ref = _out_and_grads(mode, q, k, v, r, n, K, "oracle", up)
    if with_grad:
        got = _out_and_grads(mode, q, k, v, r, n, K, backend, up)
    else:
        with torch.no_grad():
            got = _out_and_grads(mode, q, k, v, r, n, K, backend, up, with_grad=False)
    assert got[0].dtype == dtype
    torch.testing.assert_close(got[0], ref[0].detach(), **tol(dtype, q.device))
    if mode == "topk":
        torch.testing.assert_close(got[1], ref[1].detach(), **tol(torch.float32, q.device, "hc"))
    if with_grad:
        for name, a, b in zip("qkv", got[2], ref[2], strict=True):
            torch.testing.assert_close(a, b, **tol(dtype, q.device, "grad"),
                                       msg=lambda m, name=name: f"{mode}/{backend} d{name}: {m}")


# -- every backend against the dense oracle ---------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["sdpa", "triton", "eager"])
def test_backend_matches_the_dense_oracle_with_gradients(mode, backend):
    _compare(mode, backend)


@pytest.mark.parametrize("mode", MODES)
def test_flex_forward_matches_the_dense_oracle_on_cpu(mode):
    _compare(mode, "flex", with_grad=DEVICE == "cuda")


def test_flex_with_gradients_on_cpu_is_a_clear_error():
    q, k, v = _qkv(1, 1, 2, 3, 16, device="cpu")
    with pytest.raises(ValueError, match="attention_backend='flex' on CPU: FlexAttention has no CPU backward"):
        global_attention(q, k, v, "flex")


@pytest.mark.parametrize("K", [1, 15])
def test_topk_edge_k_through_every_cpu_backend(K):
    """K = 1 and K = r*n (every patch key: global attention) at an odd length (L = 16)."""
    for backend in ("sdpa", "triton"):
        _compare("topk", backend, K=K)
    _compare("topk", "flex", K=K, with_grad=False)


class _StandInOps(types.ModuleType):
    """``xformers.ops`` stand-in: checks what xformers requires of its inputs, computes with SDPA."""

    def __init__(self):
        super().__init__("xformers.ops")
        self.calls = []

    def memory_efficient_attention(self, q, k, v, attn_bias=None):
        assert q.dim() == 4 and q.stride(-1) == 1, "xformers takes [B, L, H, d] with unit-stride d"
        B, Lq, H, _ = q.shape
        if attn_bias is not None:
            assert isinstance(attn_bias, torch.Tensor) and attn_bias.dtype == q.dtype
            assert tuple(attn_bias.shape) == (B, H, Lq, k.shape[1])
            assert attn_bias.stride(-2) % 8 == 0, "xformers wants the bias rows 8-aligned in memory"
        self.calls.append(attn_bias is not None)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_bias)
        return out.transpose(1, 2)


@pytest.fixture
def standin_xformers(monkeypatch):
    ops = _StandInOps()
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    return ops


@pytest.mark.parametrize("mode", MODES)
def test_xformers_glue_against_a_stand_in(standin_xformers, mode):
    """Our side of the xformers backend (layouts, the additive TopK bias) on CPU; the real operators
    are GPU-only (test_backends_on_gpu)."""
    _compare(mode, "xformers", r=3, n=4)  # L = 13: the bias rows need padding to 16
    assert standin_xformers.calls and all(standin_xformers.calls) == (mode == "topk")


# -- HomologousMask ----------------------------------------------------------------------------------
def test_homologous_mask_from_assignment_and_layout():
    ids = draw_assignment(3, 25, 4, 6, seed=0, step=1)
    mask = HomologousMask.from_assignment(ids, 4)
    assert (mask.group_size, mask.n_visible, mask.topk, mask.mode, mask.seq_len) == (4, 6, 6, "topk", 25)
    assert HomologousMask.from_assignment(ids, 4, mode="oracle").topk is None
    layout = MixLayout(4, 6, mode="topk", topk=3)
    assert layout.mask == HomologousMask(4, 6, 3, "topk")
    with pytest.raises(ValueError, match="is not \\[G, r\\*n\\] for group_size 5"):
        HomologousMask.from_assignment(ids, 5)
    with pytest.raises(ValueError, match="topk=0 must lie in"):
        HomologousMask(2, 3, 0)
    with pytest.raises(ValueError, match="is not one of"):
        HomologousMask(2, 3, 1, mode="bogus")
    with pytest.raises(ValueError, match="needs the scores"):
        HomologousMask(2, 3, 1).materialize()


def test_materialize_oracle_none_and_additive():
    r, n = 3, 2
    L = 1 + r * n
    oracle = HomologousMask(r, n, mode="oracle").materialize()
    want = torch.zeros(L, L, dtype=torch.bool)
    want[0, :] = want[:, 0] = True
    for j in range(r):
        want[1 + j * n:1 + (j + 1) * n, 1 + j * n:1 + (j + 1) * n] = True
    assert torch.equal(oracle, want)
    assert HomologousMask(r, n, mode="none").materialize().all()
    bias = HomologousMask(r, n, mode="oracle").materialize(additive=True, dtype=torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and torch.equal(bias == 0, want) and (bias[~want] == float("-inf")).all()


def test_materialize_topk_and_the_flex_threshold_select_the_same_keys():
    q, k, _ = _qkv(2, 3, 3, 5, 8, device="cpu")
    s = (q.detach() @ k.detach().transpose(-2, -1)) * 8 ** -0.5
    mask = HomologousMask(3, 5, 4)
    keep = mask.materialize(s)
    assert keep[..., 0, :].all() and keep[..., :, 0].all()
    assert torch.equal(keep[..., 1:, 1:], topk_keep_mask(s[..., 1:, 1:], 4))
    thr = mask.threshold(s)
    assert (thr[..., 0] == float("-inf")).all()
    assert torch.equal(s[..., 1:, 1:] >= thr[..., 1:, None], keep[..., 1:, 1:])
    # the threshold sits mid-gap: a perturbation below a quarter of the gap changes nothing
    s_pp = s[..., 1:, 1:]
    kth = s_pp.topk(4, dim=-1).values[..., -1:]
    below = s_pp.masked_fill(s_pp >= kth, float("-inf")).amax(-1, keepdim=True)
    gap = (kth - below).min()
    noisy = s_pp + (torch.rand(s_pp.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * gap / 2
    assert torch.equal(noisy >= thr[..., 1:, None], keep[..., 1:, 1:])
    # K = r*n: everything kept, threshold -inf
    assert torch.equal(HomologousMask(3, 5, 15).threshold(s)[..., 1:], torch.full(s.shape[:-1], -torch.inf)[..., 1:])


# -- choosing a backend ------------------------------------------------------------------------------
def test_backend_lists_and_auto_on_cpu():
    assert ATTENTION_BACKENDS == BACKENDS
    for mode in MODES:
        assert resolve_backend("auto", "cpu", mode) == measured.table()["cpu"][mode]


@pytest.mark.parametrize("kernels,want", [("auto", dict(none="sdpa", oracle="flex", topk="triton")),
                                          ("torch", dict(none="sdpa", oracle="flex", topk="eager")),
                                          ("triton", dict(none="sdpa", oracle="flex", topk="triton"))])
def test_auto_follows_runtime_kernels_on_a_measured_card(monkeypatch, kernels, want):
    """``attention_backend=auto`` takes what ``runtime.kernels`` chooses from the one table: on the H200
    the measured backends, without the fused kernel under ``kernels=torch``; the model's setting reaches
    every block."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(attention, "check_triton", lambda device, setting: None)
    resolve_backend.cache_clear()
    try:
        assert {mode: resolve_backend("auto", "cuda:0", mode, kernels) for mode in MODES} == want
    finally:
        resolve_backend.cache_clear()


def test_the_models_kernels_setting_reaches_every_attention_block(tiny):
    model = tiny.build(kernels="torch")
    blocks = [m for m in model.modules() if isinstance(m, HomologousAttention)]
    assert blocks and {m.kernels for m in blocks} == {"torch"}
    model.kernels = "auto"
    assert {m.kernels for m in blocks} == {"auto"}
    with pytest.raises(ValueError, match="kernels='fast' is not one of auto, triton, torch"):
        model.kernels = "fast"


def test_env_override_and_errors(monkeypatch):
    monkeypatch.setenv(ENV_BACKEND, "eager")
    assert HomologousAttention(16, 2, backend="sdpa").backend == "eager"
    monkeypatch.setenv(ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match=f"{ENV_BACKEND}='fast' is not one of auto, triton"):
        HomologousAttention(16, 2)
    monkeypatch.delenv(ENV_BACKEND)
    with pytest.raises(ValueError, match="attention_backend='flash' is not one of auto, triton, xformers"):
        HomologousAttention(16, 2, backend="flash")
    with pytest.raises(ValueError, match="xformers has no CPU operators"):
        resolve_backend("xformers", "cpu", "none")


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    import mixedae_fast.kernels._triton as kt
    monkeypatch.setattr(kt, "_interpreted", lambda kernel: False)
    resolve_backend.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="attention_backend='triton' on CPU tensors needs Triton's interpreter"):
            resolve_backend("triton", "cpu", "topk")
        with pytest.raises(RuntimeError, match="kernels='triton' on CPU tensors needs Triton's interpreter"):
            resolve_backend("auto", "cpu", "topk", "triton")
        assert resolve_backend("triton", "cpu", "none") == "triton"  # global attention: SDPA, no kernel
    finally:
        resolve_backend.cache_clear()


def test_xformers_startup_check_falls_back_to_sdpa(monkeypatch):
    attention.xformers_problem.cache_clear()
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails
    try:
        problem = attention.xformers_problem("cuda:0")
        assert "xformers does not import" in problem and "mixedae_fast[xformers]" in problem
        assert attention.xformers_problem("cpu") == "xformers has no CPU operators"
    finally:
        attention.xformers_problem.cache_clear()
    monkeypatch.setattr(attention, "xformers_problem", lambda device: "libcudart.so.12 not found")
    resolve_backend.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="libcudart.so.12 not found; using SDPA instead"):
            assert resolve_backend("xformers", "cuda:0", "topk") == "sdpa"
    finally:
        resolve_backend.cache_clear()


# -- the model's encoder with each backend -------------------------------------------------------
@pytest.fixture
def tiny_on_device(tiny):
    return lambda **kw: tiny.build(**kw).to(DEVICE)


def _oracle_attention_functions(monkeypatch):
    """Route every block of a model through :func:`dense_oracle` (whatever its backend says)."""
    monkeypatch.setattr(attention, "global_attention",
                        lambda q, k, v, backend="sdpa": dense_oracle("none", q, k, v, 1, q.shape[-2] - 1, None)[0])
    monkeypatch.setattr(attention, "oracle_attention",
                        lambda q, k, v, r, n, backend="sdpa": dense_oracle("oracle", q, k, v, r, n, None)[0])
    def topk(q, k, v, mask, hc=False, backend="eager", hc_heads=None):
        out, rows = dense_oracle("topk", q, k, v, mask.group_size, mask.n_visible, mask.topk, hc)
        return out, None if rows is None else rows[:, :hc_heads]   # the HC rows of the loss's heads
    monkeypatch.setattr(attention, "topk_attention", topk)


@pytest.mark.parametrize("ha", MODES)
def test_model_runs_with_each_backend(ha, monkeypatch, tiny_on_device):
    """One flag flipped on the same model: loss and every gradient as with the dense float64 oracle in
    every block (fp32); flex runs its forward (CPU: no backward); xformers is refused on CPU with the
    reason. ``auto`` on CPU routes to eager / sdpa: the oracle is what keeps it honest."""
    torch.manual_seed(0)  # head dims of 16 (flex's kernels on a GPU want >= 16)
    model = tiny_on_device(ha=ha, embed_dim=64, decoder_embed_dim=64, attention_backend="eager")
    images = torch.randn(4, 3, 16, 16, device=DEVICE)

    def step(backend, grad=True):
        set_attention_backend(model, backend)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            out = model(images, seed=1, step=2)
        if grad:
            out["loss"].backward()
        return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with monkeypatch.context() as patch:
        _oracle_attention_functions(patch)
        ref_loss, ref_grads = step("eager")
    assert ref_grads
    for backend in ("auto", "sdpa", "triton", "eager"):
        loss, grads = step(backend)
        torch.testing.assert_close(loss, ref_loss, **tol(torch.float32, DEVICE), msg=backend)
        assert grads.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, **tol(torch.float32, DEVICE, "grad"),
                                       msg=f"{backend}: {name}")
    loss, _ = step("flex", grad=DEVICE == "cuda")
    torch.testing.assert_close(loss, ref_loss, **tol(torch.float32, DEVICE))
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="xformers has no CPU operators"):
            step("xformers")


@pytest.mark.parametrize("overrides,match", [
    (["--runtime.device=cpu", "--runtime.attention_backend=xformers"], "xformers has no CPU operators"),
    (["--runtime.device=cpu", "--runtime.attention_backend=flex"], "no FlexAttention backward on CPU"),
    (["--runtime.attention_backend=triton", "--model.img_size=224", "--model.patch_size=14",
      "--mixing.mask_ratio=0.75", "--mixing.group_size=4"], r"<= 256 tokens, .* = 257"),
])
def test_config_refuses_impossible_backends(overrides, match):
    from mixedae_fast.config import ConfigError
    with pytest.raises(ConfigError, match=match):
        load_config("cpu_tiny", overrides)


def test_config_flag_reaches_every_block():
    cfg = load_config("cpu_tiny", ["--runtime.attention_backend=triton"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg)
    backends = {m.backend for m in model.modules() if isinstance(m, HomologousAttention)}
    assert backends == {"triton"}
    with pytest.raises(ValueError, match="is not one of auto, triton"):
        set_attention_backend(model, "fast")


# -- GPU: every backend, compiled, with gradients ------------------------------------------------
# none / oracle through triton are SDPA (as sdpa): only topk runs the fused kernel, in fp32 and bf16
GPU_CASES = [("topk", "triton", torch.float32)] + [(mode, backend, torch.bfloat16) for mode in MODES
                                                   for backend in ("triton", "sdpa", "flex", "xformers", "auto")
                                                   if backend != "triton" or mode == "topk"]


@pytest.mark.gpu
@pytest.mark.parametrize("mode,backend,dtype", GPU_CASES, ids=str)
def test_backends_on_gpu(mode, backend, dtype):
    """Each backend compiled, against the dense oracle, at L = 65 (flex compiles once per mode)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    resolved = resolve_backend(backend, "cuda:0", mode)
    if backend == "xformers" and resolved != "xformers":
        pytest.skip(f"xformers unusable here: {attention.xformers_problem('cuda:0')}")
    _compare(mode, resolved, G=8, H=4, r=4, n=16, d=64, K=16, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("ha", MODES)
def test_model_backends_on_gpu_bf16(ha, tiny_on_device):
    """The model under bf16 autocast with each backend: the loss as with eager (bf16 near-ties may
    flip a TopK selection: a loose bound) and finite gradients everywhere."""
    torch.manual_seed(0)  # head dims of 16: flex's kernels want >= 16
    model = tiny_on_device(ha=ha, img_size=32, embed_dim=64, decoder_embed_dim=64, attention_backend="eager")
    images = torch.randn(8, 3, 32, 32, device="cuda")
    losses = {}
    for backend in ("eager", "auto", "sdpa", "triton", "flex", "xformers"):
        set_attention_backend(model, backend)
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings(), torch.autocast("cuda", dtype=torch.bfloat16):
            warnings.simplefilter("ignore")  # xformers may fall back to SDPA with a warning
            loss = model(images, seed=1, step=2)["loss"]
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), backend
        losses[backend] = float(loss)
    for backend, loss in losses.items():
        assert abs(loss - losses["eager"]) <= 2e-2 * abs(losses["eager"]), (backend, losses)


# -- the exact K-th value: runs of adjacent floats ------------------------------------------------------
def _adjacent(start: float, count: int, down: int = 0) -> list[float]:
    """``count`` consecutive fp32 values, ``down`` of them below ``start`` (torch.nextafter steps)."""
    x = torch.tensor(start, dtype=torch.float32)
    for _ in range(down):
        x = torch.nextafter(x, torch.tensor(-torch.inf))
    out = [x]
    for _ in range(count - 1):
        out.append(torch.nextafter(out[-1], torch.tensor(torch.inf)))
    return [float(t) for t in out]


SMALLEST_NORMAL = torch.finfo(torch.float32).tiny
RUNS = {
    "positive": _adjacent(1.0, 14),
    "negative": _adjacent(-1.5, 14),
    "tiny": _adjacent(SMALLEST_NORMAL, 14, down=7),            # normals and denormals, adjacent
    "mixed": [*_adjacent(-1.0, 3), *_adjacent(0.0, 9, down=4), -0.0, *_adjacent(1.0, 2, down=1)],
}


def _adjacent_case(run: list[float], r: int, n: int, d: int = 64, heads: int = 2, seed: int = 0):
    """Scores that are exactly the run's values, with repeats (ties): query ``i`` is one-hot on channel
    ``i % 8`` and channel ``c`` of the patch keys holds ``8 x`` a random draw from ``run`` (scale
    ``64**-0.5 = 1/8``: every score is exact in any summation order). ``v`` = identity, so the output
    rows are the attention weights. Returns ``q, k, v`` and the intended patch scores ``[H, M, M]``."""
    gen = torch.Generator().manual_seed(seed)
    L, M = 1 + r * n, r * n
    values = torch.tensor(run, dtype=torch.float32)
    q = torch.zeros(1, heads, L, d)
    k = torch.zeros(1, heads, L, d)
    q[:, :, torch.arange(L), torch.arange(L) % 8] = 1.0
    k[0, :, 1:, :8] = 8 * values[torch.randint(len(run), (heads, M, 8), generator=gen)]
    v = torch.eye(L, d).expand(1, heads, L, d).contiguous()
    scores = k[0, :, 1:, :8][:, :, (torch.arange(M) + 1) % 8].transpose(-2, -1) / 8   # [H, query, key]
    return q, k, v, scores


def _brute_force_keep(scores: torch.Tensor, K: int) -> torch.Tensor:
    """Per row: the K-th largest by sorting Python floats, keep everything >= it (ties kept)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for h in range(scores.shape[0]):
        for i in range(scores.shape[1]):
            row = scores[h, i].tolist()
            kth = sorted(row, reverse=True)[K - 1]
            keep[h, i] = torch.tensor([x >= kth for x in row])
    return keep


# every run under the interpreter; on a GPU two (the fp32 select is the same code, and denormals may flush there)
ADJACENT_RUNS = ["positive", "negative"] if DEVICE == "cuda" else list(RUNS)


@pytest.mark.parametrize("run", ADJACENT_RUNS)
@pytest.mark.parametrize("backend", ["triton", "eager", "sdpa", "flex"])
def test_topk_keep_set_is_exact_on_runs_of_adjacent_floats(backend, run):
    """Every backend that claims an exact K-th value search keeps exactly the brute force's keys when a
    row's scores are adjacent fp32 values (one ulp apart), with ties, for K = 1, mid-run and r*n.
    (Scores in steps of 1/4 cannot tell an exact search from one that stops a few bits early.)"""
    r, n = 3, 7
    q, k, v, scores = _adjacent_case(RUNS[run], r, n)
    assert torch.equal(((q @ k.transpose(-2, -1)) / 8)[0, :, 1:, 1:], scores), "the scores are not exact"
    ties_seen = False
    for K in (1, 5, 11, r * n):
        want = _brute_force_keep(scores, K)
        ties_seen |= bool((want.sum(-1) > K).any())
        with torch.no_grad():
            w, _ = topk_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), HomologousMask(r, n, K), False, backend)
        kept = w[0, :, 1:, 1:1 + r * n].cpu() > 0
        assert torch.equal(kept, want), f"{backend}, {run}, K={K}: {int((kept != want).sum())} keys differ"
    assert ties_seen, "no row had a tie at its K-th value: the tie rule went unexercised"


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU each tiling is compiled and checked (ties included) by "
                    "test_every_forward_tiling_computes_the_contract; these runs cost two more compiles")
@pytest.mark.parametrize("tiling", ["m64w4", "m128w8"])
def test_every_forward_tiling_keeps_the_exact_set_on_adjacent_floats(tiling):
    """The fused kernel's other tilings (one row per warp's lanes, scores rebuilt from their keys) keep
    exactly the brute force's keys too: signed zeros, denormals and ties (the hardest runs)."""
    from mixedae_fast.measured import kernel_variant
    r, n = 3, 7
    for run in ("mixed", "tiny"):
        q, k, v, scores = _adjacent_case(RUNS[run], r, n)
        for K in (1, 11):
            with torch.no_grad(), kernel_variant(tiling):
                w, _ = topk_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), HomologousMask(r, n, K), False,
                                      "triton")
            assert torch.equal(w[0, :, 1:, 1:1 + r * n].cpu() > 0, _brute_force_keep(scores, K)), (run, K)
