"""The Triton plumbing the mixing kernels share: the optional import, the interpreter test, and how
``kernels=auto | triton | torch`` resolves for one op on one device.

``auto`` on CUDA reads ``kernel_backends.json`` (beside the ``mixedae_fast`` package): per device name
and op (``assignment``, ``patch_mix``, ``unmix``) the path that was measured faster there. A card
without a row takes ``default_cuda`` (the torch references) until someone measures it
(``python -m mixedae_fast.benchmarks.bench_kernels --table-row RESULT.json`` prints a row). A Triton
choice is still gated by the kernels' self-check on that device (:func:`kernels_verified`). CPU tensors
always take the reference under ``auto``.
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import os
import warnings
from types import SimpleNamespace

import torch

from mixedae_fast.choices import KERNEL_BACKENDS

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only (setup.py); the reference paths must import without it
    triton, tl = SimpleNamespace(jit=lambda fn: fn), None

KERNEL_OPS = ("assignment", "patch_mix", "unmix")
TABLE = importlib.resources.files("mixedae_fast") / "kernel_backends.json"


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


@triton.jit
def _probe():
    """A kernel that only tells whether Triton runs through its interpreter in this process."""
    pass


@functools.cache
def kernel_table() -> dict:
    return json.loads(TABLE.read_text(encoding="utf-8"))


def _card_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device))


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the answer
def table_choice(op: str, device: str) -> str:
    """``triton`` or ``torch``: the table's measured choice for ``op`` on this CUDA device's card."""
    table = kernel_table()
    row = table["devices"].get(_card_name(device), table["default_cuda"])
    choice = row.get(op, table["default_cuda"][op])
    return choice["backend"] if isinstance(choice, dict) else choice


# `auto` takes a kernel on CUDA only after the kernels pass a small self-check on that device (once per process
# and device, ~1 s): they pass every test through Triton's interpreter, so the check guards against a compiler
# or driver that miscompiles them, falling back to the reference with a warning.
# MIXEDAE_KERNEL_SELFCHECK=0 skips it (trust the kernels). reset_self_check() forgets the answers.
_VERIFIED: dict[str, bool] = {}


def reset_self_check() -> None:
    _VERIFIED.clear()


def _self_check(device: torch.device) -> str | None:
    """Run the assignment, patch_mix and unmix kernels (forward and backward) against their references at
    small odd shapes on ``device``, constant and far-from-zero patches included. Returns None when they
    agree, else what differed."""
    from mixedae_fast.kernels import patch_mix as pm
    from mixedae_fast.kernels.unmix import unmix_reference, unmix_triton

    gen = torch.Generator().manual_seed(0)
    r, n, P, S, D = 4, 6, 8, 40, 24                                  # 5x5 grid: N = 25, r*n = 24 < N
    N = (S // P) ** 2
    ids = pm.draw_assignment(2, N, r, n, seed=1, step=2, device=device, backend="torch")
    if not torch.equal(pm.assignment_forward(2, N, r, n, 1, 2, device=device), ids):
        return "assignment ids differ from the torch draw"
    images = torch.randn(2 * r, 3, S, S, generator=gen)
    images[0, :, :P, :P] = 1000.1                                    # a constant patch: targets exactly 0
    images[1] = 1000.0 + 1e-3 * images[1]                            # far from zero: no cancellation allowed
    for dtype in (torch.float32, torch.bfloat16):
        x = images.to(device=device, dtype=dtype)
        got, want = pm.patch_mix_forward(x, ids, r, n, P), pm.patch_mix_reference(x, ids, r, n, P)
        if not (torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])):
            return "patch_mix: mixed patches or loss mask differ"
        if not (torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-4) and not got[1][0, 0].any()):
            return f"patch_mix: targets differ ({dtype})"
    tokens = torch.randn(2, 1 + r * n, D, generator=gen).to(device).requires_grad_()
    mask_token = torch.randn(1, 1, D, generator=gen).to(device).requires_grad_()
    pos = torch.randn(1, N + 1, D, generator=gen).to(device)
    grad = torch.randn(2 * r, N + 1, D, generator=gen).to(device)
    outs = []
    for fn in (lambda: unmix_triton(tokens, ids, mask_token, pos, r),
               lambda: unmix_reference(tokens, ids, mask_token, pos, r)):
        out = fn()
        outs.append((out.detach(), *torch.autograd.grad(out, (tokens, mask_token), grad)))
    if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(*outs)):
        return "unmix: output or gradients differ"
    return None


def kernels_verified(device: torch.device) -> bool:
    """Whether ``kernels=auto`` may take the Triton kernels on ``device`` (the self-check, cached)."""
    key = str(device)
    if key not in _VERIFIED:
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

    ``auto`` takes the kernel on CUDA where the table says it was measured faster and the kernels passed
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
        if table_choice(op, str(device)) != "triton":
            return False
        if torch.compiler.is_compiling():
            return _VERIFIED.get(str(device), False)
        return kernels_verified(device)
    if backend == "triton":
        if tl is None:
            raise RuntimeError("kernels='triton' needs the triton package, which is not installed")
        if not on_cuda and not _interpreted(_probe):
            raise RuntimeError("kernels='triton' on CPU tensors needs Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before mixedae_fast.kernels is imported, or use "
                               "kernels='auto' (the torch reference on CPU)")
        return True
    raise ValueError(f"kernels={backend!r} is not one of {', '.join(KERNEL_BACKENDS)}")


def _buffer_dtype(dtype: torch.dtype, kernel) -> torch.dtype:
    """The dtype a kernel writes its output in: ``dtype``, except bf16 under the interpreter, which truncates
    fp32 -> bf16 instead of rounding to nearest even: there the kernel writes fp32 and torch rounds."""
    return torch.float32 if dtype == torch.bfloat16 and _interpreted(kernel) else dtype
