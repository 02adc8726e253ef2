"""One training step, as the trainer runs it and the throughput benchmark measures it.

A step is ``accum`` micro-steps (draw the assignment, forward under autocast, scaled backward) and one
update (unscale, clip, the optimiser's step, zero the gradients)::

    step = TrainStep(model, optimizer, device, amp_dtype, clip_grad=cfg.optim.clip_grad, seed=cfg.run.seed)
    for a in range(accum):
        out = step.micro(images, global_step, first_group=..., last=a == accum - 1)
    found_inf = step.update()          # a 0-d device tensor: 1.0 when the step was skipped

The update never synchronises the host where the optimiser can skip on the device: torch's fused AdamW
reads ``found_inf`` itself, a GradScaler skips overflowing steps itself; only apex's FusedAdam needs
the flag on the host (one sync a step). ``nan_guard=False`` (the official-recipe benchmark row) steps
whatever the gradients hold, as the recipe it copies does.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from mixedae_fast.train.distributed import unwrap


def _no_range(name: str):
    return contextlib.nullcontext()


class TrainStep:
    """The micro-step and the update of one optimizer step (module docstring).

    ``model``: the module trained (DDP-wrapped or not); ``forward``: what is called for the forward (the
    model, or ``torch.compile`` of it). ``device_skip``: the optimiser reads ``found_inf`` on the device
    (:func:`mixedae_fast.train.optim.build_optimizer` says which). ``scaler``: a GradScaler (fp16) or None.
    ``accum``: micro-steps per step (the loss of each is divided by it). ``no_sync(model, skip)``: a context
    that suspends DDP's gradient all-reduce on all but the last micro-step (distributed.Dist.no_sync)."""

    def __init__(self, model: torch.nn.Module, optimizer, device: torch.device, amp_dtype: torch.dtype | None,
                 *, clip_grad: float | None = None, seed: int = 0, accum: int = 1, device_skip: bool = True,
                 scaler=None, forward: Callable | None = None, no_sync: Callable | None = None,
                 nan_guard: bool = True):
        self.model, self.module, self.optimizer, self.device = model, unwrap(model), optimizer, device
        self.amp_dtype, self.clip_grad, self.seed, self.accum = amp_dtype, clip_grad, seed, accum
        self.device_skip, self.scaler, self.nan_guard = device_skip, scaler, nan_guard
        self.forward = model if forward is None else forward
        self.no_sync = no_sync or (lambda model, skip: contextlib.nullcontext())

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def micro(self, images: torch.Tensor, step: int, first_group: int = 0, last: bool = True,
              collect_stats: bool = False, ranges: Callable = _no_range) -> dict:
        """Forward and backward of one micro-batch of the optimizer step ``step``; ``first_group`` is the
        global index of its first group (docs/method.md §1). Returns the model's output dict."""
        groups = images.shape[0] // self.module.group_size
        with self.no_sync(self.model, not last):
            with ranges("forward"), self.autocast():
                ids = self.module.assign(groups, self.seed, step, first_group, images.device)
                out = self.forward(images, ids, collect_stats=collect_stats)
            with ranges("backward"):
                self.backward(out["loss"] / self.accum)
        return out

    def update(self) -> torch.Tensor:
        """Unscale, clip (``clip_grad`` None: the norm is still computed, it is the NaN check), step, zero the
        gradients. Returns ``found_inf``: a 0-d float device tensor, 1.0 when the gradients were not finite
        (the step was then skipped, unless ``nan_guard`` is off)."""
        opt = self.optimizer
        if self.scaler:
            self.scaler.unscale_(opt)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.clip_grad if self.clip_grad is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        found_inf = (~torch.isfinite(norm)).float()
        if self.scaler:
            self.scaler.step(opt)
            self.scaler.update()
        elif not self.nan_guard:
            opt.step()
        elif self.device_skip:
            opt.found_inf = found_inf
            opt.step()
        elif not bool(found_inf):  # apex: one host sync per step
            opt.step()
        opt.zero_grad(set_to_none=True)
        return found_inf


class SkippedSteps:
    """Non-finite steps counted on the device (no host sync a step): the total, the longest run of
    consecutive ones since the last :meth:`take_longest`, and the index of the first."""

    def __init__(self, device: torch.device):
        self.run, self.longest, self.total = (torch.zeros((), device=device) for _ in range(3))
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def record(self, found_inf: torch.Tensor, step: int) -> None:
        self.run = (self.run + 1) * found_inf
        self.longest = torch.maximum(self.longest, self.run)
        self.total += found_inf
        self.first = torch.where((self.first < 0) & (found_inf > 0), torch.full_like(self.first, step), self.first)

    def take_longest(self) -> int:
        """The longest run since the last call (a host sync; the trainer calls it at log steps)."""
        longest = int(self.longest.item())
        self.longest.zero_()
        return longest
