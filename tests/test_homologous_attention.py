"""Homologous attention (docs/method.md §3, §4): TopK, oracle, the HC loss's row terms, the logged stats.

Pins: the TopK reference against a brute force written here (per query: sort the patch scores, keep
those >= the K-th, ties included, always the CLS key; the CLS query sees all), outputs and q/k/v
gradients (the selection is not differentiated: the gradient is that of a softmax over a fixed mask);
K = r*n is global attention; ``hc_rows`` and ``hc_attention_loss`` by hand; ``oracle_attention``
against running each source as its own sequence; ``topk_stats`` against brute-force counts; the
``sdpa`` and ``eager`` backends of one ``HomologousAttention`` module agree; bf16 inputs and their
gradients against float64.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import tol

from mixedae_fast.kernels.homologous_attention import (
    homologous_attention,
    homologous_attention_reference,
    topk_keep_mask,
)
from mixedae_fast.model.attention import HomologousAttention, MixLayout, oracle_attention, topk_stats
from mixedae_fast.model.losses import hc_attention_loss


def _qkv(G, H, r, n, d, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    L = 1 + r * n
    out = [torch.randn(G, H, L, d, generator=g).to(dtype) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in out]


def _src(r, n):
    return torch.arange(r).repeat_interleave(n)


def _up(t):
    """fp32 math for fp32 / bf16 inputs, float64 for float64 ones."""
    return t if t.dtype == torch.float64 else t.float()


def brute_force_topk(q, k, v, K):
    """Per (group, head, query): fp32 scores (float64 for float64 inputs), the K-th largest patch score
    by sorting, keep >= it, always the CLS key; the CLS query keeps everything. The mask is built
    without autograd, so the gradient is that of a softmax over a fixed mask. Returns (out in q's
    dtype, keep counts)."""
    G, H, L, d = q.shape
    qf, kf, vf = _up(q), _up(k), _up(v)
    rows, kept = [], torch.zeros(G, H, L, dtype=torch.long)
    for g in range(G):
        for h in range(H):
            for i in range(L):
                s = (kf[g, h] @ qf[g, h, i]) * d ** -0.5                # [L]
                with torch.no_grad():
                    if i == 0:
                        keep = [True] * L
                    else:
                        patch = s[1:].tolist()
                        kth = sorted(patch, reverse=True)[K - 1]
                        keep = [True] + [x >= kth for x in patch]
                keep = torch.tensor(keep)
                kept[g, h, i] = int(keep[1:].sum())
                w = s.masked_fill(~keep, float("-inf")).softmax(dim=0)
                rows.append(w @ vf[g, h])
    return torch.stack(rows).view(G, H, L, v.shape[-1]).to(q.dtype), kept


def brute_force_hc_rows(q, k, src):
    """Per patch query: (log Σ_{k≠q} exp s_qk, log Σ_{k≠q, same source} exp s_qk), fp32."""
    G, H, L, d = q.shape
    M = L - 1
    rows = []
    for g in range(G):
        for h in range(H):
            for i in range(M):
                s = (_up(k[g, h, 1:]) @ _up(q[g, h, 1 + i])) * d ** -0.5
                others = [j for j in range(M) if j != i]
                same = [j for j in others if src[j] == src[i]]
                rows.append(torch.stack([s[others].logsumexp(0), s[same].logsumexp(0)]))
    return torch.stack(rows).view(G, H, M, 2)


# -- TopK ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("G,H,r,n,d,K", [(2, 2, 3, 4, 8, 4), (1, 3, 2, 5, 4, 1), (2, 1, 4, 3, 8, 7),
                                         (1, 2, 1, 6, 8, 3)])
def test_topk_reference_against_brute_force(G, H, r, n, d, K):
    q, k, v = _qkv(G, H, r, n, d, requires_grad=True)
    src = _src(r, n)
    out, hc_rows = homologous_attention_reference(q, k, v, src, K, hc=True)
    assert out.dtype == torch.float32 and hc_rows.dtype == torch.float32
    assert tuple(hc_rows.shape) == (G, H, r * n, 2)
    want, _ = brute_force_topk(q, k, v, K)
    want_hc = brute_force_hc_rows(q, k, src)
    torch.testing.assert_close(out, want, **tol(torch.float32))
    if r > 1 and n > 1:
        torch.testing.assert_close(hc_rows, want_hc, **tol(torch.float32))

    # every gradient, through the output and the HC row terms at once
    gen = torch.Generator().manual_seed(1)
    up_out = torch.randn(out.shape, generator=gen)
    up_hc = torch.randn(hc_rows.shape, generator=gen) if r > 1 and n > 1 else torch.zeros(hc_rows.shape)
    got = torch.autograd.grad((out * up_out).sum() + (hc_rows * up_hc).sum(), (q, k, v))
    ref = torch.autograd.grad((want * up_out).sum() + (want_hc * up_hc).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, ref, strict=True):
        torch.testing.assert_close(a, b, **tol(torch.float32), msg=lambda m, name=name: f"d{name}: {m}")

    # the op the model calls computes the reference
    out2, hc2 = homologous_attention(q, k, v, src, K, hc=True)
    assert torch.equal(out2, out) and torch.equal(hc2, hc_rows)
    assert homologous_attention_reference(q, k, v, src, K)[1] is None


def test_topk_keeps_k_patch_keys_plus_cls_and_the_cls_row_sees_all():
    """With v = identity the output rows *are* the attention weights, so the kept set is visible."""
    G, H, r, n, K = 2, 2, 3, 3, 4
    L = 1 + r * n
    q, k, _ = _qkv(G, H, r, n, L, seed=5)
    q, k = 0.3 * q, 0.3 * k  # no weight underflows to zero
    v = torch.eye(L).expand(G, H, L, L)
    w, _ = homologous_attention_reference(q, k, v, _src(r, n), K)
    assert (w[:, :, 0] > 0).all(), "the CLS query attends to every key"
    assert (w[:, :, 1:, 0] > 0).all(), "every patch query keeps the CLS key"
    assert ((w[:, :, 1:, 1:] > 0).sum(-1) == K).all(), "distinct scores: exactly K patch keys"
    torch.testing.assert_close(w.sum(-1), torch.ones(G, H, L), **tol(torch.float32))


def test_topk_keeps_ties_at_the_kth_value():
    # integer q, k: scores are exact in fp32; every patch key appears twice, so the K-th value of an
    # odd K is always tied with a duplicate beyond position K
    gen = torch.Generator().manual_seed(2)
    G, H, r, n = 1, 2, 2, 3
    L = 1 + r * n
    distinct = torch.randint(-2, 3, (G, H, 3, L), generator=gen).float()
    k = torch.cat([torch.randint(-2, 3, (G, H, 1, L), generator=gen).float(),
                   distinct.repeat_interleave(2, dim=2)], dim=2)
    q = torch.randint(-2, 3, (G, H, L, L), generator=gen).float()
    v = torch.eye(L).expand(G, H, L, L)
    for K in (1, 3, 5):
        w, _ = homologous_attention_reference(q, k, v, _src(r, n), K)
        _, kept = brute_force_topk(q, k, v, K)
        assert torch.equal((w[:, :, 1:, 1:] > 0).sum(-1), kept[:, :, 1:])
        assert (kept[:, :, 1:] >= K + 1).all(), "a duplicate of the K-th key was dropped"
    # the mask helper on an explicit row
    keep = topk_keep_mask(torch.tensor([[3.0, 1.0, 3.0, 2.0]]), 1)
    assert keep.tolist() == [[True, False, True, False]]
    keep = topk_keep_mask(torch.tensor([[3.0, 1.0, 2.0, 2.0]]), 2)
    assert keep.tolist() == [[True, False, True, True]]


def test_topk_with_k_equal_rn_is_global_attention():
    G, H, r, n, d = 2, 3, 4, 4, 8
    q, k, v = _qkv(G, H, r, n, d, requires_grad=True)
    out, _ = homologous_attention_reference(q, k, v, _src(r, n), r * n)
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, want, **tol(torch.float32))
    got = torch.autograd.grad(out.sum(), (q, k, v))
    ref = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **tol(torch.float32))
    # and a smaller K is not
    assert not torch.allclose(homologous_attention_reference(q, k, v, _src(r, n), n)[0], want, atol=1e-3)


def test_topk_bf16_inputs():
    G, H, r, n, d, K = 2, 2, 3, 4, 8, 4
    q, k, v = _qkv(G, H, r, n, d, dtype=torch.bfloat16, requires_grad=True)
    src = _src(r, n)
    out, hc_rows = homologous_attention_reference(q, k, v, src, K, hc=True)
    assert out.dtype == torch.bfloat16 and hc_rows.dtype == torch.float32
    want, _ = brute_force_topk(q, k, v, K)  # fp32 from the upcast inputs, cast to bf16
    torch.testing.assert_close(out, want, **tol(torch.bfloat16, kind="reference"))
    # hc rows are fp32 math on the upcast inputs: fp32 tolerance
    torch.testing.assert_close(hc_rows, brute_force_hc_rows(q, k, src), **tol(torch.float32))
    grads = torch.autograd.grad(out.float().sum() + hc_rows.sum(), (q, k, v))
    assert all(gr.dtype == torch.bfloat16 for gr in grads)


def test_topk_bf16_gradients_against_float64():
    """The reference's bf16 gradients (fp32 math, one rounding to bf16) against the gradient of a
    float64 brute force on the same bf16 inputs. Inputs in steps of 1/4: the scores are exact in both,
    so the selections agree."""
    G, H, r, n, d, K = 2, 2, 3, 4, 8, 4
    gen = torch.Generator().manual_seed(7)
    q, k, v = ((torch.randn(G, H, 1 + r * n, d, generator=gen) * 4).round().div(4).clamp(-3.75, 3.75)
               .to(torch.bfloat16).requires_grad_(True) for _ in range(3))
    src = _src(r, n)
    up_out, up_hc = torch.randn(G, H, 1 + r * n, d, generator=gen), torch.randn(G, H, r * n, 2, generator=gen)
    out, hc_rows = homologous_attention_reference(q, k, v, src, K, hc=True)
    got = torch.autograd.grad((out.float() * up_out).sum() + (hc_rows * up_hc).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want_out, _ = brute_force_topk(q64, k64, v64, K)
    want_hc = brute_force_hc_rows(q64, k64, src)
    want = torch.autograd.grad((want_out * up_out.double()).sum() + (want_hc * up_hc.double()).sum(),
                               (q64, k64, v64))
    for name, a, b in zip("qkv", got, want, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, **tol(torch.bfloat16, "cpu", "grad"),
                                   msg=lambda m, name=name: f"d{name}: {m}")


# -- the HC loss's row terms ---------------------------------------------------------------------
def test_hc_rows_by_hand():
    # G = H = 1, r = n = 2, d = 1 (scale 1): s_qk = q * k
    q = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5]).view(1, 1, 5, 1)
    k = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5]).view(1, 1, 5, 1)
    v = torch.randn(1, 1, 5, 1)
    e = math.exp
    want = torch.tensor([
        # query 0 (q=1, source 0): keys 1 (same), 2, 3 -> scores -1, 2, 0.5
        [math.log(e(-1) + e(2) + e(0.5)), -1.0],
        # query 1 (q=2, source 0): keys 0 (same), 2, 3 -> scores 2, 4, 1
        [math.log(e(2) + e(4) + e(1)), 2.0],
        # query 2 (q=-1, source 1): keys 0, 1, 3 (same) -> scores -1, 1, -0.5
        [math.log(e(-1) + e(1) + e(-0.5)), -0.5],
        # query 3 (q=0.5, source 1): keys 0, 1, 2 (same) -> scores 0.5, -0.5, 1
        [math.log(e(0.5) + e(-0.5) + e(1)), 1.0],
    ]).view(1, 1, 4, 2)
    _, hc_rows = homologous_attention_reference(q, k, v, _src(2, 2), 2, hc=True)
    torch.testing.assert_close(hc_rows, want, **tol(torch.float32))
    # L_hc = mean over queries of -log(Σ_same exp / Σ_{k≠q} exp)
    loss = hc_attention_loss([hc_rows])
    want_loss = sum(-math.log(math.exp(float(p)) / math.exp(float(a))) for a, p in want.view(4, 2)) / 4
    assert abs(float(loss) - want_loss) < 1e-5


def test_hc_attention_loss_averages_queries_heads_then_blocks():
    r, n = 3, 3
    src = _src(r, n)
    blocks = [brute_force_hc_rows(*_qkv(2, H, r, n, 4, seed=H)[:2], src) for H in (1, 3)]
    per_block = []
    for rows in blocks:
        G, H, M, _ = rows.shape
        terms = [float(rows[g, h, i, 0] - rows[g, h, i, 1])
                 for g in range(G) for h in range(H) for i in range(M)]
        per_block.append(sum(terms) / len(terms))
    assert abs(float(hc_attention_loss(blocks)) - sum(per_block) / 2) < 1e-5
    with pytest.raises(ValueError, match="at least one"):
        hc_attention_loss([])


# -- oracle --------------------------------------------------------------------------------------
def _oracle_loop(q, k, v, r, n):
    G, H, L, d = q.shape
    out = torch.empty(G, H, L, d)
    for g in range(G):
        for h in range(H):
            out[g, h, 0] = (q[g, h, 0] @ k[g, h].T * d ** -0.5).softmax(0) @ v[g, h]
            for j in range(r):
                seq = [0] + [1 + j * n + t for t in range(n)]  # the source as its own [CLS, n tokens]
                ks, vs = k[g, h, seq], v[g, h, seq]
                for t in range(n):
                    out[g, h, 1 + j * n + t] = (q[g, h, 1 + j * n + t] @ ks.T * d ** -0.5).softmax(0) @ vs
    return out


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("G,H,r,n,d", [(2, 2, 3, 4, 8), (1, 1, 1, 5, 4), (2, 3, 4, 1, 4)])
def test_oracle_attention_against_per_source_sequences(backend, G, H, r, n, d):
    q, k, v = _qkv(G, H, r, n, d, seed=4)
    out = oracle_attention(q, k, v, r, n, backend)
    assert tuple(out.shape) == (G, H, 1 + r * n, d)
    torch.testing.assert_close(out, _oracle_loop(q, k, v, r, n), **tol(torch.float32))


# -- logged stats --------------------------------------------------------------------------------
def test_topk_stats_against_brute_force():
    G, H, r, n, d, K = 2, 2, 3, 4, 8, 5
    L = 1 + r * n
    q, k, v = _qkv(G, H, r, n, d, seed=6)
    src = _src(r, n)
    stats = topk_stats(q, k, v, src, K)
    assert set(stats) == {"recognition", "jaccard", "w_self", "w_same", "w_other", "w_cls"}
    total = sum(float(stats[key]) for key in ("w_self", "w_same", "w_other", "w_cls"))
    assert abs(total - 1) < 1e-5

    # brute force: pooled over every (group, head, patch query): kept keys other than the query
    same_kept = other_kept = 0
    w_sum = dict(w_self=0.0, w_same=0.0, w_other=0.0, w_cls=0.0)
    eye_v = torch.eye(L).expand(G, H, L, L)
    weights, _ = brute_force_topk(q, k, eye_v, K)  # v = identity: rows are attention weights
    for g in range(G):
        for h in range(H):
            for i in range(r * n):
                s = (k[g, h, 1:] @ q[g, h, 1 + i]) * d ** -0.5
                kth = sorted(s.tolist(), reverse=True)[K - 1]
                for j in range(r * n):
                    if j != i and float(s[j]) >= kth:
                        same_kept += int(src[j] == src[i])
                        other_kept += 1
                w = weights[g, h, 1 + i]
                w_sum["w_cls"] += float(w[0])
                for j in range(r * n):
                    key = "w_self" if j == i else "w_same" if src[j] == src[i] else "w_other"
                    w_sum[key] += float(w[1 + j])
    assert abs(float(stats["recognition"]) - same_kept / other_kept) < 1e-6
    for key, value in w_sum.items():
        assert abs(float(stats[key]) - value / (G * H * r * n)) < 1e-5, key


# -- the module and its backend flag -------------------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "oracle", "global"])
def test_homologous_attention_backends_agree(mode):
    torch.manual_seed(0)
    r, n, dim = 3, 4, 32
    attn = HomologousAttention(dim, num_heads=4, backend="sdpa")
    x = torch.randn(2, 1 + r * n, dim, requires_grad=True)

    def run(backend):
        attn.backend = backend
        layout = None if mode == "global" else MixLayout(r, n, mode=mode)
        out = attn(x, layout)[0]
        grads = torch.autograd.grad(out.pow(2).sum(), [x, *attn.parameters()])
        return out, grads

    out_sdpa, g_sdpa = run("sdpa")
    out_eager, g_eager = run("eager")
    torch.testing.assert_close(out_sdpa, out_eager, **tol(torch.float32))
    for a, b in zip(g_sdpa, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # summed over the batch: looser
    # oracle is not global attention
    if mode == "oracle":
        attn.backend = "sdpa"
        assert not torch.allclose(attn(x, None)[0], out_sdpa, atol=1e-3)


def test_homologous_attention_module_topk_returns_rows_and_stats():
    """A TopK block returns its HC rows and stats as values (nothing is stored on the layout), the
    rows those of the reference on the block's own q, k."""
    r, n, dim = 2, 3, 16
    attn = HomologousAttention(dim, num_heads=2)
    layout = MixLayout(r, n, mode="topk", topk=2, hc=True, collect_stats=True)
    x = torch.randn(3, 1 + r * n, dim)
    out, hc_rows, stats = attn(x, layout)
    assert tuple(out.shape) == tuple(x.shape) and tuple(hc_rows.shape) == (3, 2, r * n, 2)
    q, k, v = attn.qkv(x).reshape(3, 1 + r * n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(hc_rows, brute_force_hc_rows(q, k, _src(r, n)), **tol(torch.float32))
    assert set(stats) == {"recognition", "jaccard", "w_self", "w_same", "w_other", "w_cls"}
    assert layout.hc_rows == () and layout.stats == ()
    _, none_rows, none_stats = attn(x, MixLayout(r, n, mode="topk", topk=2))
    assert none_rows is None and none_stats is None
    assert attn(x, MixLayout(r, n, mode="oracle"))[1:] == (None, None)
    with pytest.raises(ValueError, match="topk.*oracle.*none"):
        attn(torch.randn(1, 1 + r * n, dim), MixLayout(r, n, mode="bogus"))
    with pytest.raises(ValueError, match="auto, triton, xformers, sdpa, flex, eager"):
        HomologousAttention(dim, num_heads=2, backend="flash")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        HomologousAttention(18, num_heads=4)
