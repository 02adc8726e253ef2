"""``torch.compile`` over the model with our custom ops: the Triton mixing kernels
(``torch.ops.mixedae_fast.patch_mix`` / ``unmix``) and the fused TopK attention
(``torch.ops.mixedae_fast.homologous_attention`` / ``..._backward``). A whole MixedAE training forward
and backward (TopK homologous attention with the HC loss) compiles as one graph (``fullgraph=True``),
computes what eager does (loss and every gradient), and a second step with a new assignment and new
images runs without a recompile (the HC rows are returned values, not a list the graph guards on).

On CPU the backend is ``aot_eager`` (Dynamo + AOTAutograd, no code generation), the kernels running
through Triton's interpreter: inductor also works there (checked by hand: its C++ compile of this step
takes over a minute on 2 cores, too slow for the suite) and is what the GPU test uses.
"""
import pytest
import torch
from tolerances import tol

from mixedae_fast.config import load_config
from mixedae_fast.model.mixedae import build_model

CUDA = torch.cuda.is_available()
# the CPU tests run the Triton kernels through the interpreter on CPU tensors, which a process that found
# CUDA does not enable (tests/conftest.py): there the inductor test on the GPU below takes their place
INTERPRETED_ON_CPU = pytest.mark.skipif(CUDA, reason="runs the Triton kernels on CPU tensors through the interpreter, "
                                        "which is off where CUDA is present; the GPU test compiles them instead")
# a 16 px MixedAE (N = 16, r = 2, n = 4) with TopK in both blocks and the attention HC loss on
SMALL = ["--model.depth=2", "--model.decoder_depth=1", "--model.img_size=16", "--model.embed_dim=32",
         "--model.decoder_embed_dim=32", "--mixing.group_size=2", "--mixing.ha=topk", "--mixing.hc_on=attention"]


def _compile_and_compare(model, images_for_step, groups, backend, steps=2):
    """Compile ``model(images, ids)["loss"]`` once; per step: loss and gradients as eager, no recompile."""
    params = list(model.parameters())

    def step(images, ids):
        return model(images, ids)["loss"]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for i in range(steps):
        images, ids = images_for_step(i), model.assign(groups, seed=0, step=5 + i)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            loss_c = compiled(images, ids)
        grads_c = torch.autograd.grad(loss_c, params)
        loss_e = step(images, ids)
        grads_e = torch.autograd.grad(loss_e, params)
        # same ops; AOTAutograd may reorder the backward's sums: fp32 rounding only
        torch.testing.assert_close(loss_c, loss_e, **tol(torch.float32, loss_e.device))
        for (name, _), gc, ge in zip(model.named_parameters(), grads_c, grads_e, strict=True):
            torch.testing.assert_close(gc, ge, **tol(torch.float32, ge.device, "grad"),
                                       msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kernels", [pytest.param("triton", marks=INTERPRETED_ON_CPU), "torch"])
def test_model_step_compiles_as_one_graph_and_matches_eager(kernels):
    cfg = load_config("cpu_tiny", [f"--runtime.kernels={kernels}", "--model.depth=2", "--model.decoder_depth=1"])
    torch.manual_seed(0)
    model = build_model(cfg)
    images = torch.randn(8, 3, 32, 32)
    _compile_and_compare(model, lambda i: images, 2, "aot_eager", steps=1)


@pytest.mark.slow  # 15-40 s each on 2 cores: Dynamo traces the whole step, twice with the interpreter's kernels
@INTERPRETED_ON_CPU
@pytest.mark.parametrize("attention_backend", ["triton", "sdpa", "eager"])
def test_mixedae_step_with_topk_and_hc_compiles_fullgraph_without_recompiles(attention_backend):
    """The fused kernel (custom ops) and the sdpa / eager TopK paths, with the mixing kernels' Triton path."""
    cfg = load_config("cpu_tiny", [*SMALL, f"--runtime.attention_backend={attention_backend}",
                                   "--runtime.kernels=triton"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.hc.attention and model.ha_layers == (0, 1)
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(2)]
    _compile_and_compare(model, images.__getitem__, 2, "aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("attention_backend", ["triton", "sdpa"])
def test_mixedae_step_compiles_with_inductor_on_gpu(attention_backend):
    """Inductor on CUDA with the compiled kernels (where the fused kernel once failed to compile)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = load_config("cpu_tiny", [*SMALL, f"--runtime.attention_backend={attention_backend}"])
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, 16, 16, generator=gen).cuda() for _ in range(2)]
    _compile_and_compare(model, images.__getitem__, 2, "inductor")


def test_custom_ops_are_registered_with_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import mixedae_fast.kernels.unmix  # noqa: F401  (registers the unmix ops)

    with FakeTensorMode():
        images = torch.empty(8, 3, 32, 32, dtype=torch.bfloat16)
        ids = torch.empty(2, 48, dtype=torch.int32)
        mixed, targets, mask = torch.ops.mixedae_fast.patch_mix(images, ids, 4, 12, 4, True)
        assert mixed.shape == (2, 48, 48) and mixed.dtype == torch.bfloat16
        assert targets.shape == (8, 64, 48) and targets.dtype == torch.float32 and mask.dtype == torch.bool
        out = torch.ops.mixedae_fast.unmix(torch.empty(2, 49, 16), ids, torch.empty(16), torch.empty(1, 65, 16), 4)
        assert out.shape == (8, 65, 16)
        g_tok, g_mask = torch.ops.mixedae_fast.unmix_backward(out, ids, torch.empty(1, 1, 16), 4)
        assert g_tok.shape == (2, 49, 16) and g_mask.shape == (1, 1, 16)


@pytest.mark.parametrize("hc", [True, False])
def test_homologous_attention_ops_pass_opcheck(hc):
    """torch.library's own checks of the fused TopK ops: schema, autograd registration, and the fake
    implementations against the real kernels (shapes, dtypes, strides of every output)."""
    import mixedae_fast.kernels.homologous_attention as ha

    gen = torch.Generator().manual_seed(0)
    dev = "cuda" if CUDA else "cpu"
    G, H, r, n, d = 2, 2, 3, 4, 16
    q, k, v = ((torch.randn(G, H, 1 + r * n, d, generator=gen) / 2).to(dev).requires_grad_(True) for _ in range(3))
    src = torch.arange(r, device=dev).repeat_interleave(n)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ha._attention_op, (q, k, v, src, 4, hc), test_utils=checks)
    out, lse, hc_rows, bits = ha._attention_op(q, k, v, src, 4, hc)
    grad_hc = torch.randn_like(hc_rows) if hc else None
    torch.library.opcheck(ha._attention_backward_op,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), src, lse,
                           hc_rows.detach() if hc else None, grad_hc, bits), test_utils=checks)


def test_compiled_attention_module_does_not_recompile_across_blocks():
    """A per-module compile (as when graph breaks split a step) sees the same layout in every
    homologous block: the block returns its HC rows, so nothing the graph guards on changes from one
    call to the next. (A block that appended its rows to the layout recompiled on the list's length.)"""
    from mixedae_fast.model.attention import HomologousAttention, MixLayout

    attn = HomologousAttention(32, num_heads=4, backend="sdpa")
    layout = MixLayout(2, 4, mode="topk", topk=2, hc=True)
    compiled = torch.compile(attn, backend="eager", fullgraph=True)
    x = torch.randn(3, 9, 32)
    torch._dynamo.reset()
    rows = [compiled(x, layout)[1]]
    with torch._dynamo.config.patch(error_on_recompile=True):
        rows += [compiled(x + i, layout)[1] for i in range(1, 3)]
    assert all(r.shape == (3, 4, 8, 2) for r in rows) and layout.hc_rows == ()
