"""MixedAutoencoderViT: MixedAE (Chen et al., CVPR 2023) as docs/method.md states it.

The methods are the method's steps, in order:

    ids = assign(G, seed, step)                       # [G, r*n] source-major positions
    mixed, targets, loss_mask = mix(images, ids)      # [G, r*n, 3P²], [B, N, 3P²], [B, N]
    latent, layout = forward_encoder(mixed, ids)      # [G, 1 + r*n, D]  (homologous attention)
    x = unmix(latent, ids)                            # [B, N + 1, Dd]
    pred = forward_decoder(x)                         # [B, N, 3P²]
    loss = forward_loss(pred, targets, loss_mask) + λ_hc · forward_hc(latent, layout)

Mask convention as MAE: ``loss_mask`` True = not visible for that source (reconstructed).
``r = 1, ha = "none", hc_weight = 0`` is MAE's function exactly.
"""
from __future__ import annotations

import math
import warnings
from functools import partial

import torch
from torch import nn

from mixedae_fast._compat import import_timm
from mixedae_fast.attention import HomologousAttention, MixLayout
from mixedae_fast.choices import (
    ATTENTION_BACKENDS,
    HA_MODES,
    HC_FORMS,
    HC_GRADS,
    HC_ON,
    HC_ROW_FORMS,
    HC_SELECT,
    KERNEL_BACKENDS,
    SEGMENT_EMBED,
    hc_flags,
    hc_ignored,
    n_visible,
    resolve_ha_layers,
)
from mixedae_fast.kernels.homologous_attention import qk_scores
from mixedae_fast.kernels.patch_mix import draw_assignment, patch_mix, patchify
from mixedae_fast.kernels.unmix import unmix as unmix_op
from mixedae_fast.losses import hc_attention_loss, hc_scores_loss, reconstruction_loss, supcon_loss

import_timm()
from timm.models.vision_transformer import Block  # noqa: E402  (after the torchvision shim)

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return value


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding ``[grid², D]`` (+ a zero CLS row), MAE's channel order
    ``[sin w, cos w, sin h, cos h]``; position ``p = row * grid + col``. Computed in float64."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    h, w = torch.meshgrid(coords, coords, indexing="ij")

    def one_axis(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([one_axis(w), one_axis(h)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


class MixedBlock(Block):
    """timm's ViT ``Block`` (same parameter names) with attention that follows a :class:`MixLayout`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "auto",
                 select_dim: int = 0, select_detach: bool = False):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
        self.attn = HomologousAttention(dim, num_heads, qkv_bias=True, backend=backend, select_dim=select_dim,
                                        select_detach=select_detach)

    def forward(self, x: torch.Tensor, layout: MixLayout | None = None) -> torch.Tensor:
        return self.forward_homologous(x, layout)[0]

    def forward_homologous(self, x: torch.Tensor, layout: MixLayout | None = None):
        """``(x, hc_rows | None, stats | None)``: the block's output and what its attention returned."""
        out, hc_rows, stats = self.attn(self.norm1(x), layout)
        x = x + self.drop_path1(self.ls1(out))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), hc_rows, stats


class MixedAutoencoderViT(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, group_size: int = 4,
                 mask_ratio: float = 0.75, ha: str = "topk", ha_layers=None, topk: int | None = None,
                 hc_on: str = "attention", hc_weight: float = 1.0, hc_tau: float = 0.2,
                 segment_embed: str = "none", norm_pix_loss: bool = True, attention_backend: str = "auto",
                 kernels: str = "auto", hc_heads: int | None = 1, hc_form: str = "infonce",
                 hc_margin: float = 1.0, hc_grad: str = "full", hc_select: str = "attention",
                 hc_select_dim: int = 16, topk_self: bool = False, warn_ignored: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.patch_dim = patch_size ** 2 * in_chans
        self.group_size = r = group_size
        self.n_visible = n = n_visible(self.num_patches, mask_ratio)
        if r < 1 or n < 1 or r * n > self.num_patches:
            raise ValueError(f"group_size * n_visible = {r} * {n} must lie in [1, num_patches = "
                             f"{self.num_patches}] (mask_ratio {mask_ratio})")
        self.ha = _choice("ha", ha, HA_MODES)
        self.hc_on = _choice("hc_on", hc_on, HC_ON)
        self.segment_embed = _choice("segment_embed", segment_embed, SEGMENT_EMBED)
        _choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
        self.kernels = _choice("kernels", kernels, KERNEL_BACKENDS)  # patch_mix / unmix: auto | triton | torch
        self.topk = n if topk is None else topk
        if not 1 <= self.topk <= r * n:
            raise ValueError(f"topk={self.topk} must lie in [1, r*n = {r * n}]")
        self.ha_layers = resolve_ha_layers(ha, ha_layers, depth)
        self.hc_weight, self.hc_tau, self.norm_pix_loss = hc_weight, hc_tau, norm_pix_loss
        self.hc_attention, self.hc_features = hc_flags(hc_weight, r, hc_on, ha, self.ha_layers)
        ignored = hc_ignored(hc_weight, r, hc_on, ha, self.ha_layers)
        if ignored and warn_ignored:
            warnings.warn(f"hc_weight = {hc_weight} partly or wholly ignored: {'; '.join(ignored)} (got ha={ha}, "
                          f"group_size={r})", stacklevel=2)
        if (self.hc_attention or self.hc_features) and n < 2:
            raise ValueError(f"the homologous contrastive loss needs n_visible >= 2 (got {n})")
        # variants of the attention HC loss (losses.py): on the first hc_heads heads; infonce | supcon | hinge;
        # hc_grad="qk": its gradient reaches the q/k projections only, not the tokens
        self.hc_form, self.hc_grad = _choice("hc_form", hc_form, HC_FORMS), _choice("hc_grad", hc_grad, HC_GRADS)
        if hc_heads is not None and not 1 <= hc_heads <= num_heads:
            raise ValueError(f"hc_heads={hc_heads} must lie in [1, num_heads = {num_heads}] or be None (all)")
        self.hc_heads, self.hc_margin = hc_heads, hc_margin
        # hc_select="proj": each HA block selects (one set for all heads) on a separate select_dim-wide
        # projection that the HC loss trains instead of the heads' logits; topk_self: the query's own key
        # always kept. Both run on the reference path (attention.selected_topk_attention).
        self.hc_select, self.topk_self = _choice("hc_select", hc_select, HC_SELECT), bool(topk_self)
        if hc_select == "proj" and not (self.hc_attention and hc_form in HC_ROW_FORMS
                                        and hc_select_dim >= 1):
            raise ValueError("hc_select='proj' needs the attention HC loss on (hc_weight > 0, ha='topk', "
                             "group_size > 1), hc_form 'infonce' or 'supcon' and hc_select_dim >= 1 (hc_heads "
                             "does not apply: one selection serves every head)")
        select_dim = hc_select_dim if hc_select == "proj" else 0
        # forms the attention op's row terms do not give: the loss from logits recomputed per block
        self.hc_from_scores = self.hc_attention and hc_select == "attention" and (hc_form != "infonce"
                                                                                   or hc_grad != "full")

        # encoder
        self.patch_embed = nn.Linear(self.patch_dim, embed_dim)  # a Linear on (p, q, c) patch vectors
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid)[None])
        self.seg_embed = nn.Parameter(torch.zeros(r, embed_dim)) if segment_embed == "encoder" else None
        self.blocks = nn.ModuleList(
            MixedBlock(embed_dim, num_heads, mlp_ratio, attention_backend,
                       select_dim=select_dim if i in self.ha_layers else 0, select_detach=hc_grad == "qk")
            for i in range(depth))
        self.norm = LayerNorm(embed_dim)
        self.hc_head = None
        if self.hc_features and hc_on in ("head", "both"):
            self.hc_head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, 128))
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_embed_dim, self.grid)[None])
        self.decoder_blocks = nn.ModuleList(MixedBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio,
                                                       attention_backend) for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's: xavier-uniform Linears (the patch embedding included), zero biases, unit LayerNorms,
        N(0, 0.02) tokens."""
        for p in (self.cls_token, self.mask_token, self.seg_embed):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- the method's steps ------------------------------------------------------------------------
    def assign(self, num_groups: int, seed: int = 0, step: int = 0, first_group: int = 0,
               device=None) -> torch.Tensor:
        """``ids: int32 [G, r*n]`` (docs/method.md §1), keyed by (seed, step, global group index)."""
        device = self.pos_embed.device if device is None else device
        return draw_assignment(num_groups, self.num_patches, self.group_size, self.n_visible, seed, step,
                               first_group, device, backend=self.kernels)

    def mix(self, images: torch.Tensor, ids: torch.Tensor):
        """``images [B, C, S, S]`` -> ``(mixed [G, r*n, 3P²], targets [B, N, 3P²] fp32, loss_mask [B, N])``."""
        return patch_mix(images, ids, self.group_size, self.n_visible, self.patch_size, self.norm_pix_loss,
                         backend=self.kernels)

    def make_layout(self, hc: bool | None = None, collect_stats: bool = False) -> MixLayout:
        hc = self.hc_attention and not self.hc_from_scores if hc is None else hc
        return MixLayout(self.group_size, self.n_visible, self.ha, self.topk, hc=hc, collect_stats=collect_stats,
                         topk_self=self.topk_self, hc_form=self.hc_form, hc_heads=self.hc_heads)

    def forward_encoder(self, mixed: torch.Tensor, ids: torch.Tensor, layout: MixLayout | None = None,
                        hc_scores: list | None = None):
        """``mixed [G, r*n, 3P²]`` -> ``latent [G, 1 + r*n, D]`` after the final norm, and a copy of the
        layout holding the HC row terms and stats each homologous block returned. A list ``hc_scores``
        receives each homologous block's HC logits (:meth:`hc_block_scores`, for the non-default HC forms)."""
        layout = self.make_layout() if layout is None else layout
        x = self.patch_embed(mixed) + self.pos_embed[0, 1:][ids.long()]
        if self.seg_embed is not None:
            x = x + self.seg_embed.repeat_interleave(self.n_visible, dim=0)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        ha_layers = set(self.ha_layers)
        hc_rows, stats = [], []
        for i, blk in enumerate(self.blocks):
            if hc_scores is not None and i in ha_layers:
                hc_scores.append(self.hc_block_scores(blk, x))
            x, rows, st = blk.forward_homologous(x, layout if i in ha_layers else None)
            hc_rows += [] if rows is None else [rows]
            stats += [] if st is None else [st]
        return self.norm(x), layout.with_outputs(hc_rows, stats)

    def hc_block_scores(self, blk: MixedBlock, x: torch.Tensor) -> torch.Tensor:
        """fp32 patch-to-patch logits ``q·k/√d [G, H, M, M]`` of block ``blk`` on its input ``x``: the
        scores its TopK selects on, recomputed (the reference path) for the HC forms that need them.
        With ``hc_grad="qk"`` the input is detached, so the loss trains the selection (q/k projections
        and the block's first norm) without reshaping the tokens the features are made of."""
        attn = blk.attn
        x = x.detach() if self.hc_grad == "qk" else x
        G, L, _ = x.shape
        qk = attn.qkv(blk.norm1(x)).reshape(G, L, 3, attn.num_heads, attn.head_dim)[:, 1:, :2]
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        return qk_scores(q, k)

    def unmix(self, latent: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``latent [G, 1 + r*n, D]`` -> decoder input ``[B, N + 1, Dd]`` (docs/method.md §5)."""
        return unmix_op(self.decoder_embed(latent), ids, self.mask_token, self.decoder_pos_embed,
                        self.group_size, backend=self.kernels)

    def forward_decoder(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N + 1, Dd]`` -> pixel predictions ``[B, N, 3P²]`` (global attention)."""
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, pred, targets, loss_mask) -> torch.Tensor:
        return reconstruction_loss(pred, targets, loss_mask)

    def forward_hc(self, latent: torch.Tensor, layout: MixLayout, hc_scores: list | None = None) -> torch.Tensor:
        """The homologous contrastive loss (unweighted), or a zero when it is inactive."""
        parts = []
        if self.hc_from_scores:
            parts.append(hc_scores_loss(hc_scores, layout.source_ids(latent.device), self.hc_form, self.hc_margin,
                                        self.hc_heads))
        elif self.hc_attention:
            parts.append(hc_attention_loss(layout.hc_rows, self.hc_heads))
        if self.hc_features:
            tokens = latent[:, 1:]
            feats = self.hc_head(tokens) if self.hc_head is not None else tokens
            parts.append(supcon_loss(feats, layout.source_ids(latent.device), self.hc_tau))
        return torch.stack(parts).sum() if parts else latent.new_zeros((), dtype=torch.float32)

    def forward(self, images: torch.Tensor, ids: torch.Tensor | None = None, *, seed: int = 0, step: int = 0,
                first_group: int = 0, collect_stats: bool = False) -> dict:
        """One training step's forward. Returns a dict: ``loss``, ``loss_rec``, ``loss_hc`` (fp32
        scalars), ``pred``, ``targets``, ``loss_mask``, ``ids`` and, with ``collect_stats``, ``stats``
        (per homologous block: recognition accuracy and the attention-weight split)."""
        self._check_images(images)
        G = images.shape[0] // self.group_size
        if ids is None:
            ids = self.assign(G, seed, step, first_group, images.device)
        mixed, targets, loss_mask = self.mix(images, ids)
        hc_scores = [] if self.hc_from_scores else None
        latent, layout = self.forward_encoder(mixed, ids, self.make_layout(collect_stats=collect_stats), hc_scores)
        pred = self.forward_decoder(self.unmix(latent, ids))
        loss_rec = self.forward_loss(pred, targets, loss_mask)
        loss_hc = self.forward_hc(latent, layout, hc_scores)
        out = dict(loss=loss_rec + self.hc_weight * loss_hc, loss_rec=loss_rec, loss_hc=loss_hc, pred=pred,
                   targets=targets, loss_mask=loss_mask, ids=ids)
        if collect_stats:
            out["stats"] = {f"ha{i}/{k}": v for i, s in zip(self.ha_layers, layout.stats) for k, v in s.items()}
            # per-block columns of metrics.csv (the trainer averages each name over blocks; these have one)
            out["stats"].update({f"ha{i}/{k}_b{i}": s[k] for i, s in zip(self.ha_layers, layout.stats)
                                 for k in ("recognition", "jaccard")})
        return out

    def _check_images(self, images: torch.Tensor, grouped: bool = True) -> None:
        shape = tuple(images.shape)
        S = self.img_size
        if images.dim() != 4 or shape[1:] != (self.in_chans, S, S):
            raise ValueError(f"images of shape {shape}; this model takes [B, {self.in_chans}, {S}, {S}]")
        if grouped and shape[0] % self.group_size:
            raise ValueError(f"batch of {shape[0]} images is not a multiple of group_size {self.group_size}")

    @property
    def recognition_chance(self) -> float:
        """Recognition accuracy of a random TopK selection: ``(n-1)/(r*n-1)``."""
        r, n = self.group_size, self.n_visible
        return (n - 1) / (r * n - 1) if r * n > 1 else math.nan

    # -- downstream: the encoder as a plain ViT --------------------------------------------------
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked, unmixed images through the encoder with global attention: ``[B, 1 + N, D]``."""
        self._check_images(images, grouped=False)
        x = self.patch_embed(patchify(images, self.patch_size).to(self.patch_embed.weight.dtype))
        x = x + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def extract_features(self, images: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        """Probe features: mean-pooled patch tokens after the final norm (default) or the CLS token."""
        tokens = self.forward_features(images)
        if pool == "avg":
            return tokens[:, 1:].mean(dim=1)
        if pool == "cls":
            return tokens[:, 0]
        raise ValueError(f"pool={pool!r} is not one of avg, cls")


def build_model(cfg) -> MixedAutoencoderViT:
    """The model a :class:`mixedae_fast.config.Config` describes."""
    m, x = cfg.model, cfg.mixing
    return MixedAutoencoderViT(
        img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=m.embed_dim,
        depth=m.depth, num_heads=m.num_heads, decoder_embed_dim=m.decoder_embed_dim,
        decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_num_heads, mlp_ratio=m.mlp_ratio,
        group_size=x.group_size, mask_ratio=x.mask_ratio, ha=x.ha, ha_layers=x.ha_layers, topk=x.topk,
        hc_on=x.hc_on, hc_weight=x.hc_weight, hc_tau=x.hc_tau, segment_embed=x.segment_embed,
        norm_pix_loss=x.norm_pix_loss, attention_backend=cfg.runtime.attention_backend,
        kernels=cfg.runtime.kernels, hc_heads=x.hc_heads, hc_form=x.hc_form, hc_margin=x.hc_margin,
        hc_grad=x.hc_grad, hc_select=x.hc_select, hc_select_dim=x.hc_select_dim, topk_self=x.topk_self,
        warn_ignored=False,  # load_config warned already
    )
