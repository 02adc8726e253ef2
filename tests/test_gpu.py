"""CUDA checks of the plain-PyTorch paths (skipped without a GPU): device parity and bf16 at ViT-B size."""
import pytest
import torch

from mixedae_fast.config import load_config
from mixedae_fast.kernels.assignment import draw_assignment
from mixedae_fast.model.mixedae import build_model

pytestmark = pytest.mark.gpu

TINY = ["--model.img_size=32", "--model.patch_size=4", "--model.embed_dim=64", "--model.depth=2",
        "--model.num_heads=4", "--model.decoder_embed_dim=32", "--model.decoder_depth=1",
        "--model.decoder_num_heads=4"]


def test_assignment_is_bitwise_the_same_on_cuda():
    cpu = draw_assignment(64, 196, 4, 49, seed=7, step=123, first_group=32, device="cpu")
    gpu = draw_assignment(64, 196, 4, 49, seed=7, step=123, first_group=32, device="cuda")
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("ha", ["topk", "oracle", "none"])
def test_cuda_fp32_matches_cpu(ha):
    # TF32 off: the comparison is about our code, not the matmul precision mode
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build_model(load_config("cpu_tiny", [*TINY, f"--mixing.ha={ha}"]))
    images = torch.randn(8, 3, 32, 32)
    ref = model(images, step=3)["loss"]
    out = model.cuda()(images.cuda(), step=3)["loss"]
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-5)


def test_vit_base_bf16_forward_backward():
    model = build_model(load_config("vit_base")).cuda()
    images = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images, collect_stats=True)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    blocks = {key.split("/", 1)[0] for key in out["stats"]}
    names = {key.split("/", 1)[1] for key in out["stats"]}
    assert blocks == {f"ha{i}" for i in range(12)}, "every block is a TopK block and reports its statistics"
    assert len(out["stats"]) == 12 * len(names) and "recognition" in names
