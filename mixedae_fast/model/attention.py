"""Attention for the encoder and decoder blocks: global, oracle (per-source), TopK homologous.

The module keeps timm's ``Attention`` parameter names (``qkv``, ``proj``) so the encoder exports to a
timm ``VisionTransformer`` key for key. Which attention a block computes comes from the
:class:`MixLayout` the model hands it per forward; blocks outside ``ha_layers`` (and the decoder) get
``None`` (global).

Backends (``runtime.attention_backend``, overridden by ``$MIXEDAE_ATTENTION_BACKEND``), per mode:

============  =========================  ==================================  ===============================
backend       ``none`` (and decoder)     ``oracle``                          ``topk`` (+ HC row terms)
============  =========================  ==================================  ===============================
``triton``    SDPA                       per-source reshape, SDPA            the fused kernel
``xformers``  memory_efficient_attention per-source reshape, xformers        fp32 scores -> additive bias
``sdpa``      SDPA                       per-source reshape, SDPA            fp32 scores -> additive bias
``flex``      flex_attention             block mask (mask_mod)               per-row threshold score_mod
``eager``     explicit softmax           per-source reshape, explicit        the fp32 reference
============  =========================  ==================================  ===============================

``auto`` takes, per mode, what ``runtime.kernels`` chooses from the one table of measured choices
(:func:`mixedae_fast.measured.choose`: with ``kernels=auto`` the backend measured fastest on this card,
SDPA / the eager reference on cards nobody measured; ``kernels=triton`` the fused kernel for ``topk``;
``kernels=torch`` never the fused kernel). The first use of xformers on a device
runs a startup check; if it fails the block warns once and uses SDPA. Errors, not fallbacks: an
unknown backend, xformers on CPU tensors, triton on CPU without Triton's interpreter.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixedae_fast.choices import ATTENTION_BACKENDS, HA_MODES, KERNEL_BACKENDS
from mixedae_fast.kernels.homologous_attention import (
    check_triton,
    hc_row_terms,
    homologous_attention_reference,
    homologous_attention_triton,
    qk_scores,
    topk_keep_mask,
)
from mixedae_fast.measured import choose

BACKENDS = ATTENTION_BACKENDS
ENV_BACKEND = "MIXEDAE_ATTENTION_BACKEND"


@dataclass(frozen=True)
class HomologousMask:
    """Who attends to whom in one group's sequence ``[CLS, source 0's n tokens, ..., source r-1's]``
    (an attention-bias object in xformers' style: built from the layout, dense only on request).

    ``none``: everyone sees everyone. ``oracle``: a patch query sees its own source and the CLS key.
    ``topk``: a patch query sees its K best-scoring patch keys (ties kept) and the CLS key, so the
    pattern needs the scores. The CLS query always sees every key.
    """

    group_size: int
    n_visible: int
    topk: int | None = None
    mode: str = "topk"

    def __post_init__(self):
        if self.mode not in HA_MODES:
            raise ValueError(f"homologous attention mode {self.mode!r} is not one of {HA_MODES}")
        if self.group_size < 1 or self.n_visible < 1:
            raise ValueError(f"group_size {self.group_size} and n_visible {self.n_visible} must be >= 1")
        if self.mode == "topk" and not 1 <= (self.topk or 0) <= self.group_size * self.n_visible:
            raise ValueError(f"topk={self.topk} must lie in [1, r*n = {self.group_size * self.n_visible}]")

    @classmethod
    def from_layout(cls, layout: MixLayout) -> HomologousMask:
        return cls(layout.group_size, layout.n_visible, layout.topk, layout.mode)

    @classmethod
    def from_assignment(cls, ids: torch.Tensor, group_size: int, mode: str = "topk",
                        topk: int | None = None) -> HomologousMask:
        """From ``ids: [G, r*n]`` (docs/method.md §1): n from its width; ``topk`` defaults to n as the model's."""
        if ids.dim() != 2 or ids.shape[1] % group_size:
            raise ValueError(f"ids of shape {tuple(ids.shape)} is not [G, r*n] for group_size {group_size}")
        n = ids.shape[1] // group_size
        return cls(group_size, n, n if topk is None and mode == "topk" else topk, mode)

    @property
    def seq_len(self) -> int:
        return 1 + self.group_size * self.n_visible

    def source_ids(self, device=None) -> torch.Tensor:
        return torch.arange(self.group_size, device=device).repeat_interleave(self.n_visible)

    def mask_mod(self):
        """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` for ``none`` / ``oracle``: index arithmetic
        only (tokens are source-major), so it also evaluates on broadcast index tensors."""
        n, oracle = self.n_visible, self.mode == "oracle"

        def mask_mod(b, h, q_idx, kv_idx):
            if not oracle:
                return (q_idx >= 0) & (kv_idx >= 0)
            return (q_idx == 0) | (kv_idx == 0) | ((q_idx - 1) // n == (kv_idx - 1) // n)

        return mask_mod

    def materialize(self, scores: torch.Tensor | None = None, additive: bool = False, dtype=torch.float32,
                    device=None) -> torch.Tensor:
        """The dense mask: bool (True = attend) or, with ``additive``, 0 / −inf in ``dtype``.
        ``[L, L]`` for none/oracle; for topk ``[..., L, L]`` from the fp32 ``scores [..., L, L]``."""
        L = self.seq_len
        if self.mode == "topk":
            if scores is None or scores.shape[-2:] != (L, L):
                raise ValueError(f"a topk mask needs the scores [..., {L}, {L}]")
            keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
            keep[..., 1:, 1:] = topk_keep_mask(scores[..., 1:, 1:].float(), self.topk)
        else:
            idx = torch.arange(L, device=device if scores is None else scores.device)
            keep = self.mask_mod()(None, None, idx[:, None], idx[None, :])
        if not additive:
            return keep
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))

    def threshold(self, scores: torch.Tensor) -> torch.Tensor:
        """TopK as a per-row threshold ``[..., L]`` fp32 (row 0, the CLS query: −inf): ``s >= thr``
        keeps exactly the K-th value and its ties. The threshold sits midway between the K-th value
        and the next lower score, so a kernel that recomputes the scores with other rounding (flex on
        a GPU) still selects the same keys unless two scores lie within that rounding (near-ties)."""
        s = scores[..., 1:, 1:].float()
        kth = s.topk(self.topk, dim=-1).values[..., -1:]
        below = s.masked_fill(s >= kth, float("-inf")).amax(dim=-1, keepdim=True)
        mid = kth / 2 + below / 2
        thr = torch.where(below == float("-inf"), below, torch.where(mid > below, mid, kth)).squeeze(-1)
        return torch.cat([torch.full_like(thr[..., :1], float("-inf")), thr], dim=-1)


@dataclass(frozen=True)
class MixLayout:
    """What homologous attention needs to know about one forward's token layout, and (once the encoder
    has run) what its homologous blocks returned.

    Tokens are ``[CLS, source 0's n tokens, ..., source r-1's n tokens]`` per group. ``hc_rows`` and
    ``stats`` hold one entry per homologous-attention block: filled by
    :meth:`MixedAutoencoderViT.forward_encoder <mixedae_fast.model.mixedae.MixedAutoencoderViT.forward_encoder>`
    from the values the blocks *return* (:meth:`with_outputs`), never appended to in place, so
    ``torch.compile`` traces them as plain values (no guard on a list's length, no recompiles).
    """

    group_size: int
    n_visible: int
    mode: str = "topk"
    topk: int = 1
    hc: bool = False
    collect_stats: bool = False
    hc_rows: tuple = ()
    stats: tuple = ()
    hc_form: str = "infonce"  # the form of the HC row terms the blocks return (infonce | supcon)
    hc_heads: int | None = None  # the HC rows of the first hc_heads heads (the loss's heads; None: all)

    def source_ids(self, device) -> torch.Tensor:
        return torch.arange(self.group_size, device=device).repeat_interleave(self.n_visible)

    @property
    def mask(self) -> HomologousMask:
        return HomologousMask.from_layout(self)

    def with_outputs(self, hc_rows, stats) -> MixLayout:
        """This layout holding the blocks' HC row terms and stats (a new object)."""
        return dataclasses.replace(self, hc_rows=tuple(hc_rows), stats=tuple(stats))


# -- choosing a backend ----------------------------------------------------------------------------
def check_backend(value: str, what: str = "attention_backend") -> str:
    """``value`` if it is one of :data:`BACKENDS`, else a ValueError naming ``what`` and the choices."""
    if value not in BACKENDS:
        raise ValueError(f"{what}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def requested_backend(backend: str) -> str:
    """The config's backend, or ``$MIXEDAE_ATTENTION_BACKEND`` when set (for benchmarking)."""
    env = os.environ.get(ENV_BACKEND, "").strip()
    return check_backend(env, ENV_BACKEND) if env else check_backend(backend)


def _preload_cudart12() -> None:
    """xformers 0.0.35's compiled part links ``libcudart.so.12``; a CUDA-13 torch ships only the 13
    runtime. The ``[xformers]`` extra installs ``nvidia-cuda-runtime-cu12``, whose library is not on
    the loader's path: load it globally before xformers imports."""
    try:
        import nvidia  # namespace package of NVIDIA's pip wheels
    except ImportError:
        return
    for root in getattr(nvidia, "__path__", []):
        lib = Path(root, "cuda_runtime", "lib", "libcudart.so.12")
        if lib.exists():
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
            return


@functools.cache
def xformers_problem(device: str) -> str | None:
    """Why xformers cannot run on ``device`` (None = it can): import, then one tiny attention call."""
    if torch.device(device).type != "cuda":
        return "xformers has no CPU operators"
    _preload_cudart12()
    try:
        import xformers.ops as xops
    except Exception as e:  # noqa: BLE001 - any import failure means: not usable
        return f"xformers does not import ({type(e).__name__}: {e}); pip install 'mixedae_fast[xformers]'"
    try:
        x = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.bfloat16)
        xops.memory_efficient_attention(x, x, x)
    except Exception as e:  # noqa: BLE001
        hint = (" (xformers 0.0.35 on a CUDA-13 torch needs libcudart.so.12: pip install nvidia-cuda-runtime-cu12, "
                "part of the [xformers] extra)") if "cudart" in str(e) or "_C" in str(e) else ""
        return f"xformers' operators do not run on {device}: {type(e).__name__}: {e}{hint}"
    return None


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the string
def resolve_backend(requested: str, device: str, mode: str, kernels: str = "auto") -> str:
    """:func:`_resolve_backend`, cached; opaque to ``torch.compile`` (it reads the table file once)."""
    return _resolve_backend(requested, device, mode, kernels)


@functools.cache
def _resolve_backend(requested: str, device: str, mode: str, kernels: str = "auto") -> str:
    """The backend a block runs for ``mode`` on ``device``: ``auto`` resolved under ``runtime.kernels =
    kernels`` (:func:`mixedae_fast.measured.choose`), startup checks done (once per device: xformers falls
    back to SDPA with a warning). Raises for impossible requests."""
    dev = torch.device(device)
    backend = choose(mode, device, kernels) if requested == "auto" else requested
    if backend == "xformers":
        if dev.type != "cuda":
            raise ValueError("attention_backend='xformers' on CPU tensors: xformers has no CPU operators; "
                             "use auto, sdpa, flex or eager on CPU")
        problem = xformers_problem(device)
        if problem is not None:
            warnings.warn(f"attention_backend='xformers': {problem}; using SDPA instead", RuntimeWarning,
                          stacklevel=2)
            return "sdpa"
    if backend == "triton" and mode == "topk":
        check_triton(dev, "attention_backend='triton'" if requested == "triton" else f"kernels={kernels!r}")
    return backend


resolve_backend.cache_clear = _resolve_backend.cache_clear


# -- the backends ----------------------------------------------------------------------------------
def _flat4(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *t.shape[-3:])


def _xformers(q, k, v, bias=None):
    """``[..., H, L, d]`` through xformers' memory_efficient_attention (which takes ``[B, L, H, d]``)."""
    import xformers.ops as xops
    lead = q.shape[:-3]
    q4, k4, v4 = (_flat4(t).transpose(1, 2) for t in (q, k, v))
    out = xops.memory_efficient_attention(q4, k4, v4, attn_bias=bias)
    return out.transpose(1, 2).reshape(*lead, *q.shape[-3:])


def _flex_fn(name: str, device: torch.device):
    """The flex_attention call ``name``: compiled on CUDA (once; its closures are built inside the
    compiled region, so captured tensors do not recompile), eager on CPU (torch's math reference)."""
    fn = _FLEX[name]
    if device.type != "cuda":
        return fn
    if name not in _FLEX_COMPILED:
        _FLEX_COMPILED[name] = torch.compile(fn, dynamic=False)
    return _FLEX_COMPILED[name]


def _flex_plain(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v)


def _flex_masked(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v, block_mask=block_mask)


def _flex_threshold(q, k, v, thr):
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        keep = (q_idx == 0) | (kv_idx == 0) | (score >= thr[b, h, q_idx])
        return torch.where(keep, score, -float("inf"))

    return flex_attention(q, k, v, score_mod=score_mod)


_FLEX = {"plain": _flex_plain, "masked": _flex_masked, "threshold": _flex_threshold}
_FLEX_COMPILED: dict = {}


def _flex(name, q, k, v, *args):
    """Run flex call ``name``. On CPU torch has flex's forward only (its eager math path): there it
    refuses inputs that need a gradient, with a message that names the config key."""
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("attention_backend='flex' on CPU: FlexAttention has no CPU backward in torch "
                             f"{torch.__version__}; train on CPU with auto, sdpa or eager (flex runs there "
                             "under torch.no_grad())")
        q, k, v = q.detach(), k.detach(), v.detach()
    with warnings.catch_warnings():  # on CPU torch warns that the eager path materialises the scores
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _flex_fn(name, q.device)(q, k, v, *args)


@functools.lru_cache(maxsize=16)
def _oracle_block_mask(group_size: int, n_visible: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask
    mask = HomologousMask(group_size, n_visible, mode="oracle")
    return create_block_mask(mask.mask_mod(), None, None, mask.seq_len, mask.seq_len, device=device)


def global_attention(q, k, v, backend: str = "sdpa"):
    """Softmax attention over every key; ``q, k, v: [..., H, L, d]``."""
    if backend == "eager":
        attn = qk_scores(q, k).softmax(dim=-1)
        return (attn @ v.float()).to(q.dtype)
    if backend == "xformers":
        return _xformers(q, k, v)
    if backend == "flex":
        return _flex("plain", _flat4(q), _flat4(k), _flat4(v)).reshape(q.shape)
    return F.scaled_dot_product_attention(q, k, v)


def oracle_attention(q, k, v, group_size: int, n_visible: int, backend: str = "sdpa"):
    """Patch queries see their own source's keys and the CLS key; the CLS query sees all keys.

    Block-diagonal by construction: the patch rows reshape into ``G*r`` sequences of ``1 + n`` keys
    that share the CLS key/value; no dense mask is ever built (flex: a block mask from ``mask_mod``).
    """
    if backend == "flex":
        return _flex("masked", q, k, v, _oracle_block_mask(group_size, n_visible, str(q.device)))
    G, H, L, d = q.shape
    r, n = group_size, n_visible
    cls_out = global_attention(q[:, :, :1], k, v, backend)                     # [G, H, 1, d]

    def per_source(t):  # [G, H, 1+r*n, d] -> [G, H, r, 1+n, d] with the CLS prepended to each source
        return torch.cat([t[:, :, None, :1].expand(G, H, r, 1, d), t[:, :, 1:].reshape(G, H, r, n, d)], dim=3)

    qp = q[:, :, 1:].reshape(G, H, r, n, d)
    patch_out = global_attention(qp, per_source(k), per_source(v), backend)    # [G, H, r, n, d]
    return torch.cat([cls_out, patch_out.reshape(G, H, r * n, d)], dim=2)


def _scores(q, k, with_grad: bool) -> torch.Tensor:
    """fp32 ``q·kᵀ/√d``, exactly as the reference rounds it (matmul, then the scale)."""
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        return qk_scores(q, k)


def topk_attention(q, k, v, mask: HomologousMask, hc: bool = False, backend: str = "eager",
                   hc_heads: int | None = None):
    """TopK homologous attention through ``backend`` -> ``(out, hc_rows | None)`` (the contract of
    :mod:`mixedae_fast.kernels.homologous_attention`; HC rows of the first ``hc_heads`` heads, None: all).
    ``sdpa`` / ``xformers`` / ``flex`` select on fp32 scores computed here (the HC terms come from the
    same scores, with their gradient)."""
    src = mask.source_ids(q.device)
    if backend == "triton":
        return homologous_attention_triton(q, k, v, src, mask.topk, hc, hc_heads)
    if backend == "eager":
        return homologous_attention_reference(q, k, v, src, mask.topk, hc, hc_heads)
    s = _scores(q, k, hc)
    hc_rows = hc_row_terms(s[:, :hc_heads, 1:, 1:], src) if hc else None
    s = s.detach()
    if backend == "flex":
        return _flex("threshold", q, k, v, mask.threshold(s)), hc_rows
    if backend == "xformers":
        L = q.shape[-2]
        pad = -(-L // 8) * 8  # xformers wants the bias rows 8-aligned in memory
        bias = q.new_zeros(*s.shape[:-1], pad)[..., :L]
        bias.masked_fill_(~mask.materialize(s), float("-inf"))
        return _xformers(q, k, v, bias), hc_rows
    bias = mask.materialize(s, additive=True, dtype=q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), hc_rows


def hc_rows_from_logits(q: torch.Tensor, k: torch.Tensor, src: torch.Tensor, form: str,
                        heads: int | None) -> torch.Tensor:
    """A TopK block's HC row terms ``[G, heads, M, 2]`` in ``form`` (:func:`hc_row_terms`) from its own fp32
    patch-to-patch logits, with their gradient: the forms the attention op does not compute itself."""
    return hc_row_terms(_scores(q[:, :heads, 1:], k[:, :heads, 1:], True), src, form)


@torch.no_grad()
def topk_stats(q, k, v_unused, src: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    """Logged metrics of one TopK block (no host sync; scalars stay on the device).

    ``recognition``: among a query's kept patch keys other than itself, the fraction from its own
    source (chance ``(n-1)/(r*n-1)``). ``w_self / w_same / w_other / w_cls``: how the patch queries'
    attention weight splits between themselves, their source's other tokens, other sources, CLS.
    ``jaccard``: how alike the heads select, per query the Jaccard overlap ``|A∩B| / |A∪B|`` of two
    heads' kept patch-key sets, averaged over queries and pairs of heads (1 = every head keeps the
    same keys; NaN with one head).
    """
    s = qk_scores(q, k)
    s_pp = s[..., 1:, 1:]
    keep = topk_keep_mask(s_pp, topk)
    M = s_pp.shape[-1]
    eye = torch.eye(M, dtype=torch.bool, device=q.device)
    same = (src[:, None] == src[None, :]) & ~eye
    kept_other = keep & ~eye
    recognition = (kept_other & same).sum() / kept_other.sum().clamp_min(1)
    w = torch.cat([s[..., 1:, :1], s_pp.masked_fill(~keep, float("-inf"))], dim=-1).softmax(dim=-1)
    w_cls, w_pp = w[..., 0], w[..., 1:]
    kept = keep.float()                                                  # [G, H, M, M]
    inter = torch.einsum("ghmk,gjmk->ghjm", kept, kept)                 # [G, H, H, M]
    size = kept.sum(-1)
    jac = inter / (size[:, :, None] + size[:, None] - inter)
    H = keep.shape[1]
    pairs = torch.triu(torch.ones(H, H, dtype=torch.bool, device=q.device), diagonal=1)
    return {
        "recognition": recognition,
        "jaccard": jac[:, pairs].mean(),
        "w_self": (w_pp * eye).sum(-1).mean(),
        "w_same": (w_pp * same).sum(-1).mean(),
        "w_other": (w_pp * ~(same | eye)).sum(-1).mean(),
        "w_cls": w_cls.mean(),
    }


class HomologousAttention(nn.Module):
    """Multi-head self-attention whose pattern follows the :class:`MixLayout` (None = global).

    ``backend`` is the requested one (``$MIXEDAE_ATTENTION_BACKEND`` overrides it at construction), and
    ``kernels`` the ``runtime.kernels`` setting its ``auto`` follows; each forward resolves them for the mode
    and the tensors' device (:func:`resolve_backend`)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, backend: str = "auto",
                 kernels: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = requested_backend(backend)
        if kernels not in KERNEL_BACKENDS:
            raise ValueError(f"kernels={kernels!r} is not one of {', '.join(KERNEL_BACKENDS)}")
        self.kernels = kernels
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, layout: MixLayout | None = None):
        """``x [B, L, C]`` -> ``(out [B, L, C], hc_rows [B, H, L-1, 2] | None, stats dict | None)``: a TopK
        block returns its HC row terms (with ``layout.hc``) and logged stats (with ``layout.collect_stats``)
        as values; every other block returns ``(out, None, None)``."""
        B, L, C = x.shape
        mode = "none" if layout is None else layout.mode
        if mode not in HA_MODES:
            raise ValueError(f"homologous attention mode {mode!r} is not one of {HA_MODES}")
        backend = resolve_backend(check_backend(self.backend), str(x.device), mode, self.kernels)
        q, k, v = self.split_heads(self.qkv(x))
        hc_rows = stats = None
        if mode == "none":
            out = global_attention(q, k, v, backend)
        elif mode == "oracle":
            out = oracle_attention(q, k, v, layout.group_size, layout.n_visible, backend)
        else:
            from_op = layout.hc and layout.hc_form == "infonce"  # the form the attention op computes itself
            out, hc_rows = topk_attention(q, k, v, layout.mask, from_op, backend, layout.hc_heads)
            if layout.hc and not from_op:
                hc_rows = hc_rows_from_logits(q, k, layout.source_ids(x.device), layout.hc_form, layout.hc_heads)
            if layout.collect_stats:
                stats = topk_stats(q, k, v, layout.source_ids(x.device), layout.topk)
        return self.proj(out.transpose(1, 2).reshape(B, L, C)), hc_rows, stats

    def split_heads(self, qkv: torch.Tensor):
        """The qkv projection's output ``[B, L, 3·C]`` -> ``q, k, v [B, H, L, d]`` (timm's layout)."""
        B, L, _ = qkv.shape
        return qkv.reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every :class:`HomologousAttention` in ``model`` to ``backend`` (one flag, same weights)."""
    check_backend(backend)
    for m in model.modules():
        if isinstance(m, HomologousAttention):
            m.backend = backend
    return model
