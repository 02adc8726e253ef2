"""What every benchmark result file carries: the checkout's SHA and the device's name."""
from __future__ import annotations

import os
import platform
import subprocess

import torch


def git_sha() -> str:
    """The checkout's short SHA; ``MIXEDAE_GIT_SHA`` where the copy has no .git (the lent GPU machine)."""
    if os.environ.get("MIXEDAE_GIT_SHA"):
        return os.environ["MIXEDAE_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
