"""Starting from other weights (``init.from``: MAE's official layout, a timm model name, a ``local-dir:`` export
of ours) computes what the source computed; a checkpoint named by URL (``run.resume``, ``init.from``) is
downloaded once into torch.hub's cache. Weights that do not fit are one error line with the fix."""
import argparse
import functools
import http.server
import threading

import pytest
import torch
from conftest import TINY_OVERRIDES, Tiny

from mixedae_fast._compat import import_timm
from mixedae_fast.cli import main
from mixedae_fast.config import config_to_dict
from mixedae_fast.model.mixedae import build_model
from mixedae_fast.train.checkpoint import CheckpointError, Pretrained, download_checkpoint, load_checkpoint
from mixedae_fast.train.init_weights import InitError, load_init, mae_state_dict

timm = import_timm()
S, P, D, DEPTH, HEADS = 16, 4, 32, 2, 2     # conftest's TINY_MODEL
FEATURES_TOL = 1e-5                          # fp32, the same ops in another order (timm's attention vs ours)


def _images(n=3, size=S):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _timm_vit(**kw):
    """A timm ViT of the tiny model's sizes with its own random init (learned pos_embed included)."""
    torch.manual_seed(7)
    args = dict(img_size=S, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=0,
                global_pool="token", fc_norm=False)
    return timm.models.vision_transformer.VisionTransformer(**{**args, **kw}).eval()


def _init(path, *overrides):
    cfg = Tiny.config(f"--init.from={path}", *overrides)
    weights = load_init(cfg)
    torch.manual_seed(123)                       # another random init underneath: the source must replace it
    model = build_model(cfg)
    model.load_state_dict(weights.state, strict=False)
    return model.eval(), weights


def test_a_timm_vit_saved_in_maes_layout_computes_the_same_features(tmp_path):
    """The encoder-only MAE release (mae_pretrain_vit_*.pth: {'model': encoder}) written from a timm ViT: the
    mapped encoder reproduces timm's tokens, so the conv patch embedding became our Linear the right way."""
    vit = _timm_vit()
    torch.save({"model": vit.state_dict()}, tmp_path / "mae_pretrain.pth")
    ours, weights = _init(tmp_path / "mae_pretrain.pth")
    assert not weights.decoder and "decoder" in weights.describe()
    with torch.no_grad():
        want, got = vit.forward_features(_images()), ours.forward_features(_images())
    assert (got - want).abs().max().item() <= FEATURES_TOL * want.abs().max().item()


def test_an_mae_checkpoint_with_decoder_reproduces_the_whole_model(tmp_path):
    """MAE's main_pretrain.py layout ({'model', 'optimizer', 'epoch', 'args': Namespace}) with a decoder: the
    model that starts from it computes the source's reconstruction loss and predictions, not its own init's."""
    source = Tiny.model("--mixing.group_size=1", "--mixing.ha=none", "--mixing.hc_weight=0", seed=5).eval()
    torch.save({"model": mae_state_dict(source.state_dict(), P), "optimizer": {}, "epoch": 399,
                "args": argparse.Namespace(model="mae_vit_tiny", norm_pix_loss=True)}, tmp_path / "checkpoint-399.pth")
    ours, weights = _init(tmp_path / "checkpoint-399.pth", "--mixing.group_size=1", "--mixing.ha=none",
                          "--mixing.hc_weight=0")
    assert weights.decoder and weights.layout == "mae"
    with torch.no_grad():
        want, got = source(_images(4), seed=3), ours(_images(4), seed=3)
    torch.testing.assert_close(got["pred"], want["pred"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["loss"], want["loss"], rtol=0, atol=1e-6)


def test_a_timm_model_name_loads_timms_pretrained_weights(tmp_path, monkeypatch):
    """``timm:NAME``: timm.create_model(NAME, pretrained=True) (its pretrained file pointed at a local one: no
    network here), the position embedding resampled by timm to the config's image size."""
    torch.manual_seed(3)
    native = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(native.state_dict(), tmp_path / "vit_tiny.pth")
    local = functools.partial(timm.create_model, pretrained_cfg_overlay=dict(file=str(tmp_path / "vit_tiny.pth")))
    monkeypatch.setattr(timm, "create_model", local)
    sizes = ["--model.img_size=32", "--model.patch_size=16", "--model.embed_dim=192", "--model.depth=12",
             "--model.num_heads=3", "--mixing.group_size=1", "--mixing.ha=none", "--mixing.hc_weight=0"]
    ours, weights = _init("timm:vit_tiny_patch16_224", *sizes)
    assert weights.layout == "timm"
    reference = local("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32).eval()
    with torch.no_grad():
        want, got = reference.forward_features(_images(2, 32)), ours.forward_features(_images(2, 32))
    assert (got - want).abs().max().item() <= FEATURES_TOL * want.abs().max().item()


def test_a_local_dir_export_of_ours_round_trips(tmp_path):
    from mixedae_fast.downstream.export import write_hub_folder

    source = Tiny.model(seed=9).eval()
    write_hub_folder(Pretrained(config_to_dict(Tiny.config()), source.state_dict(), tmp_path / "ckpt.pt", tmp_path,
                                5), tmp_path / "export")
    ours, weights = _init(f"local-dir:{tmp_path / 'export'}")
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(_images()), source.forward_features(_images()),
                                   rtol=0, atol=1e-5)


def _pretrain(tmp_path, *extra):
    return main(["pretrain", "--no-progress", "--num-train", "16", "--num-val", "8", *TINY_OVERRIDES,
                 "--run.eval=false", f"--run.out_dir={tmp_path}/runs", "--run.name=r", *extra])


def test_pretrain_starts_from_the_weights_and_says_so(tmp_path, cache, capsys):
    vit = _timm_vit()
    torch.save({"model": vit.state_dict()}, tmp_path / "mae_pretrain.pth")
    assert _pretrain(tmp_path, f"--init.from={tmp_path / 'mae_pretrain.pth'}", "--max-steps", "1",
                     "--optim.lr=1e-12") == 0                      # one step that barely moves the weights
    assert "init: encoder (the decoder starts from MAE's random init) from" in capsys.readouterr().out
    saved = load_checkpoint(tmp_path / "runs/r/checkpoints/ckpt-00000001.pt")["model"]
    torch.testing.assert_close(saved["blocks.1.mlp.fc2.weight"], vit.state_dict()["blocks.1.mlp.fc2.weight"],
                               rtol=0, atol=1e-6)


def test_a_resumed_run_takes_its_checkpoint_not_init_from(tmp_path, cache, capsys):
    """init.from starts a new run only: resuming needs the source no more (it may be gone) and keeps the
    checkpoint's weights."""
    torch.save({"model": _timm_vit().state_dict()}, tmp_path / "mae_pretrain.pth")
    assert _pretrain(tmp_path, f"--init.from={tmp_path / 'mae_pretrain.pth'}", "--max-steps", "1") == 0
    (tmp_path / "mae_pretrain.pth").unlink()
    capsys.readouterr()
    assert _pretrain(tmp_path, f"--init.from={tmp_path / 'mae_pretrain.pth'}", "--run.resume=auto",
                     "--max-steps", "2") == 0
    out = capsys.readouterr().out
    assert "init:" not in out and "at step 1" in out


@pytest.mark.parametrize("make, source, expect", [
    (lambda d: torch.save({"model": _timm_vit(embed_dim=48, num_heads=3).state_dict()}, d / "w.pth"), "w.pth",
     ["does not fit the model", "shape (checkpoint vs model): cls_token [1, 1, 48] vs [1, 1, 32]",
      "model.embed_dim=48", "model.depth=2", "model.patch_size=4", "model.img_size=16"]),
    (lambda d: torch.save({"model": {k: v for k, v in _timm_vit().state_dict().items() if "blocks.1." not in k}},
                          d / "w.pth"), "w.pth", ["missing: blocks.1.norm1.weight", "model.depth=1"]),
    (lambda d: torch.save({"model": _timm_vit(init_values=1e-5).state_dict()}, d / "w.pth"), "w.pth",
     ["with no place in this model: blocks.0.ls1.gamma"]),
    (lambda d: None, "nothing.pth", ["init.from = ", "nothing.pth': no such file"]),
    (lambda d: (d / "w.pth").write_text("not a checkpoint"), "w.pth", ["cannot read checkpoint"]),
    (lambda d: None, "timm:vit_nonexistent_patch16", ["timm has no model 'vit_nonexistent_patch16'"]),
])
def test_weights_that_do_not_fit_are_one_line_and_touch_nothing(tmp_path, capsys, make, source, expect):
    make(tmp_path)
    where = source if source.startswith("timm:") else tmp_path / source
    assert _pretrain(tmp_path, f"--init.from={where}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert all(e in err for e in expect), err
    assert not (tmp_path / "runs").exists()                          # refused before the run folder


def test_load_init_raises_an_init_error(tmp_path):
    with pytest.raises(InitError):
        load_init(Tiny.config(f"--init.from={tmp_path}"))            # a folder


@pytest.fixture
def http_dir(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (as a checkpoint host); yields (folder, base URL, stop)."""
    folder = tmp_path / "served"
    folder.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stop = lambda: (server.shutdown(), server.server_close())
    yield folder, f"http://127.0.0.1:{server.server_address[1]}", stop
    if thread.is_alive():
        stop()


def test_a_url_is_downloaded_once_into_the_hub_cache(tmp_path, monkeypatch, http_dir):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder, url, stop = http_dir
    torch.save({"x": torch.arange(3)}, folder / "ckpt-00000002.pt")
    path = download_checkpoint(f"{url}/ckpt-00000002.pt")
    assert path.parent == tmp_path / "torch/hub/checkpoints" and path.name.endswith("-ckpt-00000002.pt")
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    (folder / "b").mkdir()
    torch.save({"x": torch.arange(4)}, folder / "b/ckpt-00000002.pt")      # the same name from another run
    other = download_checkpoint(f"{url}/b/ckpt-00000002.pt")
    assert other != path and torch.equal(torch.load(other)["x"], torch.arange(4))
    with pytest.raises(CheckpointError, match=r"run.resume = .*missing.pt': cannot download it \(HTTP 404"):
        download_checkpoint(f"{url}/missing.pt")
    stop()
    assert download_checkpoint(f"{url}/ckpt-00000002.pt") == path     # cached: the host is gone
    assert not list((tmp_path / "torch/hub/checkpoints").glob("*missing*"))   # a failed download leaves nothing


def test_resume_from_a_url_continues_the_run(tmp_path, cache, monkeypatch, capsys, http_dir):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder, url, _ = http_dir
    assert _pretrain(tmp_path, "--max-steps", "2") == 0
    (folder / "ckpt-00000002.pt").write_bytes((tmp_path / "runs/r/checkpoints/ckpt-00000002.pt").read_bytes())
    capsys.readouterr()
    assert _pretrain(tmp_path, "--run.name=r2", f"--run.resume={url}/ckpt-00000002.pt", "--max-steps", "3") == 0
    out = capsys.readouterr().out
    assert "at step 2" in out and (tmp_path / "runs/r2/checkpoints/ckpt-00000003.pt").is_file()


def test_init_from_a_url(tmp_path, monkeypatch, http_dir):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder, url, _ = http_dir
    vit = _timm_vit()
    torch.save({"model": vit.state_dict()}, folder / "mae_pretrain.pth")
    ours, weights = _init(f"{url}/mae_pretrain.pth")
    with torch.no_grad():
        want, got = vit.forward_features(_images()), ours.forward_features(_images())
    assert (got - want).abs().max().item() <= FEATURES_TOL * want.abs().max().item()
    assert list((tmp_path / "torch/hub/checkpoints").glob("*-mae_pretrain.pth"))
