"""The HC loss's forms (mixing.hc_heads, mixing.hc_form) against float64 loops written here, where their
gradients go on every attention backend, the config's refusal of the variants that left the product, and
the heads' TopK overlap (Jaccard) that the trainer logs per block."""
import itertools
import math

import pytest
import torch

from mixedae_fast.config import ConfigError, config_from_dict, config_to_dict, load_config
from mixedae_fast.downstream.visualize import homologous_selection
from mixedae_fast.kernels.homologous_attention import hc_row_terms, topk_keep_mask
from mixedae_fast.model.attention import topk_stats
from mixedae_fast.model.losses import hc_attention_loss
from mixedae_fast.model.mixedae import build_model
from mixedae_fast.train.checkpoint import config_mismatch

R, N_VIS = 3, 4
SRC = torch.arange(R).repeat_interleave(N_VIS)
TINY = ["--model.img_size=16", "--model.patch_size=4", "--model.embed_dim=32", "--model.num_heads=4",
        "--model.decoder_embed_dim=16", "--model.decoder_depth=1", "--model.decoder_num_heads=2",
        "--runtime.attention_backend=eager"]


def _scores(G=2, H=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(G, H, R * N_VIS, R * N_VIS, generator=g, dtype=torch.float64) * 2


def _loop_infonce(s, heads):
    terms = []
    for g, h, q in itertools.product(range(s.shape[0]), range(heads), range(s.shape[2])):
        den = sum(math.exp(s[g, h, q, k]) for k in range(s.shape[3]) if k != q)
        num = sum(math.exp(s[g, h, q, k]) for k in range(s.shape[3]) if k != q and SRC[k] == SRC[q])
        terms.append(-math.log(num / den))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("heads", [None, 1, 2])
def test_infonce_on_a_subset_of_heads_matches_a_float64_loop(heads):
    s = _scores().requires_grad_(True)
    rows = [hc_row_terms(s, SRC)]
    loss = hc_attention_loss(rows, heads)
    assert loss.item() == pytest.approx(_loop_infonce(s.detach(), heads or s.shape[1]), rel=1e-10)
    loss.backward()
    used = s.grad.abs().flatten(2).sum(-1) > 0                       # [G, H]
    assert used[:, :heads or s.shape[1]].all() and not used[:, heads or s.shape[1]:].any()


def _loop_supcon(s, heads, src=SRC):
    terms = []
    for g, h, q in itertools.product(range(s.shape[0]), range(heads), range(s.shape[2])):
        den = sum(math.exp(s[g, h, q, k]) for k in range(s.shape[3]) if k != q)
        pos = [k for k in range(s.shape[3]) if k != q and src[k] == src[q]]
        terms.append(-sum(math.log(math.exp(s[g, h, q, p]) / den) for p in pos) / len(pos))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("heads", [None, 2])
def test_supcon_form_matches_a_float64_loop(heads):
    a, b = _scores(seed=4), _scores(seed=5)
    want = (_loop_supcon(a, heads or 3) + _loop_supcon(b, heads or 3)) / 2
    got = hc_attention_loss([hc_row_terms(a, SRC, "supcon"), hc_row_terms(b, SRC, "supcon")], heads)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_supcon_pulls_every_same_source_key_where_infonce_stops():
    """One same-source key far above the rest satisfies InfoNCE (its gradient on the other same-source
    keys vanishes); the per-positive form still pulls each of them up. This is why it can raise TopK
    precision (recognition) when InfoNCE has settled on a few near-identical neighbours."""
    s = torch.zeros(1, 1, R * N_VIS, R * N_VIS, dtype=torch.float64)
    s[0, 0, 0, 1] = 30.0                      # query 0's first same-source key, far above everything
    grads = {}
    for form in ("infonce", "supcon"):
        x = s.clone().requires_grad_(True)
        hc_attention_loss([hc_row_terms(x, SRC, form)]).backward()
        grads[form] = x.grad[0, 0, 0]
    others = [k for k in range(2, R * N_VIS) if SRC[k] == SRC[0]]
    assert grads["infonce"][others].abs().max().item() < 1e-10
    assert (grads["supcon"][others] < -1e-3).all()    # descending the loss raises these logits


def _model(*overrides, depth=2):
    torch.manual_seed(0)
    return build_model(load_config("cpu_tiny", [*TINY, f"--model.depth={depth}", *overrides]))


@pytest.mark.parametrize("backend", ["eager", "sdpa", "triton"])
@pytest.mark.parametrize("heads", ["1", "null"])
def test_supcon_form_on_every_backend_is_the_loss_of_the_blocks_own_logits(backend, heads):
    """hc_form=supcon: each homologous block returns the SupCon row terms of its own q·k logits (the
    attention op, fused kernel included, computes only the InfoNCE form), so the loss equals the float64
    SupCon loss of the logits recomputed here from each block's input, and its gradient reaches the q/k
    weights of the loss's heads only."""
    model = _model("--mixing.hc_form=supcon", f"--mixing.hc_heads={heads}", f"--runtime.attention_backend={backend}")
    inputs = []
    for blk in model.blocks:
        blk.attn.register_forward_hook(lambda mod, inp, out: inputs.append(inp[0].detach()))
    out = model(torch.randn(8, 3, 16, 16), seed=1)
    src = torch.arange(model.group_size).repeat_interleave(model.n_visible)
    H = model.blocks[0].attn.num_heads
    h = H if heads == "null" else int(heads)
    want = []
    for blk, x in zip(model.blocks, inputs):
        a = blk.attn
        G, L, _ = x.shape
        qkv = (x.double() @ a.qkv.weight.double().T + a.qkv.bias.double()).reshape(G, L, 3, H, a.head_dim)
        q, k = qkv.permute(2, 0, 3, 1, 4)[:2, :, :h, 1:]
        s = q @ k.mT / math.sqrt(a.head_dim)
        want.append(_loop_supcon(s.detach(), h, src))
    assert out["loss_hc"].item() == pytest.approx(sum(want) / len(want), rel=1e-5)
    out["loss_hc"].backward()
    grad = model.blocks[-1].attn.qkv.weight.grad.reshape(3, H, -1).abs().sum(-1)     # [q/k/v, H], last block
    assert (grad[:2, :h] > 0).all() and (grad[:2, h:] == 0).all()


def test_hc_heads_leaves_the_other_heads_alone():
    """One block: the HC loss on head 0 gives no gradient to the q/k weights of heads 1..H-1."""
    model = _model("--mixing.hc_heads=1", depth=1)
    model(torch.randn(8, 3, 16, 16))["loss_hc"].backward()
    d = model.blocks[0].attn.head_dim
    grad = model.blocks[0].attn.qkv.weight.grad.reshape(3, 4, d, -1).abs().flatten(2).sum(-1)  # [q/k/v, H]
    assert (grad[:2, 0] > 0).all() and (grad[:2, 1:] == 0).all()


@pytest.mark.parametrize("override, message", [
    ("--mixing.hc_heads=5", "mixing.hc_heads = 5: must be >= 1 and <= model.num_heads = 4"),
    ("--mixing.hc_heads=0", "mixing.hc_heads = 0: must be >= 1"),
    ("--mixing.hc_form=nce", "mixing.hc_form = 'nce': must be one of infonce, supcon"),
])
def test_variant_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config("cpu_tiny", [*TINY, override])


def _loop_jaccard(keep):
    vals = []
    G, H, M, _ = keep.shape
    for g, q in itertools.product(range(G), range(M)):
        for a, b in itertools.combinations(range(H), 2):
            sa, sb = (set(torch.nonzero(keep[g, h, q]).flatten().tolist()) for h in (a, b))
            vals.append(len(sa & sb) / len(sa | sb))
    return sum(vals) / len(vals)


def test_jaccard_of_the_heads_topk_sets():
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 3, 1 + R * N_VIS, 8, generator=g) for _ in range(2))
    stats = topk_stats(q, k, None, SRC, N_VIS)
    keep = topk_keep_mask(((q @ k.mT) * 8 ** -0.5)[..., 1:, 1:], N_VIS)
    assert stats["jaccard"].item() == pytest.approx(_loop_jaccard(keep), rel=1e-6)
    same = topk_stats(q[:, :1].expand(-1, 3, -1, -1), k[:, :1].expand(-1, 3, -1, -1), None, SRC, N_VIS)
    assert same["jaccard"].item() == 1.0
    assert math.isnan(topk_stats(q[:, :1], k[:, :1], None, SRC, N_VIS)["jaccard"].item())


def test_per_block_columns_and_the_pictures_overlap():
    model = _model()
    images = torch.randn(4, 3, 16, 16)
    stats = model(images, model.assign(1, seed=3, step=7), collect_stats=True)["stats"]
    for i in (0, 1):
        assert stats[f"ha{i}/jaccard_b{i}"] is stats[f"ha{i}/jaccard"]
        assert stats[f"ha{i}/recognition_b{i}"] is stats[f"ha{i}/recognition"]
    sel = homologous_selection(model, images, block=1, seed=3, step=7)
    assert sel["block_jaccard"] == pytest.approx(stats["ha1/jaccard"].item(), rel=1e-6)


# -- the variants that left the product (config.REMOVED_KEYS) ----------------------------------------

@pytest.mark.parametrize("override", ["--mixing.hc_select=proj", "--mixing.topk_self=true", "--mixing.hc_grad=qk",
                                      "--mixing.hc_margin=1.0", "--mixing.hc_select_dim=16", "--mixing.hc_form=hinge"])
def test_removed_variants_are_refused_with_the_version_that_has_them(override):
    with pytest.raises(ConfigError, match=r"this HC variant was removed .* check out git [0-9a-f]{7}"):
        load_config("cpu_tiny", [*TINY, override])


def test_a_stored_config_from_before_the_removal_still_loads_and_resumes():
    """A run's config.yaml or checkpoint written when the removed keys existed holds them at their "off"
    values: it loads as the same config, and a resume sees no difference; one that had a variant on is
    refused, naming it."""
    cfg = load_config("cpu_tiny", TINY)
    old = config_to_dict(cfg)
    old["mixing"].update(hc_margin=1.0, hc_grad="full", hc_select="attention", hc_select_dim=16, topk_self=False)
    assert config_from_dict(old) == cfg
    assert config_mismatch(old, config_to_dict(cfg)) == []
    old["mixing"]["hc_select"] = "proj"
    with pytest.raises(ConfigError, match="mixing.hc_select = 'proj': this HC variant was removed"):
        config_from_dict(old)
    with pytest.raises(ConfigError, match="mixing.hc_select = 'proj'"):
        config_mismatch(old, config_to_dict(cfg))
