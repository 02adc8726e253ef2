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

import dataclasses
import math
from functools import partial

import torch
from torch import nn

from mixedae_fast._compat import import_timm
from mixedae_fast.choices import (
    ATTENTION_BACKENDS,
    HA_MODES,
    KERNEL_BACKENDS,
    SEGMENT_EMBED,
    n_visible,
    resolve_ha_layers,
)
from mixedae_fast.config import MixingConfig as _X
from mixedae_fast.config import ModelConfig as _M
from mixedae_fast.config import RuntimeConfig as _R
from mixedae_fast.kernels.assignment import draw_assignment
from mixedae_fast.kernels.patch_mix import patch_mix, patchify
from mixedae_fast.kernels.unmix import unmix as unmix_op
from mixedae_fast.model.attention import HomologousAttention, MixLayout
from mixedae_fast.model.hc import HCObjective
from mixedae_fast.model.losses import reconstruction_loss

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
                 kernels: str = "auto"):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
        self.attn = HomologousAttention(dim, num_heads, qkv_bias=True, backend=backend, kernels=kernels)

    def forward(self, x: torch.Tensor, layout: MixLayout | None = None) -> torch.Tensor:
        return self.forward_homologous(x, layout)[0]

    def forward_homologous(self, x: torch.Tensor, layout: MixLayout | None = None):
        """``(x, hc_rows | None, stats | None)``: the block's output and what its attention returned."""
        out, hc_rows, stats = self.attn(self.norm1(x), layout)
        x = x + self.drop_path1(self.ls1(out))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), hc_rows, stats


class MixedAutoencoderViT(nn.Module):
    # the keywords are the config's model and mixing fields (config.py: their meaning and their defaults,
    # which these take from there), then runtime's two backends
    def __init__(self, img_size=_M.img_size, patch_size=_M.patch_size, in_chans=_M.in_chans, embed_dim=_M.embed_dim,
                 depth=_M.depth, num_heads=_M.num_heads, decoder_embed_dim=_M.decoder_embed_dim,
                 decoder_depth=_M.decoder_depth, decoder_num_heads=_M.decoder_num_heads, mlp_ratio=_M.mlp_ratio,
                 group_size=_X.group_size, mask_ratio=_X.mask_ratio, ha=_X.ha, ha_layers=_X.ha_layers, topk=_X.topk,
                 hc_on=_X.hc_on, hc_weight=_X.hc_weight, hc_tau=_X.hc_tau, hc_heads=_X.hc_heads, hc_form=_X.hc_form,
                 segment_embed=_X.segment_embed, norm_pix_loss=_X.norm_pix_loss,
                 attention_backend=_R.attention_backend, kernels=_R.kernels, warn_ignored=True):
        super().__init__()
        self._set_layout(img_size, patch_size, in_chans, group_size, mask_ratio, ha, ha_layers, topk, depth)
        self.segment_embed = _choice("segment_embed", segment_embed, SEGMENT_EMBED)
        _choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
        kernels = _choice("kernels", kernels, KERNEL_BACKENDS)
        self.norm_pix_loss = norm_pix_loss
        self.hc = HCObjective.build(hc_weight, hc_on, hc_form, hc_heads, hc_tau, group_size=group_size,
                                    n_visible=self.n_visible, ha=ha, ha_layers=self.ha_layers, num_heads=num_heads,
                                    warn=warn_ignored)
        # encoder
        self.patch_embed = nn.Linear(self.patch_dim, embed_dim)  # a Linear on (p, q, c) patch vectors
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid)[None])
        self.seg_embed = nn.Parameter(torch.zeros(group_size, embed_dim)) if segment_embed == "encoder" else None
        self.blocks = nn.ModuleList(MixedBlock(embed_dim, num_heads, mlp_ratio, attention_backend, kernels)
                                    for _ in range(depth))
        self.norm = LayerNorm(embed_dim)
        self.hc_head = self.hc.projection_head(embed_dim)
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_embed_dim, self.grid)[None])
        self.decoder_blocks = nn.ModuleList(MixedBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio,
                                                       attention_backend, kernels) for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_dim)
        self.kernels = kernels
        self.initialize_weights()

    def _set_layout(self, img_size, patch_size, in_chans, group_size, mask_ratio, ha, ha_layers, topk, depth):
        """The token geometry: grid, N, n (``n_visible``), r (``group_size``), K (``topk``), the HA blocks."""
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
        self.topk = n if topk is None else topk
        if not 1 <= self.topk <= r * n:
            raise ValueError(f"topk={self.topk} must lie in [1, r*n = {r * n}]")
        self.ha_layers = resolve_ha_layers(ha, ha_layers, depth)

    @property
    def kernels(self) -> str:
        """``runtime.kernels`` (auto | triton | torch): the mixing ops' path and what every attention block's
        ``auto`` backend follows (:mod:`mixedae_fast.measured`). Setting it switches them all."""
        return self._kernels

    @kernels.setter
    def kernels(self, value: str) -> None:
        self._kernels = _choice("kernels", value, KERNEL_BACKENDS)
        for m in self.modules():
            if isinstance(m, HomologousAttention):
                m.kernels = value

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
        """The layout the homologous blocks follow; ``hc``: whether they return the HC row terms (default:
        when the objective acts on the attention)."""
        return MixLayout(self.group_size, self.n_visible, self.ha, self.topk,
                         hc=self.hc.attention if hc is None else hc, collect_stats=collect_stats,
                         hc_form=self.hc.form, hc_heads=self.hc.heads)

    def forward_encoder(self, mixed: torch.Tensor, ids: torch.Tensor, layout: MixLayout | None = None):
        """``mixed [G, r*n, 3P²]`` -> ``latent [G, 1 + r*n, D]`` after the final norm, and a copy of the
        layout holding the HC row terms and stats each homologous block returned."""
        layout = self.make_layout() if layout is None else layout
        x = self.patch_embed(mixed) + self.pos_embed[0, 1:][ids.long()]
        if self.seg_embed is not None:
            x = x + self.seg_embed.repeat_interleave(self.n_visible, dim=0)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        ha_layers = set(self.ha_layers)
        hc_rows, stats = [], []
        for i, blk in enumerate(self.blocks):
            x, rows, st = blk.forward_homologous(x, layout if i in ha_layers else None)
            hc_rows += [] if rows is None else [rows]
            stats += [] if st is None else [st]
        return self.norm(x), layout.with_outputs(hc_rows, stats)

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

    def forward_hc(self, latent: torch.Tensor, layout: MixLayout) -> torch.Tensor:
        """The homologous contrastive loss (unweighted; docs/method.md §4), or a zero when it is inactive."""
        return self.hc.loss(layout.hc_rows, latent[:, 1:], layout.source_ids(latent.device), self.hc_head)

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
        latent, layout = self.forward_encoder(mixed, ids, self.make_layout(collect_stats=collect_stats))
        pred = self.forward_decoder(self.unmix(latent, ids))
        loss_rec = self.forward_loss(pred, targets, loss_mask)
        loss_hc = self.forward_hc(latent, layout)
        out = dict(loss=loss_rec + self.hc.weight * loss_hc, loss_rec=loss_rec, loss_hc=loss_hc, pred=pred,
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
    return MixedAutoencoderViT(
        **dataclasses.asdict(cfg.model), **dataclasses.asdict(cfg.mixing),
        attention_backend=cfg.runtime.attention_backend, kernels=cfg.runtime.kernels,
        warn_ignored=False,  # load_config warned already
    )
