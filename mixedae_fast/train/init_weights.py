"""Start a run from someone else's weights: ``init.from`` (as MAE's ``--finetune``, timm's ``--initial-checkpoint``).

    --init.from=mae_visualize_vit_base.pth       # MAE's official layout; its decoder too where it has one
    --init.from=https://host/mae_pretrain_vit_base.pth   # downloaded once into torch.hub's cache
    --init.from=timm:vit_base_patch16_224.mae    # timm.create_model(NAME, pretrained=True)
    --init.from=local-dir:runs/x/export_timm     # an export of ours (or hf-hub:USER/REPO), through timm
    --init.from=runs/x/checkpoints/ckpt-00001000.pt   # a checkpoint of ours: encoder, decoder, HC head

The source's tensors are mapped onto :class:`~mixedae_fast.model.mixedae.MixedAutoencoderViT`: MAE and timm name the
encoder as we do (``cls_token``, ``pos_embed``, ``blocks.N.*``, ``norm.*``) except the patch embedding, a conv
``[D, C, P, P]`` there and a Linear on ``(p, q, c)`` patch vectors here (:func:`mae_state_dict` goes the other
way); MAE's decoder names are ours. A classifier head is dropped. The encoder must be whole and of the
config's sizes, the decoder whole or absent (then it keeps MAE's random init); anything else is one
:class:`InitError` naming the keys and the model settings that would fit. ``pos_embed`` is a fixed buffer
here: a learned one (timm's) is loaded and stays as it is while training.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mixedae_fast.train.checkpoint import CheckpointError, download_checkpoint, is_url, load_checkpoint

TIMM_PREFIXES = ("timm:", "local-dir:", "hf-hub:")
DECODER = ("mask_token", "decoder_")           # MAE's decoder keys start with these
OURS_ONLY = ("hc_head.", "seg_embed")          # pretraining parts of ours that other sources lack
DROPPED = ("head.",)                           # a classifier head: not part of the encoder
PRESETS = {(768, 12): "vit_base", (1024, 24): "vit_large"}


class InitError(ValueError):
    """``init.from`` names weights that cannot start this model; the message names the keys and the fix."""


@dataclass
class InitWeights:
    state: dict[str, torch.Tensor]   # our names, ready for load_state_dict(strict=False)
    source: str                      # init.from as given
    decoder: bool                    # the decoder came from the source too
    layout: str                      # mae | ours | timm

    def describe(self) -> str:
        parts = "encoder and decoder" if self.decoder else "encoder (the decoder starts from MAE's random init)"
        return f"{parts} from {self.source} ({self.layout} layout, {len(self.state)} tensors)"


def load_init(cfg) -> InitWeights:
    """The weights ``cfg.init.from`` names, mapped onto the model ``cfg`` describes and checked against it
    (a model on the meta device gives the shapes: nothing is allocated)."""
    from mixedae_fast.model.mixedae import build_model

    source = cfg.init.from_
    with torch.device("meta"):
        target = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    state, layout = _read(source, cfg)
    if layout != "ours":
        state = ours_from_mae(state, cfg.model.patch_size, cfg.model.in_chans)
    state, decoder = _fit(state, target, source, layout)
    return InitWeights(state, source, decoder, layout)


def _read(source: str, cfg) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict, layout)`` of a source: ``ours`` (our names), ``mae`` or ``timm`` (MAE's / timm's names)."""
    if source.startswith(TIMM_PREFIXES):
        return _timm_state(source, cfg.model.img_size), "timm"
    path = download_checkpoint(source, "init.from") if is_url(source) else Path(source).expanduser()
    if not path.is_file():
        what = "a folder (an export? pass local-dir:" + source + ")" if path.is_dir() else "no such file"
        raise InitError(f"init.from = {source!r}: {what}; pass a checkpoint file or https:// URL, timm:NAME, "
                        "local-dir:FOLDER or hf-hub:USER/REPO")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # MAE's main_pretrain.py saves its args
            state = load_checkpoint(path, fix="point init.from at another file")
    except CheckpointError as e:
        raise InitError(f"init.from = {source!r}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]                      # MAE's {'model': ...} and ours
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]                 # timm's train.py checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitError(f"init.from = {source!r}: holds no state dict (a dict of tensors, or one under 'model'); "
                        "pass a model checkpoint")
    state = {k.removeprefix("module."): v for k, v in state.items()}   # saved from a DDP-wrapped model
    return state, ("ours" if "patch_embed.weight" in state else "mae")


def _timm_state(source: str, img_size: int) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of a model name (``timm:NAME``) or a ``local-dir:`` / ``hf-hub:`` folder, the
    position embedding resampled by timm to ``img_size``; no head."""
    from mixedae_fast._compat import import_timm

    timm = import_timm()
    name = source.removeprefix("timm:")
    if source.startswith("timm:") and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:5]
        raise InitError(f"init.from = {source!r}: timm has no model {name!r}" + (f" (e.g. {', '.join(close)})"
                        if close else "") + "; timm.list_models(pretrained=True) lists them")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, img_size=img_size)
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InitError(f"init.from = {source!r}: timm could not load its pretrained weights ({type(e).__name__}: "
                        f"{first}); without network access download the file and pass its path") from None
    return {k: v.detach() for k, v in model.state_dict().items()}


def ours_from_mae(state: dict[str, torch.Tensor], patch_size: int, in_chans: int = 3) -> dict[str, torch.Tensor]:
    """MAE's / timm's names -> ours: the conv patch embedding ``[D, C, P, P]`` becomes our Linear ``[D, P*P*C]``
    over ``(p, q, c)`` patch vectors; the rest keeps its name. A conv of another patch size or channel count
    stays a conv (and is refused with its shape by the fit check)."""
    out = dict(state)
    w = out.pop("patch_embed.proj.weight", None)
    if w is not None:
        fits = w.dim() == 4 and tuple(w.shape[1:]) == (in_chans, patch_size, patch_size)
        out["patch_embed.weight"] = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if fits else w
    if "patch_embed.proj.bias" in out:
        out["patch_embed.bias"] = out.pop("patch_embed.proj.bias")
    return out


def mae_state_dict(model_state: dict[str, torch.Tensor], patch_size: int, in_chans: int = 3) -> dict:
    """Our model's state dict in MAE's official layout (the inverse of :func:`ours_from_mae`), our
    pretraining-only parts (the HC head, segment embedding) left out."""
    out = {k: v for k, v in model_state.items() if not k.startswith(OURS_ONLY)}
    w = out.pop("patch_embed.weight")
    out["patch_embed.proj.weight"] = w.reshape(w.shape[0], patch_size, patch_size, in_chans).permute(0, 3, 1, 2)
    out["patch_embed.proj.bias"] = out.pop("patch_embed.bias")
    return out


def _fit(state: dict, target: dict[str, tuple], source: str, layout: str) -> tuple[dict, bool]:
    """``(the tensors to load, whether the decoder is among them)``; InitError when they do not fit."""
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED)}
    is_decoder = lambda k: k.startswith(DECODER)
    with_decoder = any(is_decoder(k) for k in state)
    wanted = [k for k in target if not k.startswith(OURS_ONLY) and (with_decoder or not is_decoder(k))]
    missing = [k for k in wanted if k not in state]
    unknown = [k for k in state if k not in target]
    shapes = [f"{k} {list(state[k].shape)} vs {list(target[k])}" for k in wanted
              if k in state and tuple(state[k].shape) != target[k]]
    if missing or unknown or shapes:
        problems = [f"{label}: {_few(keys)}" for label, keys in (("missing", missing), ("shape (checkpoint vs "
                    "model)", shapes), ("with no place in this model", unknown)) if keys]
        raise InitError(f"init.from = {source!r} does not fit the model: {'; '.join(problems)}. {_fix(state)}")
    keep = [k for k in target if k in state]   # our HC head / segment embedding come along from a checkpoint of ours
    return {k: state[k] for k in keep}, with_decoder


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _fix(state: dict) -> str:
    """What model settings the source's weights have, as the fix."""
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    dec = {int(m.group(1)) for k in state for m in [re.match(r"decoder_blocks\.(\d+)\.", k)] if m}
    width = state["cls_token"].shape[-1] if "cls_token" in state else None
    if width is None or not blocks:
        return "It does not look like a ViT of MAE's or timm's layout; pass an MAE or timm ViT checkpoint"
    depth = max(blocks) + 1
    sizes = [f"model.embed_dim={width}", f"model.depth={depth}"]
    w = state.get("patch_embed.weight")  # a conv [D, C, P, P] that did not fit, or our Linear [D, P*P*C]
    patch = w.shape[-1] if w is not None and w.dim() == 4 else round((w.shape[-1] / 3) ** 0.5) if w is not None else 0
    if patch:
        sizes.append(f"model.patch_size={patch}")
        pos = state.get("pos_embed")
        grid = round((pos.shape[1] - 1) ** 0.5) if pos is not None and pos.dim() == 3 else 0
        if grid:
            sizes.append(f"model.img_size={grid * patch}")
    if dec and "decoder_embed.weight" in state:
        sizes += [f"model.decoder_embed_dim={state['decoder_embed.weight'].shape[0]}",
                  f"model.decoder_depth={max(dec) + 1}"]
    preset = PRESETS.get((width, depth))
    return (f"Its weights are a ViT with {', '.join(sizes)}: set these"
            + (f" (--config {preset} has the encoder's)" if preset else "") + " and model.num_heads to the source's")
