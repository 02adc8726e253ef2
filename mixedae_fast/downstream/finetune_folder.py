"""A fine-tune's folder: what ``mixedae-fast finetune`` keeps, and how it continues.

    RUN/finetune_<dataset>/            (--out DIR)
        checkpoints/ckpt-<epoch>.pt    after every epoch, written atomically; the last two kept
        export_timm/                   after the last epoch: the classifier in timm's hub layout
        results.json                   the figures, the per-epoch history, the settings
        baseline/                      with --baseline: the random-init encoder's checkpoints and export

A checkpoint holds the classifier, the optimizer, the epoch and step, the history so far and the
settings; ``--resume auto|PATH`` continues after its epoch exactly (the loaders and the generators are
keyed by epoch), under the same settings and global batch only. A folder belongs to one fine-tune: one
that holds something else, or a fine-tune when not resuming, is refused; resuming from an older
checkpoint moves the later checkpoints, the export and results.json of the abandoned branch into
``checkpoints/abandoned-<epoch>/``. Nothing here deletes a file it did not write.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mixedae_fast.errors import RunFailure
from mixedae_fast.fsutil import atomic_write
from mixedae_fast.train.checkpoint import (
    CheckpointError,
    atomic_write_json,
    list_checkpoints,
    save_checkpoint,
)
from mixedae_fast.train.runs import RunLock, set_aside_later_checkpoints

KIND = "mixedae_fast.downstream.finetune"
KEEP_LAST = 2
EXPORT, RESULTS, BASELINE = "export_timm", "results.json", "baseline"
# what the folder of a fine-tune holds; anything else in it means the folder is someone else's
_OURS = {"checkpoints", EXPORT, RESULTS, BASELINE, ".lock"}


def check_out_dir(out_dir: str | os.PathLike, resume: str) -> None:
    """Refuse ``--out`` before any work when fine-tuning into it would mix or overwrite: a file, a folder
    that holds other things, or one that holds a fine-tune while not resuming (``resume == "none"``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the fine-tune folder {out} (--out) is a file; --out takes a folder (created if missing)")
    entries = sorted(e.name for e in out.iterdir() if not e.name.startswith(".lock")) if out.is_dir() else []
    if not entries:
        return
    foreign = [e for e in entries if e not in _OURS]
    if foreign or not (out / "checkpoints").is_dir():
        shown = ", ".join((foreign or entries)[:5])
        raise ValueError(f"the fine-tune folder {out} (--out) holds other files ({shown}) and no fine-tune "
                         "checkpoints/; fine-tuning into it could overwrite them. Pass a new folder with --out")
    if resume == "none":
        raise ValueError(f"the fine-tune folder {out} (--out) already holds a fine-tune ({', '.join(entries)}); "
                         "continue it with --resume auto, evaluate it with --eval-only, or pass another --out")


class FinetuneLock(RunLock):
    """``out_dir/.lock`` for the fine-tune's life: a second process fine-tuning into the folder is refused."""

    def _held_message(self, holder: dict | None) -> str:
        return (f"fine-tune folder {self.path.parent} is in use by {self._who(holder)}: two fine-tunes in one "
                f"folder overwrite each other's checkpoints. Wait for it, pass another --out, or, if that process "
                f"is gone, delete {self.path}")


def find_checkpoint(folder: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint ``resume`` names: ``none`` -> None, ``auto`` -> the newest in ``folder/checkpoints`` (None
    when there is none), anything else a file that must exist."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(Path(folder) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such file; pass a fine-tune checkpoint "
                                "(<out>/checkpoints/ckpt-*.pt) or --resume auto")
    return path


def load_finetune_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint :func:`save_finetune_checkpoint` wrote (with ``path`` added), else CheckpointError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch raises for a file that is not a whole checkpoint
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise CheckpointError(f"cannot read fine-tune checkpoint {path}: {type(e).__name__}: {first}. It may be "
                              "truncated or not a checkpoint; pass an older one with --resume PATH") from e
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a fine-tune checkpoint (mixedae-fast finetune writes them to "
                              "<out>/checkpoints/ckpt-<epoch>.pt); pass one of those, or --resume auto")
    state["path"] = Path(path)
    return state


def save_finetune_checkpoint(out_dir, clf, opt, epoch: int, step: int, history: list, meta: dict) -> Path:
    """``out_dir/checkpoints/ckpt-<epoch>.pt``, atomically; older ones beyond the last two removed."""
    state = {"kind": KIND, "classifier": clf.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
             "step": step, "history": history, **meta}
    return save_checkpoint(state, Path(out_dir) / "checkpoints", epoch, KEEP_LAST)


def check_resume(state: dict, meta: dict) -> list[str]:
    """Refuse a checkpoint that the current fine-tune cannot continue exactly (CheckpointError naming each
    difference); returns notes on what may differ (the number of ranks, the pretrained checkpoint)."""
    path = state["path"]
    diffs = []
    if state.get("label") != meta["label"]:
        diffs.append(f"it fine-tunes the {state.get('label')} encoder, not the {meta['label']} one")
    if state.get("model_config") != meta["model_config"]:
        diffs.append("another architecture")
    if list(state.get("classes") or []) != list(meta["classes"]):
        diffs.append(f"other classes ({len(state.get('classes') or [])} vs {len(meta['classes'])})")
    saved = state.get("settings") or {}
    for key, value in meta["settings"].items():
        if saved.get(key) != value:
            diffs.append(f"--{key.replace('_', '-')} {saved.get(key)!r} -> {value!r}")
    if state.get("global_batch") != meta["global_batch"]:
        diffs.append(f"global batch {state.get('global_batch')} -> {meta['global_batch']} (batch size x accum steps "
                     "x ranks)")
    if diffs:
        raise CheckpointError(f"{path} cannot be continued by this fine-tune: {'; '.join(diffs)}. Resume with the "
                              "options it was started with, or start a new fine-tune with another --out")
    notes = []
    if state.get("world_size") != meta["world_size"]:
        notes.append(f"it ran on {state.get('world_size')} rank(s), this on {meta['world_size']} (same global batch)")
    source = state.get("source") or {}
    if source.get("checkpoint") != meta.get("source", {}).get("checkpoint"):
        notes.append(f"it started from {source.get('checkpoint')}; the weights come from the fine-tune checkpoint")
    return notes


def set_aside_later(out_dir: str | os.PathLike, epoch: int) -> Path | None:
    """After a resume from ``epoch``: the abandoned branch's later checkpoints, export and results.json move
    into ``checkpoints/abandoned-<epoch>/``; returns that folder, or None when nothing was later."""
    out = Path(out_dir)
    aside = set_aside_later_checkpoints(out / "checkpoints", epoch)
    if aside is not None:
        for name in (EXPORT, RESULTS):
            if (out / name).exists():
                os.replace(out / name, aside / name)
    return aside


# -- the export -------------------------------------------------------------------------------------

def timm_classifier(clf, model_config: dict):
    """``clf`` (a :class:`~mixedae_fast.downstream.finetune.ViTClassifier`) as a timm ``VisionTransformer`` with its
    head, weights loaded strictly: mean pooling of the patch tokens after the final norm (timm's
    ``global_pool='avg', fc_norm=False``), then the Linear head, as ours."""
    from mixedae_fast._compat import import_timm
    from mixedae_fast.downstream.export import timm_model_spec, timm_state_dict

    name, kwargs = timm_model_spec(model_config, "avg")
    kwargs["num_classes"] = clf.head.out_features
    state = clf.state_dict()
    weights = timm_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")},
                              model_config["patch_size"], model_config.get("in_chans", 3))
    weights.update({k: v.detach().float().contiguous().cpu() for k, v in state.items() if k.startswith("head.")})
    model = import_timm().create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(weights, strict=True)
    return model.eval(), kwargs


def export_classifier(clf, out_dir: str | os.PathLike, meta: dict, history: list) -> dict:
    """``out_dir/export_timm``: the classifier through timm's ``save_for_hf`` (``config.json`` with the class
    names as ``label_names``, ``model.safetensors``) and a model card. Built in a temporary sibling and
    loaded back with ``timm.create_model("local-dir:...")``: its logits must match ours within
    :data:`~mixedae_fast.downstream.export.PARITY_LIMIT`, else nothing is written. An export already there (a
    fine-tune resumed after its last epoch) is kept as it is. Returns ``{"dir", "parity"}``."""
    from mixedae_fast._compat import import_timm
    from mixedae_fast.downstream.export import CARD, CONFIG, PARITY_LIMIT, TAG, load_export
    from mixedae_fast.pipelines.torch_loader import IMAGENET_MEAN, IMAGENET_STD

    import_timm()
    from timm.models import save_for_hf

    target = Path(out_dir) / EXPORT
    if target.exists():
        return {"dir": str(target), "parity": None}
    m = meta["model_config"]
    model, kwargs = timm_classifier(clf, m)
    tmp = target.with_name(f".{EXPORT}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        S, C = m["img_size"], m.get("in_chans", 3)
        save_for_hf(model, str(tmp), model_config={"label_names": list(meta["classes"])}, model_args=kwargs,
                    safe_serialization=True,
                    data_config=dict(input_size=(C, S, S), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0,
                                     interpolation="bilinear"))
        config = json.loads((tmp / CONFIG).read_text())
        for borrowed in ("license", "hf_hub_id", "url", "tag"):  # timm's weights', not ours
            config["pretrained_cfg"].pop(borrowed, None)
        config["pretrained_cfg"]["tag"] = TAG
        config["mixedae_fast"] = {"fine_tuned": True, "epochs": history[-1]["epoch"], "dataset": meta.get("dataset"),
                                  "source": Path(str(meta.get("source", {}).get("checkpoint", ""))).name}
        atomic_write_json(config, tmp / CONFIG)
        atomic_write(tmp / CARD, lambda f: f.write(classifier_card(meta, history, config).encode()))
        images = torch.randn(4, C, S, S, generator=torch.Generator().manual_seed(0))
        ours_device = next(clf.parameters()).device
        was_training = clf.training
        clf.eval()
        with torch.no_grad():
            ours = clf(images.to(ours_device)).float().cpu()
            theirs = load_export(tmp).eval()(images)
        clf.train(was_training)
        rel = ((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-12)).item()
        if not rel <= PARITY_LIMIT:
            raise RunFailure(f"the exported classifier does not reproduce ours: logits differ by {rel:.2e} (relative, "
                             f"limit {PARITY_LIMIT:g}); no export was written, the checkpoints are intact. Report this "
                             "with the run's config.yaml")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dir": str(target), "parity": rel}


def classifier_card(meta: dict, history: list, hub_config: dict) -> str:
    """The export's ``README.md``: what the classifier is, how it was fine-tuned, its val figures, how to load it."""
    m, s, last = meta["model_config"], meta["settings"], history[-1]
    classes = list(meta["classes"])
    shown = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
    reg = meta.get("regularisation") or {}
    return "\n".join([
        "---", "library_name: timm", "pipeline_tag: image-classification",
        "tags:", "- timm", "- mixedae", "- image-classification", "- vision-transformer", "---", "",
        f"# MixedAE ViT fine-tuned on {meta.get('dataset')} ({hub_config['architecture']} layout, {m['embed_dim']} "
        f"wide x {m['depth']} deep, patch {m['patch_size']}, {m['img_size']} px, {len(classes)} classes)", "",
        f"The {meta['label'].replace('_', ' ')} encoder of a mixedae_fast run (MixedAE, Chen et al., CVPR 2023, "
        "arXiv 2303.17152), fine-tuned end to end as a plain ViT with a Linear head on the mean-pooled patch "
        "tokens after the final norm (timm's `global_pool='avg', fc_norm=False`).", "",
        "## Fine-tuning", "",
        f"- data: {meta.get('dataset')}; classes (`label_names` in config.json): {shown}",
        f"- {last['epoch']} epochs, global batch {meta['global_batch']}, peak lr {meta['peak_lr']:.3g}, layer decay "
        f"{meta['layer_decay']}, weight decay {s['weight_decay']}, recipe {reg.get('recipe')}",
        f"- started from `{Path(str(meta.get('source', {}).get('checkpoint', ''))).name}` "
        f"(pretraining step {meta.get('source', {}).get('step')})", "",
        "## Validation", "",
        "| epoch | top-1 % | top-5 % |", "| ---: | ---: | ---: |",
        *[f"| {r['epoch']} | {r['val_top1']:.1f} | {r['val_top5']:.1f} |" for r in history], "",
        "## Use", "", "```python", "import timm",
        'model = timm.create_model("local-dir:<folder>", pretrained=True)   # or "hf-hub:<user>/<repo>"',
        "logits = model(images)   # [B, num_classes]; images normalised with the mean/std in config.json",
        "```", ""])
