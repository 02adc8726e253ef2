"""Smoke tests of the benchmark harnesses at tiny sizes on CPU: they run, and their result files carry
what a reader needs (device, versions, SHA, command, and rows whose figures are consistent)."""
import json
import statistics

import pytest
import torch

from mixedae_fast.benchmarks import bench_kernels, bench_step


def test_bench_kernels_result_file(tmp_path):
    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--config", "cpu_tiny", "--batch", "8", "--warmup", "0", "--iters", "1",
                               "--triton", "--no-compile", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "git_sha", "date", "command"):
        assert result[key], key
    (batch,) = result["batches"]
    assert batch["shapes"]["batch"] == 8 and batch["shapes"]["N"] == 64
    rows = batch["rows"]
    ops = ("assignment", "patch_mix", "unmix_fwd", "unmix_fwd_bwd")
    assert set(rows) == {"copy/reference", *(f"{op}/{v}" for op in ops for v in ("triton", "reference"))}
    for row in rows.values():
        assert row["ms"] > 0 and row["bytes"] > 0
        assert row["gb_per_s"] == pytest.approx(row["bytes"] / row["ms"] / 1e6)
    assert rows["copy/reference"]["of_copy"] == 1.0
    # patch_mix must at least read the images (8*3*32*32 fp32) and write the fp32 targets (same size)
    assert rows["patch_mix/triton"]["bytes"] > 2 * 8 * 3 * 32 * 32 * 4


def _kernels_result(figures: dict[int, dict[str, tuple]]) -> dict:
    """A bench_kernels result file as the H200 run of 2026-11-29 printed it (batch -> op -> ms per variant)."""
    batches = []
    for batch, ops in figures.items():
        rows = {f"{op}/{v}": {"op": op, "variant": v, "ms": ms}
                for op, times in ops.items() for v, ms in zip(("triton", "reference", "compiled"), times) if ms}
        batches.append({"shapes": {"batch": batch}, "rows": rows})
    return {"device": "NVIDIA H200", "command": "python -m mixedae_fast.benchmarks.bench_kernels --batch 256",
            "date": "2026-11-29", "git_sha": "239a069", "torch": "2.11.0", "batches": batches}


H200 = {"assignment": (0.046, 0.497, None), "patch_mix": (1.046, 0.670, 0.242), "unmix_fwd": (0.124, 0.221, 0.097),
        "unmix_fwd_bwd": (0.545, 0.579, 0.818)}


def test_bench_kernels_table_row_from_a_result_file(tmp_path, capsys):
    """The row `kernels=auto` reads: the kernel only where it beat both references at every batch."""
    path = tmp_path / "k.json"
    slower_at_1024 = {**H200, "unmix_fwd_bwd": (2.4, 2.3, 3.1)}
    path.write_text(json.dumps(_kernels_result({256: H200, 1024: slower_at_1024})))
    assert bench_kernels.main(["--table-row", str(path)]) == 0
    (card, row), = json.loads(capsys.readouterr().out).items()
    assert card == "NVIDIA H200"
    assert {op: e["backend"] for op, e in row.items()} == {"assignment": "triton", "patch_mix": "torch",
                                                           "unmix": "torch"}
    assert row["unmix"]["measured"].startswith("fwd+bwd; batch 256: triton 0.545 ms, eager reference 0.579 ms, "
                                               "compiled reference 0.818 ms; batch 1024:")
    assert "batch 1024: triton 2.400 ms" in row["unmix"]["measured"] and "git 239a069" in row["unmix"]["source"]
    _, row = bench_kernels.table_row(_kernels_result({256: H200}), "k.json")
    assert row["unmix"]["backend"] == "triton" and str(path.name) in row["unmix"]["source"]


def test_bench_kernels_table_row_errors(tmp_path, capsys):
    cpu = _kernels_result({8: {op: (None, 1.0, None) for op in H200}})
    for name, text in (("cpu.json", json.dumps(cpu)), ("bad.json", "{not json"), ("other.json", "{}")):
        (tmp_path / name).write_text(text)
        assert bench_kernels.main(["--table-row", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot make measured.json entries") and err.count("\n") == 1, err
    assert bench_kernels.main(["--table-row", str(tmp_path / "missing.json")]) == 2


def test_bench_kernels_rejects_batches_not_a_multiple_of_r():
    with pytest.raises(SystemExit):
        bench_kernels.main(["--config", "cpu_tiny", "--batch", "6"])


def test_bench_step_result_file(tmp_path):
    out = tmp_path / "step.json"
    assert bench_step.main(["--config", "cpu_tiny", "--batch", "8", "--modes", "mae,topk", "--warmup", "0",
                            "--iters", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["git_sha"] and result["device"] and set(result["rows"]) == {"mae", "topk"}
    for row in result["rows"].values():
        assert row["img_per_s"] == pytest.approx(8 / row["ms_per_step"] * 1e3)


def _bench_train(tmp_path, *extra):
    from mixedae_fast.benchmarks import bench_train

    out = tmp_path / "out"
    assert bench_train.main(["--config", "cpu_tiny", "--batch", "8", "--warmup", "1", "--windows", "2",
                             "--steps", "1", "--breakdown-steps", "1", "--out", str(out), *extra]) == 0
    return json.loads((out / "bench_train.json").read_text()), out


def test_bench_train_rows_fields_and_files(tmp_path):
    result, out = _bench_train(tmp_path, "--modes", "official,mixedae", "--source", "synthetic,files",
                               "--num-images", "64", "--profile", str(tmp_path / "prof"))
    for key in ("device", "torch", "triton", "git_sha", "date", "command", "matmul_tflops"):
        assert result[key], key
    assert set(result["rows"]) == {f"{m}/eager/{s}" for m in ("official", "mixedae") for s in ("synthetic", "files")}
    for label, row in result["rows"].items():
        assert row["img_per_s"] == pytest.approx(8 / row["ms_per_step"] * 1e3)
        assert row["ms_per_step"] == pytest.approx(statistics.median(row["window_ms"]))
        assert row["flops_per_step"] > 0 and row["mfu"] > 0
        assert set(row["breakdown_ms"]) == {"data", "assign", "mix", "encoder", "decoder", "losses", "backward",
                                            "optimizer"}
        assert 0 <= row["data_wait_fraction"] < 1
        assert row["loader"] == ("device tensors" if row["source"] == "synthetic" else "torch")
        assert row["data_stream"] == ("none: device tensors" if row["source"] == "synthetic" else "the step's stream")
        trace = json.loads(open(row["profile"]).read())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"encoder", "backward", "optimizer"} <= names, label
        assert (row["vs_official"] is None) == (row["mode"] == "official")
    # MixedAE's encoder is shared by r = 4 sources and adds TopK / HC logits: FLOPs per step differ from MAE's
    assert result["rows"]["mixedae/eager/synthetic"]["flops_per_step"] != \
        result["rows"]["official/eager/synthetic"]["flops_per_step"]
    header = (out / "bench_train.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["row", "mode", "variant"] and "encoder_ms" in header
    assert (out / "bench_train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_train_records_a_failing_row_and_goes_on(tmp_path, monkeypatch):
    """A row that fails (here: its runner, as a compile error would) is recorded with its error, the rows
    after it still run, and the result files are written after each row."""
    from mixedae_fast.benchmarks import bench_train

    real = bench_train.StepRunner
    written = []
    write = bench_train._write_outputs

    def runner(cfg, *args, **kwargs):
        if cfg.mixing.group_size == 1:   # the MAE-mode row
            raise RuntimeError("inductor: a compile error")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(bench_train, "StepRunner", runner)
    monkeypatch.setattr(bench_train, "_write_outputs", lambda result, out: (written.append(len(result["rows"])),
                                                                           write(result, out)))
    result, out = _bench_train(tmp_path, "--modes", "mae,mixedae", "--source", "synthetic", "--breakdown-steps", "0")
    failed, ok = result["rows"]["mae/eager/synthetic"], result["rows"]["mixedae/eager/synthetic"]
    assert failed["error"] == "RuntimeError: inductor: a compile error" and "ms_per_step" not in failed
    assert ok["ms_per_step"] > 0 and ok["vs_official"] is None
    assert written == [1, 2]
    assert "inductor: a compile error" in (out / "bench_train.csv").read_text()


@pytest.mark.slow
def test_bench_train_compiled_row(tmp_path):
    result, _ = _bench_train(tmp_path, "--modes", "mixedae", "--source", "synthetic", "--compile", "both")
    eager, compiled = result["rows"]["mixedae/eager/synthetic"], result["rows"]["mixedae/compiled/synthetic"]
    assert "breakdown_ms" in eager and "breakdown_ms" not in compiled   # instrumented steps are eager only
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-3)   # same model, seed and steps


def test_phased_step_is_the_model_step():
    """The breakdown's spelled-out step computes the same loss and update as ``StepRunner.step``."""
    from mixedae_fast.benchmarks.bench_train import Clock, StepRunner
    from mixedae_fast.config import load_config

    cfg = load_config("cpu_tiny", ["--data.batch_size=8"])
    images = torch.randn(8, 3, 32, 32)
    a, b = (StepRunner(cfg, torch.device("cpu"), official=False, compile_mode=None) for _ in range(2))
    loss_a = a.step(images, step=3)
    loss_b, phases = b.phased_step(lambda: images, step=3, clock=Clock(torch.device("cpu")))
    assert torch.equal(loss_a, loss_b) and all(v >= 0 for v in phases.values())
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("hc", ["--mixing.hc_form=infonce", "--mixing.hc_form=supcon", "--mixing.hc_on=both"])
def test_phased_step_takes_every_hc_form(hc):
    """The spelled-out step computes the training step's loss for every HC form and place."""
    from mixedae_fast.benchmarks.bench_train import Clock, StepRunner
    from mixedae_fast.config import load_config

    cfg = load_config("cpu_tiny", ["--data.batch_size=8", hc])
    images = torch.randn(8, 3, 32, 32)
    a, b = (StepRunner(cfg, torch.device("cpu"), official=False, compile_mode=None) for _ in range(2))
    loss_b, _ = b.phased_step(lambda: images, step=3, clock=Clock(torch.device("cpu")))
    assert torch.equal(a.step(images, step=3), loss_b)


@pytest.mark.parametrize("official", [False, True])
def test_the_bench_step_is_the_training_step(official):
    """The benchmark runs the trainer's step (mixedae_fast.train.step.TrainStep): clipping applies and a
    non-finite step is skipped; the official-recipe row steps whatever it gets, as that recipe does."""
    from mixedae_fast.benchmarks.bench_train import StepRunner
    from mixedae_fast.config import load_config

    cfg = load_config("cpu_tiny", ["--data.batch_size=8", "--optim.clip_grad=1e-6"])
    runner = StepRunner(cfg, torch.device("cpu"), official=official, compile_mode=None)
    assert runner.train_step.clip_grad == 1e-6
    before = [p.detach().clone() for p in runner.model.parameters()]
    images = torch.randn(8, 3, 32, 32)
    images[0, 0, 0, 0] = float("nan")
    runner.step(images, step=0)
    finite = all(torch.isfinite(p).all() for p in runner.model.parameters())
    unchanged = all(torch.equal(a, p) for a, p in zip(before, runner.model.parameters()))
    assert (finite and unchanged) != official


def test_bench_cli_and_errors(capsys):
    from mixedae_fast.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--modes", "fast"])
    assert "unknown or no mode(s) ['fast']" in capsys.readouterr().err


class _Loader:
    """Two batches an epoch, recording set_epoch; with ``ready`` it says its work ran on a stream of its own."""

    def __init__(self, ready=None):
        self.epochs, self.ready = [], ready
        if ready is not None:
            self.ready_event = lambda: self.ready

    def set_epoch(self, epoch, start_step=0):
        self.epochs.append((epoch, start_step))

    def __iter__(self):
        e = self.epochs[-1][0]
        return iter([(torch.full((1,), float(10 * e + k)), None) for k in range(2)])


class _Stream:
    def __init__(self):
        self.waited = []

    def wait_event(self, event):
        self.waited.append(event)


def _files_source(loader):
    from mixedae_fast.benchmarks.bench_train import Source

    src = Source.__new__(Source)   # the files source without building loaders
    src.kind, src.loader, src.backend, src.it, src.epoch, src.data_stream = "files", loader, "x", None, 0, "step"
    return src


def test_bench_train_source_names_each_next_epoch():
    """The files source walks epochs 0, 1, 2 with set_epoch (a loader iterated again without it repeats
    the epoch: DALI rebuilt its pipeline there, a stall at every boundary)."""
    loader = _Loader()
    src = _files_source(loader)
    assert [float(src()) for _ in range(5)] == [0.0, 1.0, 10.0, 11.0, 20.0]
    assert loader.epochs == [(0, 0), (1, 0), (2, 0)]


def test_bench_train_data_phase_waits_for_the_loader_stream():
    """The step's stream waits, inside the data phase, for an event from a loader with its own stream; a
    loader without one (its device work is on the step's stream already) is not waited for."""
    stream, event = _Stream(), object()
    src = _files_source(_Loader(ready=event))
    src()
    src.wait(stream)
    assert stream.waited == [event] and "own stream" in src.data_stream
    plain = _files_source(_Loader())
    plain()
    plain.wait(stream)
    assert stream.waited == [event] and plain.data_stream == "step"
    src.wait(None)                      # CPU: no stream, nothing to wait for
    assert stream.waited == [event]


def test_recognition_is_the_logged_definition():
    """Features that name the source give 1; identical features keep every key (all tie), so the
    kept keys are the group's mix: exactly chance (n-1)/(r*n-1); random features as a loop counts."""
    from mixedae_fast.benchmarks.recognition_ceiling import recognition

    r, n = 3, 4
    src = torch.arange(r).repeat_interleave(n)
    onehot = torch.nn.functional.one_hot(src, r).float()[None]
    assert recognition(onehot, src, n).item() == 1.0
    assert recognition(torch.ones(1, r * n, 5), src, n).item() == pytest.approx((n - 1) / (r * n - 1))
    # random features (no ties): a loop keeping each query's n-1 most similar others
    feats = torch.randn(2, r * n, 6, generator=torch.Generator().manual_seed(0))
    z = torch.nn.functional.normalize(feats, dim=-1)
    want = []
    for g in range(2):
        right = 0
        for q in range(r * n):
            others = sorted((k for k in range(r * n) if k != q), key=lambda k: -float(z[g, q] @ z[g, k]))[:n - 1]
            right += sum(int(src[k] == src[q]) for k in others) / (n - 1)
        want.append(right / (r * n))
    torch.testing.assert_close(recognition(feats, src, n), torch.tensor(want))


def test_recognition_ceiling_runs_and_writes_its_table(tmp_path, cache, image_folder):
    from mixedae_fast.benchmarks import recognition_ceiling

    data = image_folder(48, 24)
    out = tmp_path / "rc" / "r.json"
    from conftest import TINY_OVERRIDES
    assert recognition_ceiling.main(["--data-dir", str(data), "--steps", "3", "--eval-at", "1", "--out", str(out),
                                     *TINY_OVERRIDES]) == 0
    result = json.loads(out.read_text())
    assert [(r["recogniser"], r["step"]) for r in result["rows"]] == [("content", 1), ("content", 3),
                                                                      ("context", 1), ("context", 3)]
    assert all(0 <= r["recognition"] <= 1 for r in result["rows"])
    assert result["topk"] == 4 and result["chance"] == pytest.approx(3 / 15) and result["val_images"] == 24
    assert "| context |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        recognition_ceiling.main(["--recognisers", "mlp"])


def test_select_passes_model_is_exact_and_short():
    """The K-th value search as benchmarks/select_passes.py models it (the kernel's algorithm in PyTorch):
    topk's value on every row (continuous, quarter-step, few-level and adjacent-float scores, K = 1, n/4
    and every key), in far
    fewer passes than the radix search's 32 steps; cut short, it hands the open rows to topk's value."""
    from mixedae_fast.benchmarks.select_passes import distributions, main, search_kth

    gen = torch.Generator().manual_seed(0)
    rows = distributions(256, 196, 64, gen)
    for name, s in rows.items():
        s = s.float().contiguous()
        for k in (1, 49, 196):
            kth, passes = search_kth(s, k)
            assert torch.equal(kth, s.topk(k, dim=1).values[:, -1]), (name, k)
            assert int(passes.max()) <= 16, (name, k, int(passes.max()))
    kth, passes = search_kth(rows["normal"], 49, max_passes=1)
    assert torch.equal(kth, rows["normal"].topk(49, dim=1).values[:, -1]) and int(passes.max()) == 1
    assert main(["--rows", "128"]) == 0
