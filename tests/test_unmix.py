"""Unmix (docs/method.md §5): the group's decoder tokens -> one ``[N+1]`` decoder sequence per source.

Pins: ``unmix_reference`` (and the op the model calls) against an explicit per-source loop;
unmix∘mix is the identity on each source's visible patches (mask token elsewhere, group CLS in row 0);
gradients by hand (CLS: summed over the r sources, mask token: summed over masked slots, the fixed
``dec_pos``: none); bf16 keeps its dtype; shape errors.
"""
import pytest
import torch
from tolerances import tol

from mixedae_fast.kernels.assignment import draw_assignment
from mixedae_fast.kernels.patch_mix import patch_mix_reference, patchify
from mixedae_fast.kernels.unmix import unmix, unmix_reference

# unmix only gathers and adds one position embedding: tolerances.py's "gather" rows.


def _inputs(G, r, n, N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dec_tokens = torch.randn(G, 1 + r * n, D, generator=g).to(dtype)
    mask_token = torch.randn(1, 1, D, generator=g)
    dec_pos = torch.randn(1, N + 1, D, generator=g)
    ids = draw_assignment(G, N, r, n, seed=seed, step=0)
    return dec_tokens, ids, mask_token, dec_pos


def _unmix_loop(dec_tokens, ids, mask_token, dec_pos, r):
    G, L, D = dec_tokens.shape
    n = (L - 1) // r
    N = dec_pos.shape[1] - 1
    out = torch.empty(G * r, N + 1, D, dtype=torch.float64)
    for g in range(G):
        for j in range(r):
            b = g * r + j
            out[b, 0] = dec_tokens[g, 0].double() + dec_pos[0, 0].double()
            for p in range(N):
                out[b, 1 + p] = mask_token.reshape(D).double() + dec_pos[0, 1 + p].double()
            for t in range(n):
                p = int(ids[g, j * n + t])
                out[b, 1 + p] = dec_tokens[g, 1 + j * n + t].double() + dec_pos[0, 1 + p].double()
    return out


@pytest.mark.parametrize("G,r,n,N,D", [(2, 4, 4, 16, 8), (3, 3, 4, 16, 5), (1, 2, 7, 25, 6),
                                       (2, 1, 4, 16, 8)])
def test_unmix_reference_against_loop(G, r, n, N, D):
    dec_tokens, ids, mask_token, dec_pos = _inputs(G, r, n, N, D)
    out = unmix_reference(dec_tokens, ids, mask_token, dec_pos, r)
    assert out.dtype == torch.float32 and tuple(out.shape) == (G * r, N + 1, D)
    torch.testing.assert_close(out.double(), _unmix_loop(dec_tokens, ids, mask_token, dec_pos, r),
                               **tol(torch.float32, kind="gather"))
    # mask_token may also come flat [D]; the op the model calls computes the reference
    assert torch.equal(unmix_reference(dec_tokens, ids, mask_token.reshape(D), dec_pos, r), out)
    assert torch.equal(unmix(dec_tokens, ids, mask_token, dec_pos, r), out)


@pytest.mark.parametrize("B,S,P,r,n", [(8, 16, 4, 4, 4), (6, 16, 4, 3, 3), (2, 20, 4, 2, 10)])
def test_unmix_inverts_mix(B, S, P, r, n):
    """Decoder tokens made of the mixed patches themselves: each source gets back its own patches."""
    N, D = (S // P) ** 2, 3 * P * P
    images = torch.randn(B, 3, S, S)
    G = B // r
    ids = draw_assignment(G, N, r, n, seed=1, step=2)
    mixed, _, loss_mask = patch_mix_reference(images, ids, r, n, P)
    cls = torch.randn(G, 1, D)
    mask_token = torch.randn(D)
    dec_pos = torch.randn(1, N + 1, D)
    out = unmix_reference(torch.cat([cls, mixed], dim=1), ids, mask_token, dec_pos, r) - dec_pos
    patches = patchify(images, P)
    visible = ~loss_mask
    gather = tol(torch.float32, kind="gather")
    torch.testing.assert_close(out[:, 1:][visible], patches[visible], **gather)
    torch.testing.assert_close(out[:, 1:][loss_mask], mask_token.expand(int(loss_mask.sum()), D), **gather)
    torch.testing.assert_close(out[:, 0], cls[:, 0].repeat_interleave(r, dim=0), **gather)


@pytest.mark.parametrize("G,r,n,N", [(2, 4, 3, 16), (1, 2, 5, 16)])
def test_unmix_gradients_by_hand(G, r, n, N):
    D = 6
    dec_tokens, ids, mask_token, dec_pos = _inputs(G, r, n, N, D, seed=3)
    dec_tokens.requires_grad_(True)
    mask_token.requires_grad_(True)
    dec_pos.requires_grad_(True)  # a leaf that wants grad: unmix must still give it none
    upstream = torch.randn(G * r, N + 1, D)
    unmix_reference(dec_tokens, ids, mask_token, dec_pos, r).backward(upstream)

    want_tokens = torch.zeros(G, 1 + r * n, D)
    want_mask = torch.zeros(D)
    for g in range(G):
        for j in range(r):
            b = g * r + j
            want_tokens[g, 0] += upstream[b, 0]
            vis = ids[g, j * n:(j + 1) * n].tolist()
            for t, p in enumerate(vis):
                want_tokens[g, 1 + j * n + t] = upstream[b, 1 + p]
            for p in set(range(N)) - set(vis):
                want_mask += upstream[b, 1 + p]
    torch.testing.assert_close(dec_tokens.grad, want_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mask_token.grad.reshape(D), want_mask, rtol=1e-5, atol=1e-5)
    assert dec_pos.grad is None


def test_unmix_bf16_keeps_dtype():
    G, r, n, N, D = 2, 2, 6, 16, 8
    dec_tokens, ids, mask_token, dec_pos = _inputs(G, r, n, N, D, dtype=torch.bfloat16)
    out = unmix_reference(dec_tokens, ids, mask_token, dec_pos, r)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _unmix_loop(dec_tokens, ids, mask_token, dec_pos, r),
                               **tol(torch.bfloat16, kind="gather"))
    # gradients reach the bf16 tokens and the fp32 mask token in their own dtypes
    dec_tokens.requires_grad_(True)
    mask_token.requires_grad_(True)
    unmix_reference(dec_tokens, ids, mask_token, dec_pos, r).float().sum().backward()
    assert dec_tokens.grad.dtype == torch.bfloat16 and mask_token.grad.dtype == torch.float32
    assert torch.isfinite(mask_token.grad).all() and float(mask_token.grad.abs().sum()) > 0


def test_unmix_shape_errors():
    dec_tokens, ids, mask_token, dec_pos = _inputs(2, 4, 3, 16, 6)
    with pytest.raises(ValueError, match="do not fit group_size"):
        unmix_reference(dec_tokens[:, :-1], ids, mask_token, dec_pos, 4)
    with pytest.raises(ValueError, match="do not fit group_size"):
        unmix_reference(dec_tokens, ids[:, :-1], mask_token, dec_pos, 4)
    with pytest.raises(ValueError, match="do not fit group_size"):
        unmix_reference(dec_tokens, ids, mask_token, dec_pos, 5)
