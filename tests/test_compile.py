"""``torch.compile`` over the model with the Triton mixing kernels: they are custom ops
(``torch.ops.mixedae_fast.patch_mix`` / ``unmix``), so a whole training forward and backward compiles
as one graph (``fullgraph=True``) and computes what eager does. ``aot_eager`` keeps the test fast on
CPU (Dynamo + AOTAutograd, no code generation); the kernels run through Triton's interpreter there."""
import pytest
import torch

from mixedae_fast.config import load_config
from mixedae_fast.models import build_model


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_model_step_compiles_as_one_graph_and_matches_eager(kernels):
    cfg = load_config("cpu_tiny", [f"--runtime.kernels={kernels}", "--model.depth=2", "--model.decoder_depth=1"])
    torch.manual_seed(0)
    model = build_model(cfg)
    images = torch.randn(8, 3, 32, 32)
    ids = model.assign(2, seed=0, step=5)

    def step(images, ids):
        return model(images, ids)["loss"]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss_c = compiled(images, ids)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    loss_e = step(images, ids)
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()))
    # same ops in the same order; AOTAutograd may reorder the backward's sums: fp32 rounding only
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)


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
