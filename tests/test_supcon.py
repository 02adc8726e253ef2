"""The SupCon form of the homologous contrastive loss (``mixing.hc_on: head | tokens | both``) against a
float64 double loop written here: value and gradient of ``supcon_loss``, and the model's ``loss_hc``
on its own tokens (``tokens``), its projection head (``head``) and with the attention loss (``both``)."""
import math

import pytest
import torch
from tolerances import tol

from mixedae_fast.model.losses import hc_attention_loss, supcon_loss


def supcon_loop(features, src, tau):
    """Per group, per anchor a: -mean over positives p (same source, p != a) of
    log(exp(z_a.z_p / tau) / sum_{k != a} exp(z_a.z_k / tau)); averaged over anchors, then groups.
    float64, one term at a time."""
    feats = features.double()
    total = feats.new_zeros(())
    G, M, _ = feats.shape
    for g in range(G):
        z = [f / f.norm() for f in feats[g]]
        for a in range(M):
            sims = {k: (z[a] @ z[k]) / tau for k in range(M) if k != a}
            log_den = torch.log(sum(torch.exp(s) for s in sims.values()))
            positives = [k for k in sims if src[k] == src[a]]
            total = total - sum(sims[p] - log_den for p in positives) / len(positives)
    return total / (G * M)


def _inputs(G=2, r=3, n=3, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(G, r * n, C, generator=g)
    return features, torch.arange(r).repeat_interleave(n)


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_supcon_loss_value_and_gradient_match_a_float64_loop(tau):
    features, src = _inputs()
    x = features.clone().requires_grad_(True)
    loss = supcon_loss(x, src, tau)
    x64 = features.double().requires_grad_(True)
    ref = supcon_loop(x64, src.tolist(), tau)
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss.double(), ref.detach(), **tol(torch.float32))
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol(torch.float32, kind="grad"))


def test_supcon_loss_of_perfectly_grouped_features_is_lower_than_of_shuffled_ones():
    """Sources as near-orthogonal clusters: the loss is near its floor log(n - 1) and rises when
    the same features are given the wrong sources."""
    r, n = 3, 4
    src = torch.arange(r).repeat_interleave(n)
    g = torch.Generator().manual_seed(1)
    features = (torch.eye(r, 8)[src] * 10 + 0.1 * torch.randn(r * n, 8, generator=g))[None]
    grouped = supcon_loss(features, src, 0.2).item()
    wrong = supcon_loss(features, src.roll(1), 0.2).item()
    assert grouped == pytest.approx(math.log(n - 1), abs=0.05)    # n-1 equal positives, negatives at ~0
    assert wrong > grouped + 1.0


# -- the model's loss_hc --------------------------------------------------------------------------

@pytest.mark.parametrize("hc_on", ["head", "tokens", "both"])
def test_model_hc_loss_is_supcon_on_its_patch_tokens(tiny, hc_on):
    """Tokens are source-major (source j holds tokens j*n .. j*n + n - 1 after the CLS token);
    ``tokens`` takes the final-norm patch tokens, ``head`` the projection head's output of them, ``both``
    adds the attention loss of the same forward."""
    model = tiny.model(f"--mixing.hc_on={hc_on}", "--mixing.hc_tau=0.3")
    r, n = model.group_size, model.n_visible
    images = torch.randn(2 * r, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ids = model.assign(2, seed=0, step=5)
    with torch.no_grad():
        out = model(images, ids)
        mixed = model.mix(images, ids)[0]
        latent, layout = model.forward_encoder(mixed, ids, model.make_layout())
        tokens = latent[:, 1:]
        feats = model.hc_head(tokens) if hc_on in ("head", "both") else tokens
        expected = supcon_loop(feats, [t // n for t in range(r * n)], 0.3)
        if hc_on == "both":
            expected = expected + hc_attention_loss(layout.hc_rows, model.hc.heads).double()
    assert (model.hc_head is not None) == (hc_on != "tokens")
    torch.testing.assert_close(out["loss_hc"].double(), expected, **tol(torch.float32))
    torch.testing.assert_close(out["loss"], out["loss_rec"] + model.hc.weight * out["loss_hc"])
