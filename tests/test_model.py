"""MixedAutoencoderViT (docs/method.md): the whole method on tiny models.

Pins, most important first: ``r=1, ha="none", hc_weight=0`` is MAE's function (§1.7), checked against
an independent functional MAE written here in the style of facebookresearch/mae ``models_mae.py``
(conv patch embedding, numpy sin-cos, shuffle/restore masking, explicit-softmax blocks, norm-pix
loss); every parameter gets a finite gradient in every configuration; the oracle keeps sources apart;
TopK with K = r*n is global attention; same seed ⇒ bitwise-same loss; bf16 autocast; logged stats;
error messages; the downstream encoder (``forward_features``) is a plain ViT with global attention.
"""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import tol

from mixedae_fast.model.mixedae import MixedAutoencoderViT

STAT_NAMES = ("recognition", "w_self", "w_same", "w_other", "w_cls")


def images_for(model, B, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, model.in_chans, model.img_size, model.img_size, generator=g).to(dtype)


@torch.no_grad()
def perturb(model, scale=0.05, seed=1):
    """Move every parameter off its init (zero biases, unit norms) so each one matters."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# -- an independent MAE (facebookresearch/mae models_mae.py, written functionally) ---------------
def mae_1d_sincos(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_2d_sincos(embed_dim, grid_size):
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # here w goes first
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb_h = mae_1d_sincos(embed_dim // 2, grid[0])  # MAE's name; grid[0] holds the w coordinate
    emb_w = mae_1d_sincos(embed_dim // 2, grid[1])
    emb = np.concatenate([emb_h, emb_w], axis=1)
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)  # cls row
    return torch.from_numpy(emb).float()[None]


class ParamReader:
    """The model's parameters by name, remembering which ones the reference MAE read."""

    def __init__(self, model):
        self.params = dict(model.named_parameters())
        self.used = set()

    def __getitem__(self, name):
        self.used.add(name)
        return self.params[name]


def mae_block(W, prefix, x, num_heads):
    B, L, C = x.shape
    h = F.layer_norm(x, (C,), W[prefix + "norm1.weight"], W[prefix + "norm1.bias"], eps=1e-6)
    qkv = F.linear(h, W[prefix + "attn.qkv.weight"], W[prefix + "attn.qkv.bias"])
    q, k, v = qkv.reshape(B, L, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * (C // num_heads) ** -0.5
    attn = attn.exp() / attn.exp().sum(dim=-1, keepdim=True)  # explicit softmax (small logits here)
    h = (attn @ v).transpose(1, 2).reshape(B, L, C)
    x = x + F.linear(h, W[prefix + "attn.proj.weight"], W[prefix + "attn.proj.bias"])
    h = F.layer_norm(x, (C,), W[prefix + "norm2.weight"], W[prefix + "norm2.bias"], eps=1e-6)
    h = F.linear(F.gelu(F.linear(h, W[prefix + "mlp.fc1.weight"], W[prefix + "mlp.fc1.bias"])),
                 W[prefix + "mlp.fc2.weight"], W[prefix + "mlp.fc2.bias"])
    return x + h


def mae_patchify(imgs, p):
    h = w = imgs.shape[2] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(imgs.shape[0], h * w, p ** 2 * 3)


def mae_encoder_tokens(W, imgs, P, D):
    """MAE's patch embedding: a conv whose kernel is our Linear's weight on (p, q, c) vectors."""
    conv_w = W["patch_embed.weight"].reshape(D, P, P, 3).permute(0, 3, 1, 2)
    x = F.conv2d(imgs, conv_w, W["patch_embed.bias"], stride=P)
    return x.flatten(2).transpose(1, 2)                                   # [B, N, D]


def mae_forward(model, imgs, keep):
    """MAE's forward with the kept positions ``keep [B, len_keep]`` given (MAE draws them from noise).

    Kept tokens go in *reversed* order (MAE keeps them in shuffle order); the removed ones follow,
    also reversed: the order must not matter. Returns (loss, pred, mask, target, read params)."""
    W = ParamReader(model)
    B, N = imgs.shape[0], model.num_patches
    P, D, Dd = model.patch_size, model.patch_embed.out_features, model.decoder_embed.out_features
    dtype = imgs.dtype
    pos_embed = mae_2d_sincos(D, model.grid).to(dtype)
    dec_pos_embed = mae_2d_sincos(Dd, model.grid).to(dtype)
    heads = model.blocks[0].attn.num_heads
    dec_heads = model.decoder_blocks[0].attn.num_heads

    x = mae_encoder_tokens(W, imgs, P, D) + pos_embed[:, 1:]
    # random_masking with the given kept set
    len_keep = keep.shape[1]
    rows = []
    for b in range(B):
        kept = keep[b].tolist()[::-1]
        removed = sorted(set(range(N)) - set(kept), reverse=True)
        rows.append(kept + removed)
    ids_shuffle = torch.tensor(rows)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, 1, ids_keep[..., None].repeat(1, 1, D))
    mask = torch.ones(B, N, dtype=dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = W["cls_token"] + pos_embed[:, :1]
    x = torch.cat([cls.expand(B, -1, -1), x], dim=1)
    for i in range(len(model.blocks)):
        x = mae_block(W, f"blocks.{i}.", x, heads)
    x = F.layer_norm(x, (D,), W["norm.weight"], W["norm.bias"], eps=1e-6)

    # decoder
    x = F.linear(x, W["decoder_embed.weight"], W["decoder_embed.bias"])
    mask_tokens = W["mask_token"].repeat(B, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, Dd))
    x = torch.cat([x[:, :1], x_], dim=1) + dec_pos_embed
    for i in range(len(model.decoder_blocks)):
        x = mae_block(W, f"decoder_blocks.{i}.", x, dec_heads)
    x = F.layer_norm(x, (Dd,), W["decoder_norm.weight"], W["decoder_norm.bias"], eps=1e-6)
    pred = F.linear(x, W["decoder_pred.weight"], W["decoder_pred.bias"])[:, 1:]

    # norm_pix_loss
    target = mae_patchify(imgs, P)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    loss = (loss * mask).sum() / mask.sum()
    return loss, pred, mask, target, W.used


def mae_model(dtype=torch.float32):
    model = MixedAutoencoderViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                                decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, group_size=1,
                                mask_ratio=0.75, ha="none", hc_weight=0.0)
    return perturb(model).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mae_special_case_equals_reference_mae(dtype):
    model = mae_model(dtype)
    imgs = images_for(model, 3, dtype=dtype)
    ids = model.assign(3, seed=4, step=9)
    assert tuple(ids.shape) == (3, model.n_visible) == (3, 16)  # int(64 * 0.25)
    with torch.no_grad():
        out = model(imgs, ids)
        loss, pred, mask, target, used = mae_forward(model, imgs, ids.long())

    assert used == set(dict(model.named_parameters())), "the model has parameters MAE does not"
    assert torch.equal(out["loss_mask"], mask.bool())
    torch.testing.assert_close(out["pred"], pred, **tol(dtype))
    # targets and the loss are fp32 by contract (docs/method.md §6), whatever the model dtype
    torch.testing.assert_close(out["targets"], target.float(), **tol(torch.float32))
    assert out["loss"].dtype == torch.float32
    rel = abs(float(out["loss"]) - float(loss)) / abs(float(loss))
    assert rel <= 1e-5, f"loss {float(out['loss'])} vs MAE {float(loss)}: relative {rel:.2e}"
    assert float(out["loss_hc"]) == 0.0 and torch.equal(out["loss"], out["loss_rec"])


def test_mae_reference_is_sensitive():
    """The comparison above can fail: a different kept set or a changed weight moves MAE's loss."""
    model = mae_model()
    imgs = images_for(model, 3)
    ids = model.assign(3, seed=4, step=9)
    with torch.no_grad():
        loss = float(model(imgs, ids)["loss"])
        assert abs(float(mae_forward(model, imgs, model.assign(3, seed=4, step=10).long())[0]) - loss) > 1e-4
        model.decoder_blocks[1].mlp.fc1.bias.add_(0.1)
        assert abs(float(mae_forward(model, imgs, ids.long())[0]) - loss) > 1e-4


def test_sincos_matches_mae_formula(tiny):
    model = tiny.build(embed_dim=32, decoder_embed_dim=16)
    torch.testing.assert_close(model.pos_embed, mae_2d_sincos(32, model.grid), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.decoder_pos_embed, mae_2d_sincos(16, model.grid), rtol=0, atol=1e-6)


# -- gradients in every configuration ------------------------------------------------------------
CONFIGS = [dict(ha=ha, hc_on=hc_on) for ha in ("topk", "oracle", "none")
           for hc_on in ("attention", "head", "tokens", "both")]
CONFIGS += [dict(ha="topk", segment_embed="encoder"), dict(ha="topk", group_size=1),
            dict(ha="topk", group_size=4, topk=2), dict(ha="oracle", ha_layers=[0])]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_every_parameter_gets_a_finite_gradient(cfg):
    full = {"group_size": 2, "hc_weight": 1.0, **cfg}
    r = full["group_size"]
    hc_on = full.get("hc_on", "attention")
    wants_attention_hc = hc_on in ("attention", "both")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = MixedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                                    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                                    mlp_ratio=2.0, mask_ratio=0.75, **full)
    # the attention HC loss needs TopK and r > 1, the head/tokens one r > 1: otherwise dropped with a warning
    warned = any("ignored" in str(w.message) for w in caught)
    wants_feature_hc = hc_on in ("head", "tokens", "both")
    assert warned == ((wants_attention_hc and (full["ha"] != "topk" or r == 1)) or (wants_feature_hc and r == 1))
    perturb(model)
    out = model(images_for(model, 2 * r), step=1)
    hc_active = model.hc.attention or model.hc.features
    assert hc_active == (r > 1 and (hc_on != "attention" or full["ha"] == "topk"))
    assert (float(out["loss_hc"].detach()) > 0) == hc_active
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert float(p.grad.abs().sum()) > 0, f"{name} has an all-zero gradient"
    assert (model.hc_head is not None) == (r > 1 and hc_on in ("head", "both"))
    assert (model.seg_embed is not None) == (full.get("segment_embed") == "encoder")


def test_ha_layers_subset(tiny):
    model = tiny.build(ha="topk", depth=2, ha_layers=[0])
    assert model.ha_layers == (0,)
    assert tiny.build(ha="topk", depth=2, ha_layers=[-1]).ha_layers == (1,)
    assert tiny.build(ha="none", depth=2, ha_layers=[0]).ha_layers == ()
    ids = model.assign(2, step=0)
    mixed, _, _ = model.mix(images_for(model, 4), ids)
    latent, layout = model.forward_encoder(mixed, ids, model.make_layout(collect_stats=True))
    assert len(layout.hc_rows) == 1 and len(layout.stats) == 1  # block 1 ran global attention
    stats = model(images_for(model, 4), collect_stats=True)["stats"]
    assert set(stats) == {f"ha0/{k}" for k in (*STAT_NAMES, "jaccard", "recognition_b0", "jaccard_b0")}
    # and the result is block 0 with TopK, then block 1 global
    with torch.no_grad():
        x = model.patch_embed(mixed) + model.pos_embed[0, 1:][ids.long()]
        x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
        x = model.blocks[1](model.blocks[0](x, model.make_layout()), None)
        torch.testing.assert_close(model.norm(x), latent, **tol(torch.float32))


# -- what each attention mode means at model level -------------------------------------------------
def test_oracle_keeps_sources_apart(tiny):
    """Perturbing source 1 leaves source 0's patch tokens alone, but moves the group CLS.

    One block: from the second block on, patch queries see the CLS key, which has seen every source
    (docs/method.md §3: the CLS query attends to all), so sources legitimately meet through it."""
    r = 2
    model = perturb(tiny.build(ha="oracle", depth=1, group_size=r, hc_weight=0.0))
    naive = tiny.build(ha="none", depth=1, group_size=r, hc_weight=0.0)
    naive.load_state_dict(model.state_dict())
    n = model.n_visible
    images = images_for(model, 2 * r)
    moved = images.clone()
    moved[1] += torch.randn_like(moved[1])  # group 0, source 1
    ids = model.assign(2, step=3)

    def encode(m, imgs):
        with torch.no_grad():
            return m.forward_encoder(m.mix(imgs, ids)[0], ids)[0]

    a, b = encode(model, images), encode(model, moved)
    torch.testing.assert_close(b[0, 1:1 + n], a[0, 1:1 + n], rtol=1e-6, atol=1e-6)  # source 0
    torch.testing.assert_close(b[1], a[1], rtol=1e-6, atol=1e-6)                      # group 1
    assert (b[0, 0] - a[0, 0]).abs().max() > 1e-3                                    # the CLS
    assert (b[0, 1 + n:] - a[0, 1 + n:]).abs().max() > 1e-3                          # source 1
    # global attention (same weights) does mix them: the check above can fail
    assert (encode(naive, moved)[0, 1:1 + n] - encode(naive, images)[0, 1:1 + n]).abs().max() > 1e-3


def test_topk_with_k_equal_rn_is_naive_mixing(tiny):
    r = 3
    model = perturb(tiny.build(ha="topk", group_size=r, topk=3 * 4, hc_weight=0.0))
    naive = tiny.build(ha="none", group_size=r, hc_weight=0.0)
    naive.load_state_dict(model.state_dict())
    images = images_for(model, 2 * r)
    a, b = model(images, step=2), naive(images, step=2)
    torch.testing.assert_close(a["pred"], b["pred"], **tol(torch.float32))
    torch.testing.assert_close(a["loss"], b["loss"], **tol(torch.float32))
    # a smaller K is different
    small = tiny.build(ha="topk", group_size=r, topk=2, hc_weight=0.0)
    small.load_state_dict(model.state_dict())
    assert abs(float(small(images, step=2)["loss"].detach()) - float(a["loss"].detach())) > 1e-5


# -- reproducibility and precision ---------------------------------------------------------------
def test_same_seed_is_bitwise_same_and_step_changes_ids(tiny):
    model = perturb(tiny.build(ha="topk", hc_weight=1.0))
    images = images_for(model, 4)
    a, b = model(images, seed=3, step=5), model(images, seed=3, step=5)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["pred"], b["pred"])
    assert torch.equal(a["ids"], b["ids"])
    c = model(images, seed=3, step=6)
    assert not torch.equal(c["ids"], a["ids"]) and not torch.equal(c["loss"], a["loss"])
    assert not torch.equal(model(images, seed=4, step=5)["ids"], a["ids"])
    # ids passed in explicitly are the ones drawn inside; first_group shifts the global groups
    assert torch.equal(model(images, model.assign(2, seed=3, step=5))["loss"], a["loss"])
    shifted = model(images, seed=3, step=5, first_group=1)["ids"]
    assert torch.equal(shifted[0], model.assign(3, seed=3, step=5)[1])


def test_bf16_autocast_on_cpu(tiny):
    model = perturb(tiny.build(ha="topk", hc_weight=1.0))
    images = images_for(model, 4)
    ref = model(images, step=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, step=1)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    for key in ("loss", "loss_rec", "loss_hc"):
        low, high = float(out[key].detach()), float(ref[key].detach())
        assert abs(low - high) / abs(high) < 5e-2, f"{key}: bf16 {low} vs fp32 {high}"
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # GPU loaders yield bf16 images (docs/architecture.md): under autocast they go straight in
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images.to(torch.bfloat16), step=1)
    assert low["targets"].dtype == torch.float32
    assert abs(float(low["loss"]) - float(ref["loss"].detach())) / float(ref["loss"].detach()) < 5e-2


# -- logged stats --------------------------------------------------------------------------------
def test_stats_and_recognition_chance(tiny):
    model = perturb(tiny.build(ha="topk", group_size=4, depth=2))
    out = model(images_for(model, 8), collect_stats=True)
    assert set(out["stats"]) == {f"ha{i}/{k}" for i in (0, 1)
                                 for k in (*STAT_NAMES, "jaccard", f"recognition_b{i}", f"jaccard_b{i}")}
    for i in (0, 1):
        assert 0.0 <= float(out["stats"][f"ha{i}/recognition"]) <= 1.0
        split = sum(float(out["stats"][f"ha{i}/{k}"]) for k in STAT_NAMES[1:])
        assert abs(split - 1) < 1e-5
    assert "stats" not in model(images_for(model, 8))
    r, n = 4, 4
    assert model.recognition_chance == pytest.approx((n - 1) / (r * n - 1))
    assert tiny.build(group_size=3).recognition_chance == pytest.approx(3 / 11)  # n = 4


# -- errors --------------------------------------------------------------------------------------
def test_input_errors(tiny):
    model = tiny.build(group_size=2)
    with pytest.raises(ValueError, match=r"this model takes \[B, 3, 16, 16\]"):
        model(torch.randn(2, 3, 20, 20))
    with pytest.raises(ValueError, match="this model takes"):
        model(torch.randn(2, 16, 16))
    with pytest.raises(ValueError, match="not a multiple of group_size 2"):
        model(torch.randn(3, 3, 16, 16))


@pytest.mark.parametrize("kw,match", [
    (dict(ha="global"), "ha='global' is not one of topk, oracle, none"),
    (dict(hc_on="proj"), "hc_on='proj' is not one of attention, head, tokens, both"),
    (dict(attention_backend="flash"), "attention_backend='flash' is not one of auto, triton, xformers, sdpa, "),
    (dict(segment_embed="decoder"), "is not one of none, encoder"),
    (dict(topk=0), r"topk=0 must lie in \[1, r\*n = 8\]"),
    (dict(topk=9), r"topk=9 must lie in \[1, r\*n = 8\]"),
    (dict(group_size=4, mask_ratio=0.9), "needs n_visible >= 2"),  # n = int(16 * 0.1) = 1
    (dict(hc_heads=5), r"hc_heads=5: must be >= 1 and <= model.num_heads = 4"),   # the config's rule, no config
    (dict(group_size=5), "must lie in"),                             # 5 * 4 > 16
    (dict(img_size=18), "not a multiple of patch_size"),
])
def test_construction_errors(kw, match, tiny):
    with pytest.raises(ValueError, match=match):
        tiny.build(**kw)


def test_n_visible_one_is_fine_without_hc(tiny):
    model = tiny.build(group_size=4, mask_ratio=0.9, hc_weight=0.0)
    assert model.n_visible == 1
    assert torch.isfinite(model(images_for(model, 4))["loss"])


# -- downstream: a plain ViT -----------------------------------------------------------------------
def test_forward_features_is_a_plain_vit(tiny):
    model = perturb(tiny.build(ha="topk", topk=1, group_size=2))
    images = images_for(model, 3)  # 3 images: no grouping downstream
    tokens = model.forward_features(images)
    assert tuple(tokens.shape) == (3, 1 + 16, 32)
    avg, cls = model.extract_features(images), model.extract_features(images, pool="cls")
    assert tuple(avg.shape) == tuple(cls.shape) == (3, 32)
    torch.testing.assert_close(avg, tokens[:, 1:].mean(1), rtol=0, atol=0)
    torch.testing.assert_close(cls, tokens[:, 0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="pool='max' is not one of avg, cls"):
        model.extract_features(images, pool="max")

    # global attention whatever the ha setting: equal to the MAE-style blocks, and to an ha="none" twin
    W = ParamReader(model)
    with torch.no_grad():
        x = mae_encoder_tokens(W, images, 4, 32) + mae_2d_sincos(32, model.grid)[:, 1:]
        x = torch.cat([(W["cls_token"] + model.pos_embed[:, :1]).expand(3, -1, -1), x], dim=1)
        for i in range(len(model.blocks)):
            x = mae_block(W, f"blocks.{i}.", x, model.blocks[i].attn.num_heads)
        want = F.layer_norm(x, (32,), W["norm.weight"], W["norm.bias"], eps=1e-6)
    torch.testing.assert_close(tokens, want, **tol(torch.float32))
    twin = tiny.build(ha="none", group_size=2)
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(twin.forward_features(images), tokens, **tol(torch.float32))
    with pytest.raises(ValueError, match="this model takes"):
        model.forward_features(torch.randn(2, 3, 8, 8))
