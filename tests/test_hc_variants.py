"""HC loss variants (mixing.hc_heads / hc_form / hc_margin / hc_grad) against float64 loops written
here, where their gradients go, their config validation, and the heads' TopK overlap (Jaccard) that
the trainer logs per block."""
import itertools
import math

import pytest
import torch
from tolerances import tol

from mixedae_fast.attention import topk_stats
from mixedae_fast.config import ConfigError, load_config
from mixedae_fast.kernels.homologous_attention import hc_row_terms, topk_keep_mask
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


def test_hinge_loss_over_blocks_and_heads():
    a, b = _scores(seed=2), _scores(seed=3)
    want = (_loop_hinge(a, 1.0)[:, :2].mean() + _loop_hinge(b, 1.0)[:, :2].mean()) / 2
    torch.testing.assert_close(hc_scores_loss([a, b], SRC, "hinge", 1.0, heads=2), want, **tol(torch.float64))
    with pytest.raises(ValueError, match="hc_form='nce' is not one of infonce, hinge"):
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
    ("--mixing.hc_form=nce", "mixing.hc_form = 'nce': must be one of infonce, hinge"),
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
