"""Pictures: the loss curve and the reconstruction figure are valid PNGs; the panels paste the visible
patches back and show the mixed input as the sources' visible patches."""
import csv

import torch
from PIL import Image

from mixedae_fast.config import load_config
from mixedae_fast.kernels.patch_mix import patchify
from mixedae_fast.models import build_model
from mixedae_fast.visualize import _to_rgb, plot_loss_curve, reconstruction_figure, reconstruction_panels

TINY = ["--model.img_size=16", "--model.patch_size=4", "--model.embed_dim=32", "--model.depth=1",
        "--model.num_heads=2", "--model.decoder_embed_dim=16", "--model.decoder_depth=1",
        "--model.decoder_num_heads=2"]


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
