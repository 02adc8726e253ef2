"""Pictures: the loss curve, the reconstruction and the homologous-attention figures are valid PNGs of
the stated size; the panels paste the visible patches back and show the mixed input as the sources'
visible patches; the selection picture shows the block's TopK keys and the recognition the trainer
logs; pictures every k steps during training."""
import csv

import pytest
import torch
from conftest import TINY_MODEL
from PIL import Image
from tolerances import tol

from mixedae_fast.config import ConfigError, load_config
from mixedae_fast.downstream.visualize import (
    _to_rgb,
    homologous_figure,
    homologous_selection,
    pick_group,
    plot_loss_curve,
    reconstruction_figure,
    reconstruction_panels,
)
from mixedae_fast.kernels.patch_mix import patchify
from mixedae_fast.model.mixedae import build_model

TINY = [*TINY_MODEL, "--model.depth=1"]


def test_loss_curve_png(tmp_path):
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "loss_rec", "loss_hc", "recognition"])
        for s in range(1, 6):
            w.writerow([s * 10, 2.0 / s, 1.0 / s, 1.0 / s, 0.2 + 0.05 * s])
    png = plot_loss_curve(path, tmp_path / "loss.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (700, 400)


def test_reconstruction_panels_paste_visible_patches():
    model = build_model(load_config("cpu_tiny", TINY))
    images = torch.randn(4, 3, 16, 16)
    panels = reconstruction_panels(model, images)
    original, recon, visible = panels["original"], panels["reconstruction"], panels["visible"]
    assert original.shape == (4, 16, 16, 3) and panels["mixed"].shape == (16, 16, 3)
    out = model(images)
    vis = ~out["loss_mask"]                                         # [4, N]
    as_patches = lambda x: patchify(x.permute(0, 3, 1, 2), 4)       # noqa: E731
    torch.testing.assert_close(as_patches(recon)[vis], as_patches(original)[vis])
    assert not torch.allclose(as_patches(recon)[~vis], as_patches(original)[~vis])
    ids = out["ids"][0].long().view(4, -1)
    mixed = as_patches(panels["mixed"][None])[0]
    for j in range(4):  # each position of the mixed input shows the patch of the source that owns it
        torch.testing.assert_close(mixed[ids[j]], as_patches(original)[j, ids[j]])
    grey = _to_rgb(torch.zeros(1, 3, 16, 16))[0]
    torch.testing.assert_close(as_patches(visible)[~vis], as_patches(grey[None].expand(4, -1, -1, -1))[~vis])


def test_reconstruction_figure_png(tmp_path):
    model = build_model(load_config("cpu_tiny", TINY))
    png = reconstruction_figure(model, torch.randn(8, 3, 16, 16), tmp_path / "recon.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (800, 830)


# -- homologous attention: which keys one query selected ------------------------------------------

def _group(model, seed=0):
    S = model.img_size
    return torch.randn(model.group_size, 3, S, S, generator=torch.Generator().manual_seed(seed))


def test_homologous_selection_is_the_topk_of_that_block_and_its_recognition_the_logged_one():
    model = build_model(load_config("cpu_tiny", TINY)).eval()     # r = 4, n = 4 at 16 px / patch 4
    images = _group(model)
    sel = homologous_selection(model, images, query=5, block=0, seed=3, step=7)
    out = model(images, seed=3, step=7, collect_stats=True)
    assert torch.equal(sel["positions"], out["ids"][0].long())       # the assignment of that forward
    assert sel["sources"].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    H = model.blocks[0].attn.num_heads
    assert sel["keep"].shape == (H, 16) and (sel["keep"].sum(1) >= model.topk).all()
    # the fraction, recomputed from the kept keys: query 5 is source 1's second token
    others = sel["keep"].clone()
    others[:, 5] = False
    same = others[:, 4:8].sum().item()
    assert sel["query_recognition"] == pytest.approx(same / others.sum().item())
    # the block's recognition is the metric the trainer logs for that block
    assert sel["block_recognition"] == pytest.approx(out["stats"]["ha0/recognition"].item())
    assert sel["chance"] == pytest.approx(3 / 15)
    assert sel["mixed"].shape == (16, 16, 3)


@pytest.mark.parametrize("sign, expected", [(1.0, 1.0), (-1.0, 0.0)])
def test_homologous_selection_on_a_block_built_to_recognise(sign, expected):
    # tokens = a large per-source slot embedding (+ pos embed), q = x and k = sign * x: with sign +1
    # every query's top-n keys are its own source's, with -1 they are all from other sources
    model = build_model(load_config("cpu_tiny", [*TINY, "--mixing.segment_embed=encoder"])).eval()
    D, r = 32, model.group_size
    with torch.no_grad():
        model.patch_embed.weight.zero_()
        model.patch_embed.bias.zero_()
        model.seg_embed.zero_()
        for j in range(r):
            model.seg_embed[j, j] = model.seg_embed[j, 16 + j] = 10.0     # seen by both heads
        qkv = model.blocks[0].attn.qkv
        qkv.weight.zero_()
        qkv.bias.zero_()
        qkv.weight[:D] = torch.eye(D)
        qkv.weight[D:2 * D] = sign * torch.eye(D)
    sel = homologous_selection(model, _group(model), query=6, block=0)
    assert sel["query_recognition"] == expected and sel["block_recognition"] == expected
    assert sel["query_recognition_per_head"] == [expected, expected]


def test_homologous_figure_png_and_bad_requests(tmp_path):
    model = build_model(load_config("cpu_tiny", TINY)).eval()
    png, info = homologous_figure(model, _group(model), tmp_path / "h.png", query=3)
    H = model.blocks[-1].attn.num_heads
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (250 * (H + 1), 300)
    assert info["block"] == 0 and info["query"] == 3 and 0 <= info["query_recognition"] <= 1
    with pytest.raises(ValueError, match="query 16 out of range"):
        homologous_selection(model, _group(model), query=16)
    with pytest.raises(ValueError, match="block 5 out of range"):
        homologous_selection(model, _group(model), block=5)
    mae = build_model(load_config("cpu_tiny", [*TINY, "--mixing.group_size=1", "--mixing.ha=none",
                                               "--mixing.hc_weight=0"]))
    with pytest.raises(ValueError, match="group_size > 1"):
        homologous_selection(mae, _group(mae))


def test_pick_group_prefers_distinct_labels():
    images = torch.arange(6.0)[:, None]
    assert pick_group(images, torch.tensor([0, 0, 0, 1, 1, 2]), 3).flatten().tolist() == [0, 3, 5]
    assert pick_group(images, torch.tensor([0, 0, 0, 0, 1, 1]), 3).flatten().tolist() == [0, 4, 1]
    assert pick_group(images, None, 2).flatten().tolist() == [0, 1]


# -- pictures during training ---------------------------------------------------------------------

def _trainer(tmp_path, vis_every):
    import numpy as np

    from mixedae_fast.downstream.visualize import training_pictures
    from mixedae_fast.pipelines.torch_loader import TensorBatchLoader
    from mixedae_fast.train.engine import Trainer

    cfg = load_config("cpu_tiny", [*TINY, "--model.depth=2", "--data.batch_size=8", "--optim.epochs=1",
                                   "--run.log_every=2", f"--run.vis_every={vis_every}", f"--run.out_dir={tmp_path}"])
    rng = np.random.default_rng(0)
    loader = TensorBatchLoader(rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8), np.zeros(32), 8, 16)
    return Trainer(cfg, build_model(cfg), loader, tmp_path / "run", torch.device("cpu"), progress=False,
                   pictures=training_pictures)


class _FakeSinks:
    """Stands in for the run's loggers (mixedae_fast/train/loggers.py: Loggers)."""

    def __init__(self):
        self.images, self.rows = [], []

    def scalars(self, row, step):
        self.rows.append(step)

    def image(self, name, array, step):
        self.images.append((name, array.shape, array.dtype, step))

    def close(self):
        pass


def test_pictures_every_k_steps_to_the_loggers(tmp_path):
    trainer = _trainer(tmp_path, vis_every=2)
    trainer.loggers = sinks = _FakeSinks()
    trainer.fit()
    tags = [(name, step) for name, *_, step in sinks.images]
    assert tags == [("reconstruction", 2), ("homologous", 2), ("reconstruction", 4), ("homologous", 4)]
    assert all(shape[2] == 3 and str(dtype) == "uint8" for _, shape, dtype, _ in sinks.images)
    assert sinks.rows == [2, 4]                           # every metrics row too


def test_pictures_as_png_without_a_picture_logger(tmp_path):
    trainer = _trainer(tmp_path, vis_every=3)             # run.loggers = [csv]: no sink takes pictures
    trainer.fit()
    names = sorted(p.name for p in (tmp_path / "run" / "pictures").iterdir())
    assert names == ["homologous-00000003.png", "reconstruction-00000003.png"]
    with Image.open(tmp_path / "run" / "pictures" / names[0]) as im:
        assert im.format == "PNG" and im.size == (250 * 3, 300)
    with pytest.raises(ConfigError, match="run.vis_every = -1: must be >= 0"):
        load_config("cpu_tiny", ["--run.vis_every=-1"])
    off = _trainer(tmp_path / "off", vis_every=0)
    assert off.fit() and not (tmp_path / "off" / "run" / "pictures").exists()


def test_reconstruction_inverts_the_targets_when_the_model_predicts_them(tiny, monkeypatch):
    """With a perfect prediction (the model's own norm-pix targets), the reconstruction panel shows the
    original image in every patch: the inverse uses each patch's mean and unbiased variance. Pixels
    stay inside [0, 1] so that no clamping hides an error."""
    from mixedae_fast.pipelines.torch_loader import normalize

    model = tiny.model()
    rgb = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    real_forward = model.forward

    def perfect(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        return {**out, "pred": out["targets"].clone()}

    monkeypatch.setattr(model, "forward", perfect)
    panels = reconstruction_panels(model, normalize(rgb))
    torch.testing.assert_close(panels["original"], rgb.permute(0, 2, 3, 1), **tol(torch.float32))
    torch.testing.assert_close(panels["reconstruction"], panels["original"], **tol(torch.float32))
