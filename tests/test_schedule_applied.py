"""What a real ``Trainer`` run applies, observed from outside: the lr the optimizer holds at every step
(read by an optimizer step pre-hook) against the closed form of MAE's schedule, per step, with the
``min_lr`` floor, accumulation and a resume in the middle; gradient clipping; fp16 loss scaling that
skips a step with an inf gradient and shrinks the scale."""
import math

import numpy as np
import pytest
import torch

from mixedae_fast.pipelines.torch_loader import TensorBatchLoader
from mixedae_fast.train.engine import Trainer

# 24 images, batch 8: 3 optimizer steps an epoch (6 micro-batches of 8 with 48 images and accum 2)
SCHEDULE = ("--optim.epochs=3", "--optim.warmup_epochs=1", "--optim.base_lr=0.064", "--run.log_every=1000",
            "--run.ckpt_every=1000", "--run.eval=false")


def _trainer(tiny, run_dir, *overrides, num=24, max_steps=None):
    cfg = tiny.config(*SCHEDULE, *overrides)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (num, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, num)
    loader = TensorBatchLoader(x, y, cfg.data.batch_size, cfg.model.img_size, seed=cfg.run.seed)
    model = tiny.model(*SCHEDULE, *overrides, seed=0)
    return Trainer(cfg, model, loader, run_dir, torch.device("cpu"), max_steps=max_steps, progress=False)


def _record(trainer, what):
    """``what(optimizer)`` at every optimizer step, just before the update."""
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(what(opt)))
    return seen


def _group_lrs(opt):
    lrs = {g["lr"] for g in opt.param_groups}
    assert len(lrs) == 1, lrs           # pretraining: one lr for every group
    return lrs.pop()


def closed_form(step, steps_per_epoch, peak, warmup_epochs, epochs, min_lr):
    """MAE's ``adjust_learning_rate`` at the start of optimizer step ``step`` (counted from 0)."""
    e = step / steps_per_epoch
    if e < warmup_epochs:
        return peak * e / warmup_epochs
    t = (e - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("accum, num", [(1, 24), (2, 48)], ids=["accum1", "accum2"])
def test_lr_applied_every_step_is_the_closed_form(tiny, tmp_path, accum, num):
    min_lr = 1e-4       # the floor the cosine ends on (peak 2e-3 / 4e-3)
    tr = _trainer(tiny, tmp_path / "run", f"--optim.accum_steps={accum}", f"--optim.min_lr={min_lr}", num=num)
    lrs = _record(tr, _group_lrs)
    tr.fit()
    peak = 0.064 * 8 * accum / 256      # base_lr x global batch / 256; accumulation makes the batch
    expected = [closed_form(s, 3, peak, 1, 3, min_lr) for s in range(9)]
    assert len(lrs) == 9                # 3 epochs of 3 optimizer steps, whatever the accumulation
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert lrs[1] > 0                   # warm-up per step, not per epoch


def test_resumed_run_applies_the_same_lrs(tiny, tmp_path):
    full = _trainer(tiny, tmp_path / "full", "--optim.min_lr=1e-4")
    lrs_full = _record(full, _group_lrs)
    full.fit()
    first = _trainer(tiny, tmp_path / "cut", "--optim.min_lr=1e-4", max_steps=4)   # stops inside epoch 1
    first.fit()
    resumed = _trainer(tiny, tmp_path / "cut", "--optim.min_lr=1e-4", "--run.resume=auto")
    assert resumed.maybe_resume() is not None
    lrs_rest = _record(resumed, _group_lrs)
    resumed.fit()
    assert lrs_rest == lrs_full[4:]


def _grad_norm(opt):
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def test_clip_grad_bounds_the_gradient_the_optimizer_sees(tiny, tmp_path):
    free = _trainer(tiny, tmp_path / "free", max_steps=3)
    norms_free = _record(free, _grad_norm)
    free.fit()
    clip = 1e-3
    assert min(norms_free) > 10 * clip  # so clipping has something to do
    clipped = _trainer(tiny, tmp_path / "clipped", f"--optim.clip_grad={clip}", max_steps=3)
    norms = _record(clipped, _grad_norm)
    clipped.fit()
    assert norms == pytest.approx([clip] * 3, rel=1e-4)  # clip_grad_norm_ scales to clip / (norm + 1e-6)


def test_fp16_inf_gradient_skips_the_update_and_shrinks_the_scale(tiny, tmp_path):
    """``runtime.precision=fp16`` runs on CPU (autocast fp16 + GradScaler("cpu")): the real path. At the
    default initial scale 2**16 even a clean first step overflows here (GradScaler then calibrates), so
    the scaler starts at 2**8, set through its state dict as a resumed run sets it."""
    def run(name, poison):
        # no warm-up: the first step has a non-zero lr, so a clean step moves the weights
        tr = _trainer(tiny, tmp_path / name, "--runtime.precision=fp16", "--optim.warmup_epochs=0", max_steps=1)
        tr.scaler.load_state_dict({**tr.scaler.state_dict(), "scale": 2.0 ** 8})
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        if poison:  # an inf in one gradient of the first (and only) backward
            tr.model.patch_embed.weight.register_hook(lambda g: torch.full_like(g, math.inf))
        hist = tr.fit()
        changed = any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
        return tr.scaler.get_scale(), changed, hist[-1]["skipped_steps"]

    assert run("clean", poison=False) == (2.0 ** 8, True, 0)
    assert run("poisoned", poison=True) == (2.0 ** 7, False, 1)   # GradScaler's backoff factor 0.5
