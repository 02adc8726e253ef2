"""Checkpoints: written atomically (temp file, fsync, rename), keep-last-k, loaded with weights_only.

A checkpoint holds everything a run needs to continue exactly: model, optimiser, the step, the data
position and the resolved config (a resume under another config fails, naming the difference).

Downstream: :func:`load_pretrained` finds the weights and the architecture of a run directory or
a checkpoint file (mixedae_fast/downstream/export.py turns them into a timm model).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mixedae_fast.config import drop_removed_keys
from mixedae_fast.fsutil import atomic_write, atomic_write_text

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def finite_json(obj):
    """``obj`` with every non-finite float (NaN, inf) replaced by None: JSON has no NaN, and a report
    with one would not parse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def atomic_write_json(obj, path: str | os.PathLike) -> Path:
    """``obj`` as indented JSON at ``path``, atomically; non-finite floats written as null."""
    return atomic_write_text(path, json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n")


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{step:08d}.pt"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step in a checkpoint's name (``ckpt-00000040.pt`` -> 40)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named as a checkpoint (ckpt-<8-digit step>.pt); rename it so, or pass a "
                         "file that mixedae-fast pretrain wrote")
    return int(match.group(1))


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first (temp files are never listed)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def save_checkpoint(state: dict, ckpt_dir: str | os.PathLike, step: int, keep_last: int) -> Path:
    path = atomic_save(state, checkpoint_path(ckpt_dir, step))
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot give what is asked of it; the message names the fix."""


def load_checkpoint(path: str | os.PathLike, map_location="cpu", fix: str = "point run.resume at another file") -> dict:
    """``torch.load`` of a checkpoint, else CheckpointError ending in ``fix`` (what the caller's user can do)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first[:300]}. It may be "
                              f"truncated or from another program; {fix}") from e


TRAINING_KEYS = ("model", "optimizer", "step", "config")


def load_training_state(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint that can continue a run (the entries ``Trainer.state_dict`` writes), else CheckpointError."""
    state = load_checkpoint(path, map_location)
    missing = [k for k in TRAINING_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {', '.join(missing)}); resume from a "
                              "checkpoints/ckpt-*.pt that mixedae-fast pretrain wrote")
    return state


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike) -> Path | None:
    """``none`` -> None; ``auto`` -> the newest complete checkpoint in ``ckpt_dir`` (None if there is
    none); anything else is a path that must exist."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"run.resume = {resume!r}: no such checkpoint file; use auto (the newest checkpoint "
                                "of the run folder), none, or the path of a checkpoint (runs/<name>/checkpoints/"
                                "ckpt-*.pt)")
    return path


def is_url(name: str) -> bool:
    return name.startswith(("https://", "http://"))


def download_checkpoint(url: str, what: str = "run.resume") -> Path:
    """The file at ``url``, downloaded once into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``, as
    ``torch.hub.load_state_dict_from_url``) with ``torch.hub.download_url_to_file``: a temporary file renamed
    when complete, so an interrupted download leaves nothing. The cached name carries a hash of the URL
    (checkpoint names such as ``ckpt-00001000.pt`` repeat across runs). ``what``: the setting, for the error."""
    import hashlib
    import sys
    from urllib.parse import unquote, urlparse

    name = os.path.basename(unquote(urlparse(url).path))
    if not name:
        raise CheckpointError(f"{what} = {url!r}: the URL names no file; give the address of the checkpoint file")
    target = Path(torch.hub.get_dir()) / "checkpoints" / f"{hashlib.sha256(url.encode()).hexdigest()[:8]}-{name}"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=sys.stderr.isatty())
    except (OSError, ValueError) as e:  # urllib's URLError / HTTPError are OSErrors
        code = getattr(e, "code", None)  # an HTTP status
        reason = f"HTTP {code} {e.reason}" if code else getattr(e, "reason", None) or e
        raise CheckpointError(f"{what} = {url!r}: cannot download it ({reason}); check the address and the "
                              f"network (or TORCH_HOME, the cache {target.parent}), or download the file and pass "
                              "its path") from None
    return target


# Config parts a resumed run may change (sections or ``section.key``). init: only a new run starts from it;
# data.max_bad_fraction: raising it is how a run stopped on unreadable samples continues.
RESUMABLE = ("run", "data.num_workers", "data.max_bad_fraction", "runtime", "dist", "init")
# ... and those it may change only with run.resume_override=true, as a deliberate, logged choice: the
# optimiser settings one lowers after a NaN stop. The model, the mixing and the data stay fixed.
OVERRIDABLE = ("optim.base_lr", "optim.lr", "optim.min_lr", "optim.weight_decay", "optim.betas",
               "optim.clip_grad", "optim.max_nan_steps", "optim.warmup_epochs", "optim.epochs")


def config_mismatch(saved: dict, current: dict, ignore=RESUMABLE) -> list[str]:
    """Keys whose values differ between two config dicts (``section.key: saved -> current``),
    leaving out what may change across a resume. Keys since removed (``config.REMOVED_KEYS``) at their
    "off" value are no difference; on, they are refused (a ConfigError with the fix)."""
    saved = drop_removed_keys(saved)
    diffs = []
    for section in sorted(set(saved) | set(current)):
        if section in ignore:
            continue
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if f"{section}.{key}" in ignore:
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


# -- pretrained weights for downstream use --------------------------------------------------------

@dataclass
class Pretrained:
    config: dict           # the run's config as a dict (config.yaml, else the one inside the checkpoint)
    model_state: dict      # a MixedAutoencoderViT state dict
    checkpoint: Path
    run_dir: Path          # the run directory (results of eval / export / pictures go here by default)
    step: int | None


def _run_config_file(ckpt: Path) -> Path | None:
    for d in (ckpt.parent, ckpt.parent.parent):
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def load_pretrained(path: str | os.PathLike, map_location="cpu") -> Pretrained:
    """The weights and config of a run directory (its newest checkpoint) or of a checkpoint file.

    The architecture comes from the run's ``config.yaml`` (beside the checkpoint or one folder up),
    else from the config saved inside the checkpoint; where both exist they must agree on the model.
    """
    import yaml

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run directory or checkpoint; pass runs/<name> (the folder "
                                "`mixedae-fast pretrain` wrote) or one of its checkpoints/ckpt-*.pt")
    if p.is_dir():
        run_dir = p.parent if p.name == "checkpoints" and not (p / "config.yaml").exists() else p
        found = list_checkpoints(run_dir / "checkpoints") or list_checkpoints(run_dir)
        if not found:
            if (run_dir / "config.yaml").is_file():
                raise CheckpointError(f"{run_dir} has a config.yaml but no checkpoint (checkpoints/ckpt-*.pt): the "
                                      "run saved no weights yet. Train it on (mixedae-fast pretrain "
                                      "--run.resume=auto with the same --run.name) or pass a checkpoint file")
            raise CheckpointError(f"{run_dir} is not a run directory: it holds neither config.yaml nor "
                                  "checkpoints/ckpt-*.pt; pass runs/<name> or a checkpoint file")
        ckpt = found[-1]
    else:
        ckpt = p
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    state = load_checkpoint(ckpt, map_location, fix="pass another checkpoint of the run (checkpoints/ckpt-*.pt)")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        model_state = state["model"]
    elif isinstance(state, dict) and "patch_embed.weight" in state:  # a bare model state dict
        model_state, state = state, {}
    else:
        raise CheckpointError(f"{ckpt} holds no model weights (no 'model' entry, and it is not a bare state dict); "
                              "pass a checkpoint that mixedae-fast pretrain wrote (runs/<name>/checkpoints/ckpt-*.pt)")
    saved, cfg_file = state.get("config"), _run_config_file(ckpt)
    if cfg_file is not None:
        try:
            config = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise CheckpointError(f"{cfg_file}: invalid YAML ({' '.join(str(e).split())}); restore the run's "
                                  "config.yaml (the run wrote it; a copy is inside each checkpoint)") from e
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_file} is not a config: its top level is a {type(config).__name__}, not a "
                                  "mapping of sections; restore the run's config.yaml (the one it was trained "
                                  "with)")
        diffs = config_mismatch(saved, config, ignore=("run", "data", "optim", "runtime", "init")) if saved else []
        if diffs:
            raise CheckpointError(f"{cfg_file} and {ckpt} describe different models: " + "; ".join(diffs)
                                  + ". Pass the checkpoint of this run, or restore its config.yaml")
    elif saved:
        config = saved
    else:
        raise CheckpointError(f"no config for {ckpt}: no config.yaml beside it or in its run directory, and none "
                              "inside it; copy the run's config.yaml next to the checkpoint")
    return Pretrained(config, model_state, ckpt, run_dir, state.get("step"))
