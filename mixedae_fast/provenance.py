"""Where a result came from: one helper for every result file and report (benchmarks, report.json,
eval / fine-tune results), so they all carry the same fields in the same formats.

    {"date": "2026-11-29T23:39:51Z", "git_sha": "239a069", "host": ..., "machine": ...,
     "command": "mixedae-fast pretrain ...", "device": "NVIDIA H200" | "cpu (x86_64, 2 cores)",
     "versions": {"python": ..., "mixedae-fast": ..., "torch": "2.13.0", "triton": ..., "timm": ..., ...}}

Dates are UTC, ISO 8601 to the second. Package versions come from the installed distributions'
metadata (nothing is imported); a package that is not installed is left out.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import socket
import subprocess
import sys

from mixedae_fast import __version__

PACKAGES = ("mixedae-fast", "torch", "triton", "timm", "xformers", "nvidia-dali-cuda130", "nvidia-dali-cuda120",
            "numpy", "pillow")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


SHA_FILE = ".git_sha"  # written beside .git by `bash benchmarks/device_check.sh prepare`, for a copy without .git


def git_sha() -> str:
    """The checkout's short SHA (``+dirty`` with uncommitted changes to tracked files); where the copy has
    no .git (a copy of the tree sent to a GPU machine): ``MIXEDAE_GIT_SHA``, else the ``.git_sha`` file at
    the repository's root that ``benchmarks/device_check.sh prepare`` wrote from the checkout; else ``unknown``."""
    if os.environ.get("MIXEDAE_GIT_SHA"):
        return os.environ["MIXEDAE_GIT_SHA"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        try:
            with open(os.path.join(os.path.dirname(here), SHA_FILE), encoding="utf-8") as f:
                return f.read().strip() or "unknown"
        except OSError:
            return "unknown"
    return sha + ("+dirty" if dirty else "")


def version_line() -> str:
    """What ``mixedae-fast --version`` prints: the installed version, and the commit where this runs from a
    git checkout."""
    try:
        version = importlib.metadata.version("mixedae_fast")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        version = __version__
    sha = git_sha()
    return f"mixedae-fast {version}" + ("" if sha == "unknown" else f" (git {sha})")


def device_name(device=None) -> str:
    """The GPU's name for a CUDA device, else ``cpu (<arch>, <n> cores)``."""
    if device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def package_versions(names=PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def provenance(device=None, command: list[str] | None = None) -> dict:
    """The fields every result file and report carries (see the module doc)."""
    argv = sys.argv if command is None else command
    prog = os.path.basename(argv[0]) if argv else "python"
    return {"date": utc_now(), "git_sha": git_sha(), "host": socket.gethostname(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "command": shlex.join([prog, *argv[1:]]), "device": device_name(device), "versions": package_versions()}
