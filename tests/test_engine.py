"""The trainer, checkpoints and the in-memory loader: schedule, exact resume, NaN guard, atomic saves."""
import csv
import math

import pytest
import torch
from conftest import TRAINER_OVERRIDES, tiny_images, tiny_trainer

from mixedae_fast.config import load_config
from mixedae_fast.model.mixedae import build_model
from mixedae_fast.pipelines.torch_loader import TensorBatchLoader, random_resized_crop_flip
from mixedae_fast.train.checkpoint import atomic_save, config_mismatch, list_checkpoints, resolve_resume
from mixedae_fast.train.optim import lr_at, param_groups

TINY = list(TRAINER_OVERRIDES)


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0.0, 1.0, 2.0, 10.0, 0.0) == 0.0
    assert lr_at(1.0, 1.0, 2.0, 10.0, 0.0) == pytest.approx(0.5)
    assert lr_at(2.0, 1.0, 2.0, 10.0, 0.1) == pytest.approx(1.0)
    assert lr_at(6.0, 1.0, 2.0, 10.0, 0.0) == pytest.approx(0.5)
    assert lr_at(10.0, 1.0, 2.0, 10.0, 0.1) == pytest.approx(0.1)


def test_param_groups_follow_mae():
    model = build_model(load_config("cpu_tiny", TINY))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_loader_is_a_function_of_seed_epoch_and_index():
    x, y = tiny_images()
    a = TensorBatchLoader(x, y, 8, 16, seed=3)
    b = TensorBatchLoader(x, y, 8, 16, seed=3)
    batches = [im for im, _ in a]
    b.set_epoch(0, start_step=2)
    assert torch.equal(next(iter(b))[0], batches[2])
    a.set_epoch(1)
    assert not torch.equal(next(iter(a))[0], batches[0])
    assert len(a) == 3 and batches[0].shape == (8, 3, 16, 16)


def test_random_resized_crop_full_scale_is_identity_or_flip():
    x = torch.rand(32, 3, 12, 12)
    g = torch.Generator().manual_seed(0)
    out = random_resized_crop_flip(x, 12, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=g)
    same = [torch.allclose(o, xi, atol=1e-5) for o, xi in zip(out, x)]
    flipped = [torch.allclose(o, xi.flip(-1), atol=1e-5) for o, xi in zip(out, x)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 4 < sum(flipped) < 28  # flips happen about half the time


def test_random_resized_crop_small_scale_zooms_in():
    x = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(8, 3, 64, 64).contiguous()
    out = random_resized_crop_flip(x, 16, scale=(0.04, 0.05), generator=torch.Generator().manual_seed(1))
    spans = (out[:, 0, 8].amax(-1) - out[:, 0, 8].amin(-1))
    assert (spans < 0.4).all()  # a crop of ~4-5% of the area spans a fraction of the ramp


def test_training_reduces_loss_and_writes_metrics(tmp_path):
    tr = tiny_trainer(tmp_path, ["--optim.epochs=20", "--optim.lr=2e-3"])
    hist = tr.fit()
    assert tr.step == 60 and len(hist) == 30
    assert hist[-1]["loss_rec"] < hist[0]["loss_rec"]
    assert all(math.isfinite(r["loss"]) for r in hist)
    assert "recognition" in hist[-1] and 0.0 <= hist[-1]["recognition"] <= 1.0
    rows = list(csv.DictReader(open(tmp_path / "cpu_tiny" / "metrics.csv")))
    assert len(rows) == 30 and float(rows[-1]["step"]) == 60
    assert [p.name for p in list_checkpoints(tmp_path / "cpu_tiny" / "checkpoints")] == \
        ["ckpt-00000056.pt", "ckpt-00000060.pt"]  # keep_last = 2


def test_resume_continues_bitwise(tmp_path):
    full = tiny_trainer(tmp_path / "a").fit()
    first = tiny_trainer(tmp_path / "b", max_steps=4)
    first.fit()
    resumed = tiny_trainer(tmp_path / "b", ["--run.resume=auto"])
    assert resumed.maybe_resume() is not None and resumed.step == 4
    rest = resumed.fit()
    losses_full = [r["loss"] for r in full if r["step"] > 4]
    assert losses_full == [r["loss"] for r in rest]  # bitwise: same floats


def test_resume_under_another_config_names_the_difference(tmp_path):
    tiny_trainer(tmp_path, max_steps=4).fit()
    other = tiny_trainer(tmp_path, ["--run.resume=auto", "--mixing.ha=oracle"])
    with pytest.raises(ValueError, match=r"mixing\.ha: 'topk' -> 'oracle'"):
        other.maybe_resume()


def test_nan_steps_are_skipped_on_device_then_stop(tmp_path):
    tr = tiny_trainer(tmp_path, ["--optim.max_nan_steps=3", "--run.log_every=4"])
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.model.patch_embed.weight.data.fill_(float("nan"))
    nan_state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="consecutive steps had a non-finite"):
        tr.fit()
    after = tr.model.state_dict()
    for k in before:  # the skipped steps changed nothing (NaN == NaN compared with equal_nan)
        assert torch.equal(after[k].isnan(), nan_state[k].isnan())
        torch.testing.assert_close(after[k], nan_state[k], equal_nan=True, rtol=0, atol=0)
    assert tr.optimizer.state[tr.model.cls_token]["step"].item() == 0


def test_atomic_save_keeps_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt-00000001.pt"
    atomic_save({"a": torch.ones(2)}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_resolve_resume(tmp_path):
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None
    (tmp_path / "ckpt-00000002.pt").write_bytes(b"x")
    (tmp_path / "ckpt-00000010.pt").write_bytes(b"x")
    (tmp_path / ".ckpt-00000012.pt.tmp-1").write_bytes(b"x")
    assert resolve_resume("auto", tmp_path).name == "ckpt-00000010.pt"
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing.pt"), tmp_path)


def test_config_mismatch_ignores_run_section():
    a = {"run": {"name": "a"}, "mixing": {"ha": "topk"}, "data": {"num_workers": 0, "batch_size": 8}}
    b = {"run": {"name": "b"}, "mixing": {"ha": "topk"}, "data": {"num_workers": 4, "batch_size": 16}}
    assert config_mismatch(a, b) == ["data.batch_size: 8 -> 16"]


def test_sigterm_saves_and_stops_at_a_step_boundary(tmp_path):
    import signal

    from mixedae_fast.train.engine import StopRequested

    tr = tiny_trainer(tmp_path)
    handler_before = signal.getsignal(signal.SIGTERM)
    tr._on_signal(signal.SIGTERM, None)  # as if the signal arrived during the first step
    with pytest.raises(StopRequested, match="SIGTERM"):
        tr.fit()
    assert tr.step == 1
    assert [p.name for p in list_checkpoints(tr.ckpt_dir)] == ["ckpt-00000001.pt"]
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the trainer's handler is removed


def test_fp16_uses_a_grad_scaler_and_resumes_it(tmp_path):
    tr = tiny_trainer(tmp_path, ["--runtime.precision=fp16"], max_steps=4)
    assert tr.scaler is not None
    hist = tr.fit()
    assert all(math.isfinite(r["loss"]) for r in hist)
    scale = tr.scaler.get_scale()
    resumed = tiny_trainer(tmp_path, ["--runtime.precision=fp16", "--run.resume=auto"])
    resumed.maybe_resume()
    assert resumed.scaler.get_scale() == scale and resumed.step == 4


def test_runtime_compile_trains_like_eager(tmp_path, monkeypatch):
    """``runtime.compile`` compiles the model's forward (here with the ``aot_eager`` backend: the wiring
    and the graph, not inductor's code generation, which is slow on CPU) and trains as eager does."""
    real_compile, compiled = torch.compile, []

    def aot_eager_compile(model, **kw):
        compiled.append(model)
        return real_compile(model, backend="aot_eager", **kw)

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    torch._dynamo.reset()
    eager = tiny_trainer(tmp_path / "eager", max_steps=4).fit()
    comp_trainer = tiny_trainer(tmp_path / "compiled", ["--runtime.compile=true"], max_steps=4)
    comp = comp_trainer.fit()
    assert compiled == [comp_trainer.model]
    assert [r["step"] for r in comp] == [r["step"] for r in eager]
    for a, b in zip(comp, eager, strict=True):   # same ops; AOTAutograd may reorder sums: fp32 rounding
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["recognition"] == pytest.approx(b["recognition"], abs=1e-6)


def test_nan_stop_names_the_newest_checkpoint_before_the_first_bad_step(tmp_path):
    # 3 steps an epoch, 9 in all; checkpoints at 2, 4, 6; steps 6.. are non-finite, seen at the log of step 8
    tr = tiny_trainer(tmp_path, ["--optim.max_nan_steps=2", "--run.log_every=8", "--run.ckpt_every=2",
                             "--run.keep_last=5"])
    real = tr.model.forward

    def diverging(*a, **k):
        out = real(*a, **k)
        return {**out, "loss": out["loss"] * float("nan")} if tr.step >= 5 else out

    tr.model.forward = diverging
    with pytest.raises(FloatingPointError) as info:
        tr.fit()
    # step 6's checkpoint fell inside the non-finite streak: not written (it was, before issue 29)
    assert [p.name for p in list_checkpoints(tr.ckpt_dir)] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    message = str(info.value)
    assert "the first was step 6" in message
    assert f"The newest checkpoint written before it is {tr.ckpt_dir / 'ckpt-00000004.pt'}:" in message
    assert "--run.resume_override=true" in message


def test_the_nan_stop_advice_leads_to_finite_weights_and_no_streak_checkpoint(tmp_path):
    # the weights themselves go NaN at step 3 (every later step non-finite); keep_last=1 would have let a
    # checkpoint written in the streak push the good one out
    tr = tiny_trainer(tmp_path, ["--optim.max_nan_steps=3", "--run.log_every=9", "--run.ckpt_every=2",
                             "--run.keep_last=1"])
    real = tr.model.forward

    def poisoned(*a, **k):
        if tr.step == 2:
            tr.model.patch_embed.weight.data.fill_(float("nan"))
        return real(*a, **k)

    tr.model.forward = poisoned
    with pytest.raises(FloatingPointError) as info:
        tr.fit()
    named = [p for p in list_checkpoints(tr.ckpt_dir) if f"is {p}:" in str(info.value)]
    assert [p.name for p in named] == ["ckpt-00000002.pt"], (str(info.value), list_checkpoints(tr.ckpt_dir))
    state = torch.load(named[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_log_line_every_log_every_steps_with_or_without_the_bar(tmp_path, capsys):
    for progress in (False, True):
        tr = tiny_trainer(tmp_path / str(progress), max_steps=4)
        tr.progress = progress
        tr.fit()
        captured = capsys.readouterr()
        lines = [line for line in captured.out.splitlines() if line.startswith("step ")]
        assert [line.split()[1] for line in lines] == ["2/4", "4/4"], captured.out
        for part in ("epoch 1.33", "loss ", "(rec ", " hc ", " lr ", " img/s", "data wait", "ETA ", "max RSS"):
            assert part in lines[-1], (part, lines[-1])
        assert ("pretrain:" in captured.err) == progress  # the bar, on stderr, only when asked for


def test_truncate_metrics_drops_later_rows_and_a_torn_line(tmp_path):
    from mixedae_fast.train.runs import truncate_metrics

    path = tmp_path / "metrics.csv"
    path.write_text("step,epoch,loss\r\n2,0.5,1.0\r\n4,1.0,0.9\r\n6,1.5,0.8\r\n1")  # torn: "1" of "10,..."
    assert truncate_metrics(path, 4) == 2
    assert path.read_bytes() == b"step,epoch,loss\r\n2,0.5,1.0\r\n4,1.0,0.9\r\n"
    assert truncate_metrics(path, 4) == 0 and truncate_metrics(tmp_path / "none.csv", 4) == 0


def test_atomic_write_json_writes_null_for_non_finite_floats(tmp_path):
    import json

    from mixedae_fast.train.checkpoint import atomic_write_json

    atomic_write_json({"loss": float("nan"), "rows": [1.0, float("inf")], "ok": 2}, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()

    def refuse(name):
        raise ValueError(name)

    assert json.loads(text, parse_constant=refuse) == {"loss": None, "rows": [1.0, None], "ok": 2}
