"""Export to timm (docs/method.md §8): the encoder as a timm VisionTransformer in the Hugging Face Hub
layout (config.json + model.safetensors + README.md) that timm loads strictly, with our features."""
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from safetensors.torch import load_file

from mixedae_fast._compat import import_timm
from mixedae_fast.config import config_to_dict, load_config
from mixedae_fast.downstream import export as ex
from mixedae_fast.kernels.patch_mix import patchify
from mixedae_fast.model.mixedae import build_model
from mixedae_fast.train.checkpoint import Pretrained

TINY = [*TINY_MODEL]


def _pretrained(overrides=(), run_dir=Path(".")):
    """A model whose every encoder parameter is non-trivial (init leaves norms at 1/0: perturb them, so
    that a swapped norm1/norm2 or a missing bias would show)."""
    cfg = load_config("cpu_tiny", [*TINY, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name == "cls_token":
                p.add_(0.3 * torch.randn_like(p))
    return model, Pretrained(config_to_dict(cfg), model.state_dict(), Path("ckpt-00000005.pt"), run_dir, 5)


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_timm_loads_the_hub_folder_by_itself_and_gives_the_same_features(tmp_path, pool):
    model, pre = _pretrained()
    out = ex.export_run(pre, tmp_path / "export", pool)
    assert out["parity"] <= ex.PARITY_LIMIT
    timm = import_timm()
    theirs = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()   # no code of ours
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(model.extract_features(images, pool), theirs(images)) <= 1e-5
        assert _rel(model.forward_features(images), theirs.forward_features(images)) <= 1e-5
    # the weights file alone, as plain timm would read it, loads strictly into the named architecture
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    plain = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    plain.load_state_dict(load_file(tmp_path / "export" / "model.safetensors"), strict=True)
    with torch.no_grad():
        assert _rel(model.extract_features(images, pool), plain(images)) <= 1e-5


def test_the_patch_embedding_becomes_timms_conv():
    model, pre = _pretrained()
    sd = ex.timm_state_dict(pre.model_state, patch_size=4)
    patch = torch.randn(1, 3, 4, 4)
    conv = torch.nn.functional.conv2d(patch, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    with torch.no_grad():
        torch.testing.assert_close(conv.flatten(), model.patch_embed(patchify(patch, 4)).flatten())
    assert sd["pos_embed"].shape == (1, 17, 32) and not sd["pos_embed"][0, 0].any()   # sin-cos, CLS row zero
    assert not any(k.startswith(("decoder", "mask_token", "hc_head")) for k in sd)


def test_the_architecture_name_matches_the_sizes():
    base = config_to_dict(load_config("vit_base"))["model"]
    name, kw = ex.timm_model_spec(base)
    assert name == "vit_base_patch16_224" and kw["embed_dim"] == 768 and kw["depth"] == 12
    assert (kw["global_pool"], kw["fc_norm"], kw["num_classes"]) == ("avg", False, 0)
    assert ex.timm_model_spec(config_to_dict(load_config("vit_large"))["model"])[0] == "vit_large_patch16_224"
    tiny = config_to_dict(load_config("cpu_tiny"))["model"]                 # 128 wide: nearest family is tiny
    name, kw = ex.timm_model_spec(tiny, "cls")
    assert name == "vit_tiny_patch16_224" and (kw["embed_dim"], kw["patch_size"], kw["img_size"]) == (128, 4, 32)
    assert kw["global_pool"] == "token"
    with pytest.raises(ValueError, match="pool='max'"):
        ex.timm_model_spec(tiny, "max")


def test_folder_has_our_tag_and_normalisation_and_a_model_card(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"eval": {"pretrained": {"knn": 71.4, "linear_probe": 90.0},
                                                          "random_init": {"knn": 47.9, "linear_probe": 76.8}}}))
    _, pre = _pretrained(["--mixing.hc_on=both"], run_dir=run)       # an HC head that must not be exported
    ex.export_run(pre, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert cfg["tag"] == "mixedae" and "license" not in cfg and "hf_hub_id" not in cfg   # nothing borrowed
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["input_size"] == [3, 16, 16]
    assert config["mixedae_fast"]["step"] == 5 and config["num_classes"] == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "MixedAE" in card and "| knn | 71.4 | 47.9 |" in card
    assert "optimizer steps: 5" in card


def test_a_failed_check_writes_nothing_and_other_folders_are_not_overwritten(tmp_path, monkeypatch):
    _, pre = _pretrained()
    monkeypatch.setattr(ex, "parity", lambda *a, **k: 3e-2)
    with pytest.raises(ex.RunFailure, match="does not reproduce the encoder"):
        ex.export_run(pre, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []                              # no folder, no temp left behind
    monkeypatch.undo()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an export of mixedae-fast"):
        ex.export_run(pre, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    ex.export_run(pre, tmp_path / "out")                               # an earlier export is replaced
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    pre.model_state["norm.bias"] = pre.model_state["norm.bias"] + 1
    ex.export_run(pre, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_push_to_hub_uploads_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:                                                     # no network here: record the calls
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], sorted(p.name for p in Path(kw["folder_path"]).iterdir())))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    _, pre = _pretrained()
    out = ex.export_run(pre, tmp_path / "out")
    url = ex.push_to_hub(out["dir"], "someone/mixedae-tiny", private=True)
    assert url.endswith("someone/mixedae-tiny/commit/abc")
    assert calls[0] == ("create_repo", "someone/mixedae-tiny", dict(repo_type="model", private=True, exist_ok=True))
    assert calls[1] == ("upload_folder", "someone/mixedae-tiny", ["README.md", "config.json", "model.safetensors"])


def test_older_exports_still_load(tmp_path):
    model, pre = _pretrained()
    m = pre.config["model"]
    name, kwargs = ex.timm_model_spec(m)
    from safetensors.torch import save_file
    save_file(ex.timm_state_dict(pre.model_state, 4), tmp_path / "model.safetensors")
    (tmp_path / "timm_model.json").write_text(json.dumps({
        "model_name": name, "model_kwargs": kwargs, "weights": "model.safetensors",
        "pretrained_cfg_overlay": {"num_classes": 0}}))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _rel(model.extract_features(images), ex.load_export(tmp_path).eval()(images)) <= 1e-5
    with pytest.raises(FileNotFoundError, match="mixedae-fast export"):
        ex.load_export(tmp_path / "nothing")


@pytest.mark.parametrize("failure, said", [
    ("no_token", "not logged in to the Hugging Face Hub"),
    ("401", "the Hub refused the token (HTTP 401)"),
    ("offline", "cannot reach the Hugging Face Hub (ConnectError)"),
])
def test_push_to_hub_failures_are_one_line_naming_the_login(tmp_path, monkeypatch, failure, said):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    errors = {"no_token": LocalTokenNotFoundError("Token is required"),
              "401": HfHubHTTPError("401 Unauthorized", response=httpx.Response(401, request=request)),
              "offline": httpx.ConnectError("[Errno -3] name resolution failed", request=request)}

    class FailingApi:                                                  # no network here: fail as the Hub would
        def create_repo(self, repo_id, **kw):
            raise errors[failure]

    real = huggingface_hub.HfApi                                       # offline: the real client, a closed port
    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi if failure != "offline" else
                        (lambda: real(endpoint="http://127.0.0.1:9", token="hf_fake")))
    _, pre = _pretrained()
    out = ex.export_run(pre, tmp_path / "out")
    with pytest.raises(ValueError) as info:
        ex.push_to_hub(out["dir"], "someone/mixedae-tiny")
    message = str(info.value)
    assert said in message and "\n" not in message and "someone/mixedae-tiny" in message
    if failure != "offline":
        assert "hf auth login" in message and "HF_TOKEN" in message
    assert (tmp_path / "out" / "model.safetensors").is_file()          # the export stays


def test_model_card_metadata_reads_back_through_huggingface_hub(tmp_path):
    from huggingface_hub import ModelCard

    _, pre = _pretrained()
    ex.export_run(pre, tmp_path / "out", datasets=["ILSVRC/imagenet-1k"], license="cc-by-nc-4.0")
    data = ModelCard.load(tmp_path / "out" / "README.md").data
    assert (data.license, data.datasets, data.library_name) == ("cc-by-nc-4.0", ["ILSVRC/imagenet-1k"], "timm")
    assert {"timm", "mixedae", "self-supervised"} <= set(data.tags) and data.base_model is None
    ex.export_run(pre, tmp_path / "default")
    data = ModelCard.load(tmp_path / "default" / "README.md").data
    assert data.license == "apache-2.0" and data.datasets is None


@pytest.mark.parametrize("start, base", [("timm:vit_base_patch16_224.mae", "timm/vit_base_patch16_224.mae"),
                                         ("hf-hub:someone/mae-vit", "someone/mae-vit"), ("/ckpt/mae.pth", None)])
def test_card_base_model_is_the_hub_weights_the_run_started_from(start, base):
    assert ex.card_metadata({"init": {"from": start}}).base_model == base
