"""The Triton plumbing the mixing kernels share: the optional import, the interpreter test, and how
``kernels=auto | triton | torch`` resolves for one op on one device.

``auto`` on CUDA takes, per op (``assignment``, ``patch_mix``, ``unmix``), the path measured faster on
the card (:func:`mixedae_fast.measured.choose`, the one table of measured choices); a Triton choice is
still gated by the kernels' self-check on that device (:func:`kernels_verified`). CPU tensors always
take the reference under ``auto``.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import torch

from mixedae_fast.choices import KERNEL_BACKENDS
from mixedae_fast.errors import RunFailure
from mixedae_fast.measured import KERNEL_OPS, choose

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only (setup.py); the reference paths must import without it
    triton, tl = SimpleNamespace(jit=lambda fn: fn), None


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


@triton.jit
def _probe():
    """A kernel that only tells whether Triton runs through its interpreter in this process."""
    pass


# `auto` takes a kernel on CUDA only after the kernels pass a small self-check on that device (once per process
# and device, ~1 s): they pass every test through Triton's interpreter, so the check guards against a compiler
# or driver that miscompiles them, falling back to the reference with a warning.
# MIXEDAE_KERNEL_SELFCHECK=0 skips it (trust the kernels). reset_self_check() forgets the answers.
_VERIFIED: dict[str, bool] = {}


def reset_self_check() -> None:
    _VERIFIED.clear()
    _CHECKED_WITH.clear()


# Each kernel file registers the check of its own kernels (register_self_check), so this module
# imports none of them: name -> fn(device) -> None when the kernels agree with their references there,
# else what differed.
SELF_CHECKS: dict[str, Callable[[torch.device], str | None]] = {}
_CHECKED_WITH: dict[str, frozenset] = {}


def register_self_check(name: str):
    """Decorator: ``fn(device) -> str | None`` joins the self-check under ``name``."""
    def register(fn):
        SELF_CHECKS[name] = fn
        return fn
    return register


def _self_check(device: torch.device) -> str | None:
    """Every registered kernel check on ``device`` (small odd shapes against the references). Returns None
    when they all agree, else the first difference."""
    for name, check in SELF_CHECKS.items():
        problem = check(device)
        if problem:
            return f"{name}: {problem}"
    return None


def kernels_verified(device: torch.device) -> bool:
    """Whether ``kernels=auto`` may take the Triton kernels on ``device`` (the self-check, cached)."""
    key = str(device)
    if key not in _VERIFIED or _CHECKED_WITH.get(key, frozenset(SELF_CHECKS)) != frozenset(SELF_CHECKS):
        _CHECKED_WITH[key] = frozenset(SELF_CHECKS)  # a kernel file imported later is checked then
        if os.environ.get("MIXEDAE_KERNEL_SELFCHECK", "1") == "0":
            _VERIFIED[key] = True
        else:
            try:
                problem = _self_check(device)
            except Exception as e:  # a compiler or launch failure: same treatment as a wrong result
                problem = f"{type(e).__name__}: {e}"
            if problem:
                warnings.warn(f"the Triton kernels failed their self-check on {device} ({problem}); "
                              "kernels=auto uses the torch reference there. Please report this with your "
                              "torch/triton versions; kernels=torch silences this check.", RuntimeWarning,
                              stacklevel=3)
            _VERIFIED[key] = problem is None
    return _VERIFIED[key]


def use_triton(backend: str, *where: torch.Tensor | torch.device, op: str = "patch_mix") -> bool:
    """Resolve ``auto | triton | torch`` for ``op`` on these tensors or devices (True = the kernel).

    ``auto`` takes the kernel on CUDA where it was measured faster (:mod:`mixedae_fast.measured`) and the kernels passed
    :func:`kernels_verified` there (under ``torch.compile`` tracing, only if the check already ran
    eagerly); ``triton`` forces it (on CUDA, or on CPU under Triton's interpreter); ``torch`` takes the
    reference.
    """
    if op not in KERNEL_OPS:
        raise ValueError(f"op {op!r} is not one of {', '.join(KERNEL_OPS)}")
    devices = {w if isinstance(w, torch.device) else w.device for w in where}
    on_cuda = all(d.type == "cuda" for d in devices)
    if backend == "torch":
        return False
    if backend == "auto":
        if not on_cuda or tl is None or len(devices) != 1:
            return False
        (device,) = devices
        if choose(op, str(device)) != "triton":
            return False
        if torch.compiler.is_compiling():
            return _VERIFIED.get(str(device), False)
        return kernels_verified(device)
    if backend == "triton":
        require_triton("kernels='triton'", devices, "runtime.kernels=auto (the torch reference on CPU)")
        return True
    raise ValueError(f"kernels={backend!r} is not one of {', '.join(KERNEL_BACKENDS)}")


def require_triton(setting: str, devices, instead: str) -> None:
    """Raise unless a Triton kernel can run on every one of ``devices``: the triton package, and CUDA or
    Triton's interpreter. ``setting`` asked for the kernel; ``instead`` is what to set otherwise."""
    if tl is None:
        raise RunFailure(f"{setting} needs the triton package, which is not installed; pip install "
                         f"'mixedae_fast[triton]' (Linux; a CUDA build of torch brings it), or use {instead}")
    if any(torch.device(d).type != "cuda" for d in devices) and not _interpreted(_probe):
        raise RunFailure(f"{setting} on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                           f"mixedae_fast.kernels is imported, or use {instead}")


def _buffer_dtype(dtype: torch.dtype, kernel) -> torch.dtype:
    """The dtype a kernel writes its output in: ``dtype``, except bf16 under the interpreter, which truncates
    fp32 -> bf16 instead of rounding to nearest even: there the kernel writes fp32 and torch rounds."""
    return torch.float32 if dtype == torch.bfloat16 and _interpreted(kernel) else dtype
