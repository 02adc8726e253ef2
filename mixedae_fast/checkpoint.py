"""Checkpoints: written atomically (temp file, fsync, rename), keep-last-k, loaded with weights_only.

A checkpoint holds everything a run needs to continue exactly: model, optimiser, the step, the data
position and the resolved config (a resume under another config fails, naming the difference).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``: a crash or a
    full disk leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{step:08d}.pt"


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


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. It may be truncated "
                           "or from another program; delete it or point run.resume at another file") from e


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
        raise FileNotFoundError(f"run.resume={resume!r}: no such checkpoint file")
    return path


# Config parts a resumed run may change (sections or ``section.key``).
RESUMABLE = ("run", "data.num_workers", "runtime", "dist")


def config_mismatch(saved: dict, current: dict, ignore=RESUMABLE) -> list[str]:
    """Keys whose values differ between two config dicts (``section.key: saved -> current``),
    leaving out what may change across a resume."""
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
