"""Properties of the code added since 2026-11-29 that no other test asserted (issue 28): each test is
written against the property, so a plausible bug of that kind fails it (docs/contributing.md's log says
which planted bug each one caught).

1. k accumulated micro-batches give the gradients of one batch of k·b (the micro-loss is divided by k);
2. the host-side optimiser branch (apex's FusedAdam, which cannot read ``found_inf``) skips exactly the
   non-finite steps, and ``build_optimizer`` says which optimiser reads the flag itself;
3. with a GradScaler, clipping sees the unscaled gradients;
4. the exported timm config normalises as the training loader does;
5. the study chooses on its select split and reports its report split, and its held-out split comes
   from the training folder, apart from the bank;
6. the linear probe evaluates in eval mode (a sample's prediction does not depend on the others);
7. the loaders normalise with ImageNet's mean and std, per channel;
8. assignments are independent across seeds and steps (no (seed, step) pair aliases another);
9. a run folder with a config but no checkpoint yet is refused; sbatch reads back every hostile value.
"""
import json
import shlex
import sys
import types

import pytest
import torch
from conftest import Tiny
from PIL import Image

from mixedae_fast.train.step import TrainStep

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # MAE's, as documented


# -- 1-3: the training step ------------------------------------------------------------------------
def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def test_accumulated_micro_batches_give_the_full_batch_gradient():
    """Two micro-batches of 4 images (groups 0 and 1) with accum=2, against one batch of 8 with accum=1:
    the same assignment per global group, the same loss mean, so the same gradients to fp32 rounding."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 16, 16)
    full, accumulated = Tiny.model(seed=1), Tiny.model(seed=1)
    assert full.group_size == 4
    TrainStep(full, None, torch.device("cpu"), None, seed=3).micro(images, step=7)
    step = TrainStep(accumulated, None, torch.device("cpu"), None, seed=3, accum=2)
    step.micro(images[:4], step=7, first_group=0, last=False)
    step.micro(images[4:], step=7, first_group=1, last=True)
    for a, b in zip(_grads(accumulated), _grads(full), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _HostSideAdam(torch.optim.SGD):
    """A stand-in for apex's FusedAdam: an optimiser that knows nothing of ``found_inf``."""


def test_the_host_side_optimiser_branch_skips_exactly_the_non_finite_steps():
    model = Tiny.model(seed=2)
    opt = _HostSideAdam(model.parameters(), lr=0.1)
    step = TrainStep(model, opt, torch.device("cpu"), None, device_skip=False)
    before = [p.detach().clone() for p in model.parameters()]
    step.micro(torch.full((4, 3, 16, 16), float("nan")), step=0)
    assert float(step.update()) == 1.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)), "a NaN step ran"
    step.micro(torch.randn(4, 3, 16, 16), step=1)
    assert float(step.update()) == 0.0
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)), "a finite step skipped"


def test_build_optimizer_says_which_optimiser_reads_found_inf_itself(monkeypatch):
    """torch's fused AdamW reads ``found_inf`` on the device; apex's FusedAdam (here a stand-in module)
    does not, so the trainer must check on the host."""
    from mixedae_fast.train.optim import build_optimizer

    model = Tiny.model()
    opt, device_skip = build_optimizer(model, Tiny.config("--optim.optimizer=torch"), 1e-3, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and device_skip is True
    apex = types.ModuleType("apex")
    apex.optimizers = types.SimpleNamespace(FusedAdam=lambda groups, lr, betas, adam_w_mode: _HostSideAdam(groups, lr))
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
    opt, device_skip = build_optimizer(model, Tiny.config("--optim.optimizer=apex"), 1e-3, torch.device("cpu"))
    assert isinstance(opt, _HostSideAdam) and device_skip is False


def test_clipping_with_a_grad_scaler_sees_the_unscaled_gradients():
    """SGD with lr 1 moves the parameters by the clipped gradient: its norm must be the clip value, not the
    clip value divided by the loss scale (clipping the scaled gradients, then unscaling)."""
    model = Tiny.model(seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    step = TrainStep(model, opt, torch.device("cpu"), None, clip_grad=1e-3, scaler=scaler, device_skip=False)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    step.micro(torch.randn(4, 3, 16, 16), step=0)
    assert float(step.update()) == 0.0
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-3)


# -- 4, 7: normalisation -----------------------------------------------------------------------------
def _solid_folder(root, color=(200, 30, 90), size=16):
    """An ImageFolder of solid-colour images: any crop, flip or resize leaves every pixel that colour."""
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (size + 4 * i, size), color).save(root / cls / f"{i}.png")
    return root


def _loader_pixel(folder, augment: bool) -> torch.Tensor:
    """One pixel of a batch of the torch file loader (the pretraining loader with ``augment``), [3]."""
    from mixedae_fast.pipelines.torch_loader import FileImageLoader

    loader = FileImageLoader(str(folder), batch_size=4, img_size=16, device=torch.device("cpu"), augment=augment,
                             shuffle=False, drop_last=False)
    images, _ = next(iter(loader))
    return images[0, :, 5, 7].float()


@pytest.mark.parametrize("augment", [True, False], ids=["pretraining", "evaluation"])
def test_the_loaders_normalise_with_imagenet_mean_and_std_per_channel(tmp_path, augment):
    color = (200, 30, 90)
    want = torch.tensor([(c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    torch.testing.assert_close(_loader_pixel(_solid_folder(tmp_path / "f", color), augment), want,
                               rtol=0, atol=2e-2)   # the loaders' bf16/uint8 rounding at most


def test_the_exported_config_normalises_as_the_training_loader(tmp_path):
    """A timm user preprocesses with config.json's mean/std: on the same image that must give what the
    pretraining loader fed the encoder."""
    from mixedae_fast.config import config_to_dict
    from mixedae_fast.downstream import export as ex
    from mixedae_fast.train.checkpoint import Pretrained

    cfg = Tiny.config()
    model = Tiny.model()
    pre = Pretrained(config_to_dict(cfg), model.state_dict(), tmp_path / "ckpt-00000001.pt", tmp_path, 1)
    ex.export_run(pre, tmp_path / "export", "avg")
    data = json.loads((tmp_path / "export" / "config.json").read_text())["pretrained_cfg"]
    color = (17, 240, 128)
    theirs = torch.tensor([(c / 255 - m) / s for c, m, s in zip(color, data["mean"], data["std"], strict=True)])
    torch.testing.assert_close(_loader_pixel(_solid_folder(tmp_path / "f", color), True), theirs, rtol=0, atol=2e-2)


# -- 5: the study's splits ---------------------------------------------------------------------------
def test_the_study_evaluates_heldout_from_the_training_folder_apart_from_the_bank(monkeypatch):
    """evaluate_run: the bank and the held-out queries are disjoint parts of the training folder; the val
    queries are the val folder's. Features stand in for images (one distinct vector per image)."""
    import mixedae_fast.downstream.evaluate as ev
    from mixedae_fast import study

    tx, ty = torch.arange(50.0)[:, None].repeat(1, 4), torch.arange(50) % 5
    vx, vy = 1000 + torch.arange(20.0)[:, None].repeat(1, 4), torch.arange(20) % 5
    feats = iter([({"avg": tx}, ty), ({"avg": vx}, vy)])
    monkeypatch.setattr(ev, "image_loaders", lambda *a, **k: ("train", "val"))
    monkeypatch.setattr(ev, "extract_pooled", lambda *a, **k: next(feats))
    seen = []
    monkeypatch.setattr(ev, "knn_accuracy", lambda bx, by, x, y, **k: seen.append((bx, x)) or float(len(seen)))
    monkeypatch.setattr(ev, "linear_probe_accuracy", lambda *a, **k: 0.0)
    out = study.evaluate_run(None, "t", "v", 16, torch.device("cpu"), 0.2, 5, 1)
    (bank_h, held), (bank_v, val) = seen
    assert torch.equal(bank_h, bank_v) and torch.equal(val, vx)
    rows = lambda t: {int(v) for v in t[:, 0]}   # noqa: E731
    assert rows(held) <= set(range(50)) and not rows(held) & rows(bank_h) and len(held) == out["sizes"]["heldout"] == 10
    assert (out["heldout"]["knn"], out["val"]["knn"]) == (1.0, 2.0)


def test_the_study_chooses_on_the_select_split_not_the_report_split():
    from mixedae_fast import study

    def run(seed, held, val):
        split = lambda knn: {"knn": knn, "linear_probe": 50.0, "few_shot": 40.0}   # noqa: E731
        return {"seed": seed, "steps": 10, "final": {}, "eval": {"heldout": split(held), "val": split(val)}}

    names = list(study.VARIANTS)[:2]
    results = {names[0]: [run(0, 60.0, 90.0)], names[1]: [run(0, 70.0, 80.0)]}   # best on val != best held out
    rows = study.summarize(results, "heldout", "val")
    meta = {"shots": 5, "sizes": {"bank": 40, "heldout": 10, "val": 20}, "dataset": "embedded", "steps": 10,
            "seeds": [0], "runs": 2, "epochs": 1, "config": "cpu_tiny", "overrides": [], "probe_epochs": 1,
            "git_sha": "abc", "machine": "cpu", "omp_num_threads": 1, "date": "today", "command": "mixedae-fast study"}
    table = study.markdown_table(rows, "heldout", "val", meta)
    assert f"Chosen on the heldout split (best kNN): {names[1]}." in table


# -- 6: the linear probe -----------------------------------------------------------------------------
def test_the_linear_probe_predicts_each_sample_alone():
    """In eval mode BatchNorm uses its running statistics: the accuracy over a val set is the weighted
    mean of the accuracies over its parts, however differently the parts are distributed."""
    from mixedae_fast.downstream.evaluate import linear_probe_accuracy

    g = torch.Generator().manual_seed(0)
    tx = torch.randn(120, 8, generator=g)
    ty = (tx[:, 0] > 0).long() + 2 * (tx[:, 1] > 0).long()
    v1 = torch.randn(30, 8, generator=g) * 0.5 + 1.0       # parts with other means and spreads than training
    v2 = torch.randn(10, 8, generator=g) * 3.0 - 2.0
    y1, y2 = (v1[:, 0] > 0).long() + 2 * (v1[:, 1] > 0).long(), (v2[:, 0] > 0).long() + 2 * (v2[:, 1] > 0).long()
    acc = lambda x, y: linear_probe_accuracy(tx, ty, x, y, epochs=5)   # noqa: E731
    whole = acc(torch.cat([v1, v2]), torch.cat([y1, y2]))
    assert whole == pytest.approx((30 * acc(v1, y1) + 10 * acc(v2, y2)) / 40, abs=1e-4)


# -- 8: the assignment -------------------------------------------------------------------------------
def test_assignments_do_not_alias_across_seeds_and_steps():
    """Every (seed, step) draws its own assignment: no two of a 6 x 6 grid coincide (with 16 positions a
    chance collision of whole assignments is ~1e-10), in particular not (s, t) and (s + 1, t - 1) or
    (s, t) and (t, s)."""
    from mixedae_fast.kernels.assignment import draw_assignment

    seen = {}
    for seed in range(6):
        for step in range(6):
            ids = draw_assignment(4, 16, 4, 3, seed, step, backend="torch")
            key = tuple(ids.flatten().tolist())
            assert key not in seen, f"(seed {seed}, step {step}) draws the assignment of {seen[key]}"
            seen[key] = (seed, step)


def test_the_assignment_is_a_uniform_permutation_per_group():
    """Per group the drawn positions are distinct, sorted within each source's block, and over many groups
    every position is equally likely to be visible (a chi-square bound)."""
    from mixedae_fast.kernels.assignment import draw_assignment

    ids = draw_assignment(4000, 16, 2, 5, seed=1, step=2, backend="torch").long()
    assert all(len(set(row.tolist())) == 10 for row in ids)
    assert (ids.view(4000, 2, 5).diff(dim=2) > 0).all()
    counts = torch.bincount(ids.flatten(), minlength=16).double()
    expected = ids.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum().item() < 37.7   # chi-square, 15 dof, p = 0.001


# -- 9: run folders and sbatch -------------------------------------------------------------------------
def test_a_run_folder_with_a_config_and_no_checkpoint_yet_is_refused(tmp_path):
    from mixedae_fast.train.runs import RunFolderError, check_fresh

    (tmp_path / "config.yaml").write_text("run: {}\n")
    with pytest.raises(RunFolderError, match="already holds a run"):
        check_fresh(tmp_path, "none")
    check_fresh(tmp_path, "auto")   # resuming it is what the message advises


@pytest.mark.parametrize("value", ["a#b", "#begin", "x # y", 'q"uote', "back\\slash", "tab\tsep", "semi;colon",
                                   "it's", "$HOME", "plain"])
def test_sbatch_reads_back_every_value_as_written(value):
    """sbatch splits an #SBATCH line on whitespace, groups with quotes, escapes with \\ and drops what follows
    an unquoted #: the value as written must come back from such a reading."""
    from mixedae_fast.train.launch import sbatch_value

    lexer = shlex.shlex(f"--job-name={sbatch_value(value)}", posix=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    assert list(lexer) == [f"--job-name={value}"]


# -- property tests: the keep set, resume at any step --------------------------------------------------
def _score_rows(kind: str, rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[rows, n]`` fp32 patch scores of one kind, random and adversarial."""
    if kind == "normal":
        return torch.randn(rows, n, generator=gen)
    if kind == "few levels":
        return torch.randint(-2, 3, (rows, n), generator=gen).float()
    if kind == "all equal":
        return torch.full((rows, n), 0.75)
    if kind == "signed zeros":
        return torch.where(torch.rand(rows, n, generator=gen) < 0.5, torch.tensor(0.0), torch.tensor(-0.0)) + \
            torch.randint(0, 2, (rows, n), generator=gen).float() * torch.randn(rows, n, generator=gen)
    if kind == "adjacent floats":
        base = torch.tensor([1.5]).view(torch.int32)
        return (base + torch.randint(0, 6, (rows, n), generator=gen, dtype=torch.int32)).view(torch.float32)
    if kind == "denormals":
        return (torch.randint(1, 9, (rows, n), generator=gen, dtype=torch.int32)).view(torch.float32) * \
            torch.where(torch.rand(rows, n, generator=gen) < 0.3, -1.0, 1.0)
    if kind == "wide range":
        return torch.randn(rows, n, generator=gen) * 10.0 ** torch.randint(-30, 30, (rows, n), generator=gen).float()
    raise ValueError(kind)


@pytest.mark.parametrize("fallback", [True, False], ids=["search", "search-alone"])
@pytest.mark.parametrize("kind", ["normal", "few levels", "all equal", "signed zeros", "adjacent floats", "denormals",
                                  "wide range"])
def test_the_fused_kernels_keep_set_is_topk_keep_mask_on_any_scores(kind, fallback, monkeypatch):
    """Scores set exactly (one-hot queries, keys holding 4·score, d = 16: every score is the fp32 value
    chosen): the forward's saved keep bits equal ``topk_keep_mask`` row for row, for K = 1, mid, all but
    one and every key, with the CLS key kept and the CLS row whole, whatever the scores' distribution.
    ``search-alone``: without the radix search that finishes rows left open, so the bracketing search
    itself must settle every row within its passes (a search that stalls, exact only thanks to its
    fallback, fails here)."""
    from mixedae_fast.kernels import homologous_attention as ha

    monkeypatch.setattr(ha, "SEARCH_FALLBACK", fallback)
    r, n, d = 3, 5, 16
    L = 1 + r * n
    gen = torch.Generator().manual_seed(len(kind))
    scores = torch.zeros(2, 1, L, L)
    scores[..., 1:, 1:] = _score_rows(kind, 2 * (L - 1), L - 1, gen).view(2, 1, L - 1, L - 1)
    q = torch.eye(L, d).expand(2, 1, L, d).contiguous()
    k = (4 * scores).transpose(-2, -1)[..., :d].contiguous()   # q_i · k_j = 4 · scores[i, j]; times 16^-0.5
    k = torch.cat([k, torch.zeros(2, 1, L, d - k.shape[-1])], dim=-1) if k.shape[-1] < d else k
    src = torch.arange(r).repeat_interleave(n)
    assert torch.equal(ha.qk_scores(q, k)[..., 1:, 1:], scores[..., 1:, 1:]), "the scores are not the ones chosen"
    for K in (1, 7, L - 2, L - 1):
        _, _, _, bits = ha.homologous_attention_forward(q, k, q, src, K, 0)
        words = bits.view(2, L, -1)
        keep = ((words[..., :, None] >> torch.arange(32)) & 1).flatten(-2)[..., :L].bool()
        want = ha.topk_keep_mask(scores[:, 0, 1:, 1:], K)
        assert torch.equal(keep[:, 1:, 1:], want), (kind, K)
        assert keep[:, 1:, 0].all() and keep[:, 0, :].all(), "the CLS key and the CLS row"


@pytest.mark.slow  # ~15 s: five short runs
def test_resume_at_any_step_equals_the_uninterrupted_run(tmp_path):
    """Interrupted after step k (mid-epoch, at an epoch's end, in the last epoch) and resumed, every later
    step's loss equals the uninterrupted run's, bitwise."""
    from conftest import tiny_trainer

    every = ["--run.log_every=1", "--run.ckpt_every=1"]
    full = {r["step"]: r["loss"] for r in tiny_trainer(tmp_path / "full", every).fit()}
    assert max(full) == 9
    for k in (1, 3, 5, 8):
        tiny_trainer(tmp_path / f"cut{k}", every, max_steps=k).fit()
        resumed = tiny_trainer(tmp_path / f"cut{k}", [*every, "--run.resume=auto"])
        assert resumed.maybe_resume() is not None and resumed.step == k
        assert {r["step"]: r["loss"] for r in resumed.fit()} == {s: v for s, v in full.items() if s > k}, k


# -- the fine-tuning recipe's loss -------------------------------------------------------------------
def test_the_finetune_loss_is_label_smoothed_as_maes_recipe():
    """MAE fine-tunes with label smoothing 0.1: without Mixup the loss is (1 − ε)·CE + ε·(mean −log p) with
    ε = 0.1 (a formula written here); with Mixup/CutMix (the ``mae`` recipe) every class outside the mixed
    pair keeps the smoothing's floor ε / C of the target."""
    from mixedae_fast.downstream.finetune import FinetuneConfig, _mixing

    cfg, eps, classes = FinetuneConfig(), 0.1, 10
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, classes, generator=g), torch.tensor([0, 1, 2, 3, 4, 5])
    mix, loss = _mixing(cfg.regularisation(depth=2), cfg.label_smoothing, classes)   # light: no Mixup
    assert mix is None
    logp = logits.log_softmax(-1)
    want = -((1 - eps) * logp.gather(1, labels[:, None]).squeeze(1) + eps * logp.mean(-1)).mean()
    torch.testing.assert_close(loss(logits, labels), want)
    mix, _ = _mixing(cfg.regularisation(depth=12), cfg.label_smoothing, classes)      # mae: Mixup / CutMix
    _, targets = mix(torch.randn(6, 3, 16, 16, generator=g), labels)
    torch.testing.assert_close(targets.sum(-1), torch.ones(6))
    assert targets.min().item() == pytest.approx(eps / classes)
