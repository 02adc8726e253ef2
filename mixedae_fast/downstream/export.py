"""Export the pretrained encoder to timm, in the layout of the Hugging Face Hub.

The encoder is a plain ViT downstream (docs/method.md §8): its weights become a timm
``VisionTransformer`` state dict, written by timm's own ``save_for_hf`` as ``config.json`` +
``model.safetensors``, with a model card (``README.md``). Anyone can then load it without this
package::

    model = timm.create_model("local-dir:runs/x/export_timm", pretrained=True)   # or "hf-hub:USER/REPO"

:func:`export_run` writes the folder into a temporary sibling, checks that timm reproduces our
features from it, and only then moves it into place, so a failed check leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mixedae_fast.errors import RunFailure
from mixedae_fast.fsutil import atomic_write
from mixedae_fast.train.checkpoint import Pretrained, atomic_write_json

# (embed_dim, depth, num_heads) of timm's named ViT sizes (mlp_ratio 4)
TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
              (1280, 32, 16): "huge"}
TIMM_POOLS = {"avg": "avg", "cls": "token"}
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
CODE_LICENSE = "apache-2.0"  # mixedae_fast's licence: the card's default; the data's terms may call for another
LEGACY_SPEC = "timm_model.json"   # exports before the hub layout: model name + kwargs beside the weights
PARITY_LIMIT = 1e-5               # max |ours - timm| / max |ours| over a few random images
TAG = "mixedae"                   # our pretrained tag: never a tag borrowed from timm's own weights


def timm_model_spec(model_cfg: dict, pool: str = "avg") -> tuple[str, dict]:
    """``(architecture, kwargs)`` for ``timm.create_model``.

    The architecture is timm's name for these sizes where one exists (``vit_base_patch16_224``);
    otherwise the nearest named family by width (``vit_tiny_patch16_224`` for a 128-wide ViT), whose
    defaults the kwargs then override. Kwargs always spell the whole architecture; mean pooling after
    the final norm is ``global_pool='avg', fc_norm=False``, the CLS token ``global_pool='token'``; no
    head (``num_classes=0``)."""
    from mixedae_fast._compat import import_timm

    if pool not in TIMM_POOLS:
        raise ValueError(f"pool={pool!r} is not one of {', '.join(TIMM_POOLS)}")
    timm = import_timm()
    m = model_cfg
    size = TIMM_SIZES.get((m["embed_dim"], m["depth"], m["num_heads"])) if m["mlp_ratio"] == 4.0 else None
    name = f"vit_{size}_patch{m['patch_size']}_{m['img_size']}" if size else None
    if name is None or not timm.is_model(name):
        nearest = min(TIMM_SIZES.items(), key=lambda kv: (abs(kv[0][0] - m["embed_dim"]), abs(kv[0][1] - m["depth"])))
        name = f"vit_{nearest[1]}_patch16_224"
    kwargs = dict(img_size=m["img_size"], patch_size=m["patch_size"], in_chans=m.get("in_chans", 3),
                  embed_dim=m["embed_dim"], depth=m["depth"], num_heads=m["num_heads"], mlp_ratio=m["mlp_ratio"],
                  qkv_bias=True, class_token=True, global_pool=TIMM_POOLS[pool], fc_norm=False, num_classes=0)
    return name, kwargs


def timm_state_dict(model_state: dict, patch_size: int, in_chans: int = 3) -> dict[str, torch.Tensor]:
    """Our encoder's weights under timm ``VisionTransformer`` names: the patch embedding (a Linear on
    ``(p, q, c)`` patch vectors) becomes the conv weight ``[D, C, P, P]``; ``pos_embed`` (fixed sin-cos,
    zero CLS row), ``cls_token``, the blocks (already timm's names) and the final norm carry over; the
    decoder and other pretraining-only parts (the HC projection head) are left out."""
    w = model_state["patch_embed.weight"]
    P, C = patch_size, in_chans
    out = {"cls_token": model_state["cls_token"], "pos_embed": model_state["pos_embed"],
           "patch_embed.proj.weight": w.reshape(w.shape[0], P, P, C).permute(0, 3, 1, 2),
           "patch_embed.proj.bias": model_state["patch_embed.bias"],
           "norm.weight": model_state["norm.weight"], "norm.bias": model_state["norm.bias"]}
    out.update({k: v for k, v in model_state.items() if k.startswith("blocks.")})
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def timm_encoder(pretrained: Pretrained, pool: str = "avg") -> torch.nn.Module:
    """The run's encoder as a timm ``VisionTransformer``, its weights loaded strictly."""
    from mixedae_fast._compat import import_timm

    m = pretrained.config["model"]
    name, kwargs = timm_model_spec(m, pool)
    model = import_timm().create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(timm_state_dict(pretrained.model_state, m["patch_size"], m.get("in_chans", 3)), strict=True)
    return model.eval()


def write_hub_folder(pretrained: Pretrained, out_dir: str | os.PathLike, pool: str = "avg",
                     license: str = CODE_LICENSE, datasets: list[str] | None = None) -> Path:
    """``config.json`` + ``model.safetensors`` through timm's ``save_for_hf``, and a model card, in
    ``out_dir`` (created). The pretrained config carries our normalisation and our own tag, not the
    tag, licence or hub id of the timm weights whose architecture name it borrows."""
    from mixedae_fast._compat import import_timm
    from mixedae_fast.pipelines.torch_loader import IMAGENET_MEAN, IMAGENET_STD

    import_timm()
    from timm.models import save_for_hf

    m = pretrained.config["model"]
    _, kwargs = timm_model_spec(m, pool)
    model = timm_encoder(pretrained, pool)
    out_dir = Path(out_dir)
    in_chans = m.get("in_chans", 3)
    save_for_hf(model, str(out_dir), model_args=kwargs, safe_serialization=True,
                data_config=dict(input_size=(in_chans, m["img_size"], m["img_size"]), mean=IMAGENET_MEAN,
                                 std=IMAGENET_STD, crop_pct=1.0, interpolation="bicubic"))
    config = json.loads((out_dir / CONFIG).read_text())
    cfg = config["pretrained_cfg"]
    for borrowed in ("license", "hf_hub_id", "url", "tag"):
        cfg.pop(borrowed, None)
    cfg["tag"] = TAG
    # the checkpoint by name only: the folder may be pushed to the Hub, and its path is this machine's
    config["mixedae_fast"] = {"pool": pool, "checkpoint": Path(pretrained.checkpoint).name, "step": pretrained.step}
    atomic_write_json(config, out_dir / CONFIG)
    atomic_write(out_dir / CARD, lambda f: f.write(model_card(pretrained, config, license, datasets).encode()))
    return out_dir


def card_metadata(config: dict, license: str = CODE_LICENSE, datasets: list[str] | None = None):
    """The card's YAML header as huggingface_hub's ``ModelCardData``: licence, data sets, the base model
    when the run started from Hub weights (``init.from`` = ``timm:NAME`` or ``hf-hub:ID``), library timm."""
    from huggingface_hub import ModelCardData

    start = str((config.get("init") or {}).get("from") or "")
    base = {"timm:": "timm/", "hf-hub:": ""}
    base_model = next((prefix_to + start[len(p):] for p, prefix_to in base.items() if start.startswith(p)), None)
    return ModelCardData(license=license, datasets=list(datasets) if datasets else None,
                         base_model=base_model, library_name="timm", pipeline_tag="image-feature-extraction",
                         tags=["timm", "mixedae", "self-supervised", "vision-transformer", "image-feature-extraction"])


def model_card(pretrained: Pretrained, hub_config: dict, license: str = CODE_LICENSE,
               datasets: list[str] | None = None) -> str:
    """The export's ``README.md``: its metadata (:func:`card_metadata`), what the weights are, how they
    were trained, how to load them, and the run's evaluation figures when its ``report.json`` has any."""
    c = pretrained.config
    m, mix, data, optim = c["model"], c.get("mixing", {}), c.get("data", {}), c.get("optim", {})
    report = _report(pretrained.run_dir)
    lines = ["---", card_metadata(c, license, datasets).to_yaml(), "---", "",
             f"# MixedAE-pretrained ViT ({hub_config['architecture']} layout, {m['embed_dim']} wide x "
             f"{m['depth']} deep, patch {m['patch_size']}, {m['img_size']} px)", "",
             "Encoder weights pretrained with MixedAE (Mixed Autoencoder, Chen et al., CVPR 2023, arXiv 2303.17152) "
             "by mixedae_fast: masked-autoencoder pretraining in which the visible patches of "
             f"r = {mix.get('group_size')} images share one encoder sequence and each patch learns to recognise the "
             "patches of its own image. Downstream the encoder is a plain timm VisionTransformer without a head.", "",
             "## Pretraining", "",
             f"- homologous attention `{mix.get('ha')}`, HC loss `{mix.get('hc_on')}` (weight {mix.get('hc_weight')}), "
             f"mask ratio {mix.get('mask_ratio')}",
             f"- data: {data.get('path') or 'the embedded synthetic data set of mixedae_fast'}",
             f"- optimizer steps: {pretrained.step}, batch {data.get('batch_size')} per rank, base lr "
             f"{optim.get('base_lr')}, {optim.get('epochs')} epochs scheduled",
             f"- features: `global_pool={hub_config['model_args']['global_pool']!r}` "
             "(mean of the patch tokens after the final norm for 'avg')", ""]
    ev = (report or {}).get("eval")
    if ev:
        lines += ["## Evaluation (frozen features, the run's validation split)", "",
                  "| metric | pretrained | random init |", "| --- | ---: | ---: |"]
        for metric, value in ev.get("pretrained", {}).items():
            if isinstance(value, (int, float)):
                lines.append(f"| {metric} | {value:.1f} | {ev.get('random_init', {}).get(metric, float('nan')):.1f} |")
        lines.append("")
    lines += ["## Use", "", "```python", "import timm",
              'model = timm.create_model("hf-hub:<user>/<repo>", pretrained=True)   # or "local-dir:<folder>"',
              "features = model(images)   # [B, embed_dim], images normalised with the mean/std in config.json",
              "```", ""]
    return "\n".join(lines)


def _report(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "report.json").read_text())
    except (OSError, ValueError):
        return None


def load_export(export_dir: str | os.PathLike, **kwargs) -> torch.nn.Module:
    """An export folder as a timm model, loaded by ``timm.create_model`` from its files (``kwargs``
    override the saved ones). Reads the hub layout, and the older ``timm_model.json`` layout."""
    from mixedae_fast._compat import import_timm

    export_dir = Path(export_dir)
    timm = import_timm()
    if (export_dir / CONFIG).is_file():
        return timm.create_model(f"local-dir:{export_dir}", pretrained=True, **kwargs)
    legacy = export_dir / LEGACY_SPEC
    if legacy.is_file():
        spec = json.loads(legacy.read_text())
        overlay = dict(spec["pretrained_cfg_overlay"], file=str(export_dir / spec["weights"]))
        return timm.create_model(spec["model_name"], pretrained=True, pretrained_cfg_overlay=overlay,
                                 **{**spec["model_kwargs"], **kwargs})
    raise FileNotFoundError(f"{export_dir / CONFIG}: no such file; write an export with `mixedae-fast export`")


def parity(pretrained: Pretrained, export_dir: str | os.PathLike, pool: str = "avg") -> float:
    """max |ours − timm| / max |ours| of the features of 4 random images: our encoder (global
    attention) against the export loaded back through ``timm.create_model``."""
    from mixedae_fast.config import config_from_dict
    from mixedae_fast.model.mixedae import build_model

    ours = build_model(config_from_dict(pretrained.config))
    ours.load_state_dict(pretrained.model_state)
    ours.eval()
    theirs = load_export(export_dir).eval()
    S, C = ours.img_size, ours.in_chans
    images = torch.randn(4, C, S, S, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.extract_features(images, pool), theirs(images)
    return ((a - b).abs().max() / a.abs().max()).item()


def export_run(pretrained: Pretrained, out_dir: str | os.PathLike, pool: str = "avg", check: bool = True,
               license: str = CODE_LICENSE, datasets: list[str] | None = None) -> dict:
    """Write the hub folder for ``pretrained`` at ``out_dir`` and return ``{"dir", "parity"}``.

    It is built in a temporary sibling folder and checked there (timm must reproduce our features
    within :data:`PARITY_LIMIT`); only then does it replace ``out_dir``. ``out_dir`` may be a missing
    folder or an earlier export (replaced); anything else is refused, so no user file is overwritten.
    ``license`` and ``datasets`` (Hub dataset ids) go into the model card's metadata."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not _is_export(out_dir):
        raise ValueError(f"--out {out_dir}: exists and is not an export of mixedae-fast (it holds other files, "
                         "which replacing it would delete); pass a new or empty folder")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out_dir}: cannot create its folder ({e.strerror}); pass a writable path") from None
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_hub_folder(pretrained, tmp, pool, license, datasets)
        rel = parity(pretrained, tmp, pool) if check else None
        if rel is not None and not rel <= PARITY_LIMIT:
            raise RunFailure(f"the exported model does not reproduce the encoder: features differ by {rel:.2e} "
                             f"(relative, limit {PARITY_LIMIT:g}); nothing was written. Report this with the run's "
                             "config.yaml")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dir": out_dir, "parity": rel}


def _is_export(path: Path) -> bool:
    """An empty folder, or one that holds only the files an export of ours writes and names itself ours
    (our tag in ``config.json``, or the older ``timm_model.json``): a cloned Hub repo with a ``config.json``
    beside its ``.git`` and notes is not one, and replacing it would delete them."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    if not names:
        return True
    if not names <= {CONFIG, WEIGHTS, CARD, LEGACY_SPEC}:
        return False
    if LEGACY_SPEC in names:
        return True
    try:
        return "mixedae_fast" in json.loads((path / CONFIG).read_text())
    except (OSError, ValueError, TypeError):
        return False


def push_to_hub(export_dir: str | os.PathLike, repo_id: str, private: bool = False,
                commit_message: str = "Add MixedAE-pretrained encoder (mixedae_fast)") -> str:
    """Upload an export folder to the Hugging Face Hub as model repo ``repo_id`` (created if needed;
    the token comes from ``hf auth login`` or ``HF_TOKEN``). Returns the commit URL. No login, a
    refused token and no network each raise one ``ValueError`` line that names the fix."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ValueError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        api = HfApi()
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=str(export_dir),
                                 repo_type="model", commit_message=commit_message)
    except Exception as e:
        reason = _hub_failure(e)
        if reason is None:
            raise
        raise ValueError(f"--push-to-hub {repo_id}: {reason}; the export is kept in {export_dir}") from None
    return str(getattr(info, "commit_url", info))


_LOGIN = "log in with `hf auth login` or set HF_TOKEN to a token with write access"


def _hub_failure(e: Exception) -> str | None:
    """What a Hub upload failure means to the user, or None for one that is not about login or network."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if isinstance(e, LocalTokenNotFoundError):
        return f"not logged in to the Hugging Face Hub; {_LOGIN}"
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return f"the Hub refused the token (HTTP {status}); {_LOGIN}"
        return None
    # huggingface_hub's HTTP client (httpx, or httpx2 in 2.x) signals no network with a TransportError
    transport = {c.__name__ for c in type(e).__mro__} & {"TransportError", "ConnectionError", "Timeout"}
    if isinstance(e, (ConnectionError, TimeoutError)) or transport:
        return f"cannot reach the Hugging Face Hub ({type(e).__name__}); check the network (HF_ENDPOINT), then retry"
    return None
