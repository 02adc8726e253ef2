"""HC loss variants (mixing.hc_heads / hc_form / hc_margin / hc_grad) and the selection switches
(mixing.topk_self, mixing.hc_select=proj) against float64 loops written here, where their gradients
go, their config validation, and the heads' TopK overlap (Jaccard) that the trainer logs per block."""
import itertools
import math

import pytest
import torch
from tolerances import tol

from mixedae_fast.attention import selected_topk_attention, selection_keep, topk_stats
from mixedae_fast.config import ConfigError, load_config
from mixedae_fast.kernels.homologous_attention import hc_row_terms, homologous_attention_reference, topk_keep_mask
from mixedae_fast.losses import hc_attention_loss, hc_hinge_terms, hc_scores_loss
from mixedae_fast.models import build_model
from mixedae_fast.visualize import homologous_selection

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


def _loop_hinge(s, margin):
    out = torch.zeros(s.shape[:3], dtype=torch.float64)
    for g, h, q in itertools.product(*map(range, s.shape[:3])):
        keys = range(s.shape[3])
        best_other = max(s[g, h, q, k].item() for k in keys if SRC[k] != SRC[q])
        pos = [k for k in keys if k != q and SRC[k] == SRC[q]]
        out[g, h, q] = sum(max(0.0, margin - s[g, h, q, p].item() + best_other) for p in pos) / len(pos)
    return out


def test_hinge_terms_match_a_float64_loop():
    s = _scores()
    torch.testing.assert_close(hc_hinge_terms(s, SRC, 0.7), _loop_hinge(s, 0.7), **tol(torch.float64))


def test_hinge_stops_pushing_once_the_sources_are_apart():
    same = SRC[:, None] == SRC[None, :]
    apart = torch.where(same, 10.0, 0.0).to(torch.float64).expand(2, 3, -1, -1).clone().requires_grad_(True)
    loss = hc_hinge_terms(apart, SRC, 1.0).mean()
    loss.backward()
    assert loss.item() == 0.0 and apart.grad.abs().max().item() == 0.0
    # one same-source key of query 0 falls below an other-source key: only that query gets a gradient
    close = apart.detach().clone()
    close[0, 0, 0, 1] = -1.0
    close.requires_grad_(True)
    hc_hinge_terms(close, SRC, 1.0).mean().backward()
    pushed = close.grad.abs().sum(-1) > 0
    assert pushed[0, 0, 0] and pushed.sum().item() == 1


@pytest.mark.parametrize("heads", [None, 1, 2])
def test_infonce_on_a_subset_of_heads_matches_a_float64_loop(heads):
    s = _scores().requires_grad_(True)
    rows = [hc_row_terms(s, SRC)]
    loss = hc_attention_loss(rows, heads)
    assert loss.item() == pytest.approx(_loop_infonce(s.detach(), heads or s.shape[1]), rel=1e-10)
    loss.backward()
    used = s.grad.abs().flatten(2).sum(-1) > 0                       # [G, H]
    assert used[:, :heads or s.shape[1]].all() and not used[:, heads or s.shape[1]:].any()
    # the logits form gives the same loss and gradient as the row terms
    s2 = s.detach().clone().requires_grad_(True)
    loss2 = hc_scores_loss([s2], SRC, "infonce", heads=heads)
    loss2.backward()
    torch.testing.assert_close(loss2, loss, **tol(torch.float64))
    torch.testing.assert_close(s2.grad, s.grad, **tol(torch.float64, kind="grad"))


def _loop_supcon(s, heads):
    terms = []
    for g, h, q in itertools.product(range(s.shape[0]), range(heads), range(s.shape[2])):
        den = sum(math.exp(s[g, h, q, k]) for k in range(s.shape[3]) if k != q)
        pos = [k for k in range(s.shape[3]) if k != q and SRC[k] == SRC[q]]
        terms.append(-sum(math.log(math.exp(s[g, h, q, p]) / den) for p in pos) / len(pos))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("heads", [None, 2])
def test_supcon_form_matches_a_float64_loop(heads):
    a, b = _scores(seed=4), _scores(seed=5)
    want = (_loop_supcon(a, heads or 3) + _loop_supcon(b, heads or 3)) / 2
    got = hc_scores_loss([a, b], SRC, "supcon", heads=heads)
    assert got.item() == pytest.approx(want, rel=1e-10)
    # the row-terms form (what the selection projection's path returns) gives the same loss
    torch.testing.assert_close(hc_attention_loss([hc_row_terms(a, SRC, "supcon")], heads),
                               torch.tensor(_loop_supcon(a, heads or 3), dtype=torch.float64), **tol(torch.float64))


def test_supcon_pulls_every_same_source_key_where_infonce_stops():
    """One same-source key far above the rest satisfies InfoNCE (its gradient on the other same-source
    keys vanishes); the per-positive form still pulls each of them up. This is why it can raise TopK
    precision (recognition) when InfoNCE has settled on a few near-identical neighbours."""
    s = torch.zeros(1, 1, R * N_VIS, R * N_VIS, dtype=torch.float64)
    s[0, 0, 0, 1] = 30.0                      # query 0's first same-source key, far above everything
    grads = {}
    for form in ("infonce", "supcon"):
        x = s.clone().requires_grad_(True)
        hc_scores_loss([x], SRC, form).backward()
        grads[form] = x.grad[0, 0, 0]
    others = [k for k in range(2, R * N_VIS) if SRC[k] == SRC[0]]
    assert grads["infonce"][others].abs().max().item() < 1e-10
    assert (grads["supcon"][others] < -1e-3).all()    # descending the loss raises these logits


def test_hinge_loss_over_blocks_and_heads():
    a, b = _scores(seed=2), _scores(seed=3)
    want = (_loop_hinge(a, 1.0)[:, :2].mean() + _loop_hinge(b, 1.0)[:, :2].mean()) / 2
    torch.testing.assert_close(hc_scores_loss([a, b], SRC, "hinge", 1.0, heads=2), want, **tol(torch.float64))
    with pytest.raises(ValueError, match="hc_form='nce' is not one of infonce, supcon, hinge"):
        hc_scores_loss([a], SRC, "nce")


def _model(*overrides, depth=2):
    torch.manual_seed(0)
    return build_model(load_config("cpu_tiny", [*TINY, f"--model.depth={depth}", *overrides]))


def test_recomputed_logits_are_the_attention_ops_own():
    """hc_grad=qk recomputes each block's logits outside the attention op: same loss as the op's rows."""
    images = torch.randn(8, 3, 16, 16)
    ref, qk = _model(), _model("--mixing.hc_grad=qk")
    assert not ref.hc_from_scores and qk.hc_from_scores
    ids = ref.assign(2, seed=1)
    torch.testing.assert_close(qk(images, ids)["loss_hc"], ref(images, ids)["loss_hc"], **tol(torch.float32))


@pytest.mark.parametrize("grad", ["full", "qk"])
def test_hc_grad_qk_keeps_the_hc_gradient_out_of_the_tokens(grad):
    model = _model("--mixing.hc_form=hinge", "--mixing.hc_margin=5", f"--mixing.hc_grad={grad}")
    model(torch.randn(8, 3, 16, 16))["loss_hc"].backward()
    qkv = model.blocks[1].attn.qkv.weight.grad
    assert qkv is not None and qkv.abs().max() > 0
    embed = model.patch_embed.weight.grad
    reaches_tokens = embed is not None and embed.abs().max().item() > 0
    assert reaches_tokens == (grad == "full")


def test_hc_heads_leaves_the_other_heads_alone():
    """One block: the HC loss on head 0 gives no gradient to the q/k weights of heads 1..H-1."""
    model = _model("--mixing.hc_heads=1", depth=1)
    model(torch.randn(8, 3, 16, 16))["loss_hc"].backward()
    d = model.blocks[0].attn.head_dim
    grad = model.blocks[0].attn.qkv.weight.grad.reshape(3, 4, d, -1).abs().flatten(2).sum(-1)  # [q/k/v, H]
    assert (grad[:2, 0] > 0).all() and (grad[:2, 1:] == 0).all()


@pytest.mark.parametrize("override, message", [
    ("--mixing.hc_heads=5", "mixing.hc_heads = 5: must be <= model.num_heads = 4"),
    ("--mixing.hc_heads=0", "mixing.hc_heads = 0: must be >= 1"),
    ("--mixing.hc_form=nce", "mixing.hc_form = 'nce': must be one of infonce, supcon, hinge"),
    ("--mixing.hc_grad=values", "mixing.hc_grad = 'values': must be one of full, qk"),
    ("--mixing.hc_margin=-1", "mixing.hc_margin = -1.0: must be >= 0"),
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


# -- mixing.topk_self and mixing.hc_select=proj: the reference path of the research switches ---------

def _qkv(G=2, H=3, d=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(G, H, 1 + R * N_VIS, d, generator=g, dtype=torch.float64) for _ in range(3))


def test_selection_on_the_heads_logits_is_the_topk_contract():
    """selected_topk_attention on q·k itself (no switch on) computes what the eager reference does."""
    q, k, v = _qkv()
    sel = _scores_of(q, k)
    out, rows, keep = selected_topk_attention(q, k, v, sel, SRC, N_VIS, hc=True)
    ref_out, ref_rows = homologous_attention_reference(q, k, v, SRC, N_VIS, hc=True)
    # the reference computes in fp32 whatever the input dtype
    torch.testing.assert_close(out.float(), ref_out.float(), **tol(torch.float32))
    torch.testing.assert_close(rows.float(), ref_rows.float(), **tol(torch.float32))
    assert torch.equal(keep, topk_keep_mask(sel, N_VIS))


def _scores_of(q, k):
    return (q @ k.mT)[..., 1:, 1:] * q.shape[-1] ** -0.5


def test_topk_self_keeps_the_query_and_its_k_minus_1_best_others():
    q, k, _ = _qkv()
    sel = _scores_of(q, k)
    keep = selection_keep(sel, N_VIS, self_in=True)
    G, H, M, _ = keep.shape
    for g, h, i in itertools.product(range(G), range(H), range(M)):
        others = [j for j in range(M) if j != i]
        best = sorted(others, key=lambda j: -sel[g, h, i, j].item())[:N_VIS - 1]
        assert set(torch.nonzero(keep[g, h, i]).flatten().tolist()) == {i, *best}
    assert not torch.equal(keep, selection_keep(sel, N_VIS))  # the switch changes some rows here


def _selection_model(*overrides, depth=1):
    return _model("--mixing.hc_select=proj", "--mixing.hc_select_dim=8", *overrides, depth=depth)


@pytest.mark.parametrize("grad", ["full", "qk"])
def test_proj_selection_takes_the_hc_loss_off_the_heads_logits(grad):
    """One block: the HC loss trains the selection projection, never the block's own q/k weights; with
    hc_grad=qk not the tokens either."""
    model = _selection_model(f"--mixing.hc_grad={grad}")
    out = model(torch.randn(8, 3, 16, 16), collect_stats=True)
    out["loss_hc"].backward()
    attn = model.blocks[0].attn
    assert attn.select.weight.grad.abs().max() > 0
    assert attn.qkv.weight.grad is None or attn.qkv.weight.grad.abs().max() == 0
    embed = model.patch_embed.weight.grad
    assert (embed is not None and embed.abs().max().item() > 0) == (grad == "full")
    assert math.isnan(out["stats"]["ha0/jaccard"].item())  # one set shared by the heads
    assert 0 <= out["stats"]["ha0/recognition"].item() <= 1


def test_proj_selection_matches_a_dense_loop_and_is_used_by_the_picture():
    """The block's attention = softmax over (CLS + the projection's TopK keys) of the heads' logits, one
    keep set for every head; the picture shows that set."""
    model = _selection_model(depth=2)
    images = torch.randn(4, 3, 16, 16)
    ids = model.assign(1, seed=3, step=7)
    captured = {}
    attn = model.blocks[1].attn
    attn.register_forward_hook(lambda mod, inp, out: captured.update(x=inp[0], out=out[0]))
    stats = model(images, ids, collect_stats=True)["stats"]
    x = captured["x"].double()
    a = attn.double()
    G, L, C = x.shape
    q, k, v = a.qkv(x).reshape(G, L, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    qs, ks = a.select(x[:, 1:]).chunk(2, dim=-1)
    keep = topk_keep_mask((qs @ ks.mT) / math.sqrt(qs.shape[-1]), model.topk)          # [G, M, M]
    logits = (q @ k.mT) / math.sqrt(a.head_dim)
    logits[..., 1:, 1:] = logits[..., 1:, 1:].masked_fill(~keep[:, None], float("-inf"))
    want = a.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(G, L, C))
    torch.testing.assert_close(captured["out"].double(), want, **tol(torch.float32))
    model.float()
    sel = homologous_selection(model, images, block=1, seed=3, step=7)
    assert sel["keep"].shape == (1, model.group_size * model.n_visible)
    assert sel["block_recognition"] == pytest.approx(stats["ha1/recognition"].item(), rel=1e-6)


def test_proj_selection_trains_on_the_supcon_form():
    """hc_select=proj with hc_form=supcon: the loss is the per-positive form of the projection's logits."""
    model = _selection_model("--mixing.hc_form=supcon")
    captured = {}
    model.blocks[0].attn.register_forward_hook(lambda mod, inp, out: captured.update(x=inp[0]))
    out = model(torch.randn(8, 3, 16, 16), seed=1)
    a, x = model.blocks[0].attn, captured["x"].detach()
    qs, ks = a.select(x[:, 1:]).double().chunk(2, dim=-1)
    sel = ((qs @ ks.mT) / math.sqrt(qs.shape[-1]))[:, None]
    src = torch.arange(model.group_size).repeat_interleave(model.n_visible)
    want = hc_attention_loss([hc_row_terms(sel, src, "supcon")])
    assert out["loss_hc"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["loss_hc"].item() != pytest.approx(hc_attention_loss([hc_row_terms(sel, src)]).item(), rel=1e-3)


def test_proj_selection_is_left_out_of_the_timm_export():
    from mixedae_fast._compat import import_timm
    from mixedae_fast.export import timm_model_spec, timm_state_dict

    cfg = load_config("cpu_tiny", [*TINY, "--model.depth=2", "--mixing.hc_select=proj"])
    model = build_model(cfg)
    assert any(".attn.select." in k for k in model.state_dict())
    name, kwargs = timm_model_spec(vars(cfg.model))
    vit = import_timm().create_model(name, pretrained=False, **kwargs)
    vit.load_state_dict(timm_state_dict(model.state_dict(), cfg.model.patch_size), strict=True)


@pytest.mark.parametrize("override, message", [
    (["--mixing.hc_select=proj", "--mixing.hc_weight=0"], "mixing.hc_select = 'proj': the selection projection"),
    (["--mixing.hc_select=proj", "--mixing.hc_on=head"], "needs hc_weight > 0"),
    (["--mixing.hc_select=proj", "--mixing.hc_form=hinge"], "hc_form = infonce or supcon"),
    (["--mixing.hc_select=proj", "--runtime.attention_backend=flex"], "run on the reference path"),
    (["--mixing.topk_self=true", "--runtime.attention_backend=flex"], "mixing.topk_self = True run on"),
    (["--mixing.hc_select_dim=0"], "mixing.hc_select_dim = 0: must be >= 1"),
    (["--mixing.hc_select=attn"], "mixing.hc_select = 'attn': must be one of attention, proj"),
])
def test_selection_switches_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config("cpu_tiny", [*TINY[:-1], *override])
