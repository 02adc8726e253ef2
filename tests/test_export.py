"""Export to timm (DESIGN §1.8): the encoder as a timm VisionTransformer state dict that loads strictly
and gives the same features, CLS and mean-pooled, as our encoder with global attention."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixedae_fast._compat import import_timm
from mixedae_fast.checkpoint import (
    Pretrained,
    create_timm_model,
    export_timm,
    timm_model_spec,
    timm_state_dict,
)
from mixedae_fast.config import config_to_dict, load_config
from mixedae_fast.kernels.patch_mix import patchify
from mixedae_fast.models import build_model

TINY = ["--model.img_size=16", "--model.patch_size=4", "--model.embed_dim=32", "--model.depth=2",
        "--model.num_heads=2", "--model.decoder_embed_dim=16", "--model.decoder_depth=1",
        "--model.decoder_num_heads=2"]


def _pretrained(overrides=()):
    """A model whose every encoder parameter is non-trivial (init leaves norms at 1/0: perturb them, so
    that a swapped norm1/norm2 or a missing bias would show)."""
    cfg = load_config("cpu_tiny", [*TINY, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name == "cls_token":
                p.add_(0.3 * torch.randn_like(p))
    return model, Pretrained(config_to_dict(cfg), model.state_dict(), Path("ckpt-00000005.pt"), Path("."), 5)


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_timm_loads_the_export_strictly_and_gives_the_same_features(tmp_path, pool):
    model, pre = _pretrained()
    weights, spec_file = export_timm(pre, tmp_path, pool)
    theirs = create_timm_model(tmp_path).eval()                   # timm.create_model, strict load from file
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(model.extract_features(images, pool), theirs(images)) <= 1e-5
        assert _rel(model.forward_features(images), theirs.forward_features(images)) <= 1e-5
    # the same files through plain timm calls, as a user without our package would load them
    spec = json.loads(spec_file.read_text())
    timm = import_timm()
    plain = timm.create_model(spec["model_name"], pretrained=False, **spec["model_kwargs"]).eval()
    plain.load_state_dict(load_file(weights), strict=True)
    with torch.no_grad():
        assert _rel(model.extract_features(images, pool), plain(images)) <= 1e-5


def test_the_patch_embedding_becomes_timms_conv():
    model, pre = _pretrained()
    sd = timm_state_dict(pre.model_state, patch_size=4)
    patch = torch.randn(1, 3, 4, 4)
    conv = torch.nn.functional.conv2d(patch, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    with torch.no_grad():
        torch.testing.assert_close(conv.flatten(), model.patch_embed(patchify(patch, 4)).flatten())
    assert sd["pos_embed"].shape == (1, 17, 32) and not sd["pos_embed"][0, 0].any()   # sin-cos, CLS row zero
    assert not any(k.startswith(("decoder", "mask_token", "hc_head")) for k in sd)


def test_spec_names_the_timm_model_where_one_exists():
    base = config_to_dict(load_config("vit_base"))["model"]
    name, kw = timm_model_spec(base)
    assert name == "vit_base_patch16_224" and kw["embed_dim"] == 768 and kw["depth"] == 12
    assert (kw["global_pool"], kw["fc_norm"], kw["num_classes"]) == ("avg", False, 0)
    assert timm_model_spec(config_to_dict(load_config("vit_large"))["model"])[0] == "vit_large_patch16_224"
    tiny = config_to_dict(load_config("cpu_tiny"))["model"]
    name, kw = timm_model_spec(tiny, "cls")
    assert name == "vit_base_patch16_224" and (kw["embed_dim"], kw["patch_size"], kw["img_size"]) == (128, 4, 32)
    assert kw["global_pool"] == "token"
    with pytest.raises(ValueError, match="pool='max'"):
        timm_model_spec(tiny, "max")


def test_export_files(tmp_path):
    _, pre = _pretrained(["--mixing.hc_on=both"])           # an HC head that must not be exported
    weights, spec_file = export_timm(pre, tmp_path / "out")
    spec = json.loads(spec_file.read_text())
    assert spec["weights"] == weights.name and spec["source"]["step"] == 5 and spec["pool"] == "avg"
    assert spec["pretrained_cfg_overlay"]["mean"] == [0.485, 0.456, 0.406]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "timm_model.json"]
    with pytest.raises(FileNotFoundError, match="mixedae-fast export"):
        create_timm_model(tmp_path)
