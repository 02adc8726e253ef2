"""Import shims for the pinned environments (README: Installing elsewhere).

PyPI's torchvision 0.28.0 (the one matching the CPU torch 2.13.0) is a CUDA build whose C extension
does not load next to a CPU torch; its import then fails with "operator torchvision::nms does not
exist". timm imports torchvision, so ``import_timm`` declares those two operators, but only after the
plain import has failed that way: where the extension loads (the GPU image) declaring them first
would break it.
"""
from __future__ import annotations

import importlib
import sys

_TV_LIBRARY = None  # keeps the torch.library registration alive


def ensure_torchvision() -> None:
    global _TV_LIBRARY
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIBRARY = lib
    importlib.import_module("torchvision")


def import_timm():
    ensure_torchvision()
    import timm

    return timm
