"""Webdataset shards through the webdataset library, the one tar reader: local, brace and pipe: specs,
.webp, unlabelled shards, ranks on disjoint shards, a seeded per-epoch order, exact resume, full epochs
from short shards; val and the kNN bank from shard specs in one pass; unreadable samples skipped, listed
with shard and key, and the run stopped past data.max_bad_fraction."""
import io
import tarfile

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from PIL import Image

from mixedae_fast.pipelines.shards import ShardLoader, count_local_samples, expand_spec
from mixedae_fast.pipelines.torch_loader import IMAGENET_MEAN, IMAGENET_STD


def _png(value, fmt="PNG", size=(12, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, (7 * value) % 256)).save(buf, format=fmt)
    return buf.getvalue()


def _write_shards(root, shards=4, per=6, labels=True, fmt="PNG", ext="png", bad=(), name="train"):
    """``shards`` tars of ``per`` flat-colour images; the keys in ``bad`` hold bytes that are no image."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"{name}-{s:03d}.tar", "w") as tar:
            for k in range(per):
                i = s * per + k
                files = {ext: b"not an image" if f"{i:05d}" in bad else _png(i * 9 % 256, fmt)}
                if labels:
                    files["cls"] = str(i % 3).encode()
                for suffix, data in files.items():
                    info = tarfile.TarInfo(f"{i:05d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def _values(images):
    """Each image's red channel value (the images are flat colours): identifies the sample."""
    x = images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return [round(v) for v in (x[:, 0].mean((1, 2)) * 255).tolist()]


def test_specs(tmp_path):
    root = _write_shards(tmp_path / "d")
    names = [str(root / f"train-{s:03d}.tar") for s in range(4)]
    assert expand_spec(str(root / "train-{000..003}.tar")) == names
    assert expand_spec(root) == names and expand_spec(str(root / "*.tar")) == names
    assert expand_spec(f"pipe:cat {names[0]},{names[1]}") == [f"pipe:cat {names[0]}", names[1]]
    assert count_local_samples(names) == 24
    with pytest.raises(ValueError, match="no such file"):
        expand_spec(str(root / "nope-{0..1}.tar"))
    with pytest.raises(ValueError, match="pass epoch_size"):
        ShardLoader(f"pipe:cat {names[0]}", batch_size=4, img_size=8)


def test_an_epoch_covers_the_rank_shards_in_a_seeded_order(tmp_path):
    root = _write_shards(tmp_path / "d")
    kw = dict(batch_size=4, img_size=8, augment=False, seed=3)
    ranks = [ShardLoader(str(root), shard_id=r, num_shards=2, **kw) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]                           # 24 samples / (4 x 2 ranks)
    seen = [[v for x, _ in r for v in _values(x)] for r in ranks]
    assert all(len(s) == 12 for s in seen) and not set(seen[0]) & set(seen[1])   # disjoint shards
    again = [v for x, _ in ShardLoader(str(root), shard_id=0, num_shards=2, **kw) for v in _values(x)]
    assert again == seen[0]                                            # same seed, same order
    ranks[0].set_epoch(1)
    assert [v for x, _ in ranks[0] for v in _values(x)] != seen[0]     # another epoch, another order
    labels = torch.cat([y for _, y in ShardLoader(str(root), **kw)])
    assert labels.tolist() and set(labels.tolist()) == {0, 1, 2}


def test_resume_skips_to_the_same_batches(tmp_path):
    root = _write_shards(tmp_path / "d")
    loader = ShardLoader(str(root), batch_size=4, img_size=8, seed=1)
    loader.set_epoch(2)
    full = [x for x, _ in loader]
    loader.set_epoch(2, 4)
    rest = [x for x, _ in loader]
    assert len(full) == 6 and len(rest) == 2
    for a, b in zip(full[4:], rest):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pipe_webp_unlabelled_and_short_shards(tmp_path):
    root = _write_shards(tmp_path / "d", shards=2, per=3, labels=False, fmt="WEBP", ext="webp")
    spec = ",".join(f"pipe:cat {p}" for p in sorted(root.glob("*.tar")))
    with pytest.raises(ValueError, match="data.labels=none"):
        next(iter(ShardLoader(spec, batch_size=2, img_size=8, epoch_size=6)))
    loader = ShardLoader(spec, batch_size=2, img_size=8, epoch_size=10, labels=False)   # more than the 6 there
    batches = list(loader)
    assert len(batches) == 5 and all(y.tolist() == [-1, -1] for _, y in batches)     # a second pass fills it
    assert np.isfinite(torch.cat([x for x, _ in batches]).numpy()).all()
    with pytest.raises(ValueError, match="every rank needs a shard"):
        ShardLoader(spec, batch_size=1, img_size=8, epoch_size=6, shard_id=0, num_shards=3)


TINY = [*TINY_OVERRIDES, "--data.num_workers=0", "--optim.epochs=1",
        "--optim.warmup_epochs=1", "--run.log_every=1", "--run.eval=false", "--data.backend=torch"]


def test_pretrain_on_unlabelled_data(tmp_path, capsys):
    """data.labels=none: a flat folder of images, and pipe: shards without .cls, pretrain as they are."""
    import csv

    from mixedae_fast.cli import main

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(16):
        Image.new("RGB", (20, 20), (i * 15, 100, 200 - i * 10)).save(flat / f"img{i:02d}.jpg")
    common = ["pretrain", "--no-progress", *TINY, f"--run.out_dir={tmp_path / 'runs'}", "--data.labels=none"]
    assert main([*common, f"--data.path={flat}", "--run.name=flat"]) == 0
    assert main([*common, f"--data.path={flat}", "--run.name=flat2", "--data.labels=auto"]) == 2
    assert "no class subfolders" in capsys.readouterr().err
    root = _write_shards(tmp_path / "shards", shards=2, per=8, labels=False)
    spec = ",".join(f"pipe:cat {p}" for p in sorted(root.glob("*.tar")))
    assert main([*common, f"--data.path={spec}", "--data.format=webdataset", "--data.epoch_size=16",
                 "--run.name=shards"]) == 0
    for name in ("flat", "shards"):
        with open(tmp_path / "runs" / name / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)


def test_empty_shards_with_epoch_size_are_an_error_not_a_hang(tmp_path):
    """Issue 29 item 3: empty shards (or none with an image) and data.epoch_size used to refill the epoch
    for ever; now one error line naming the shards and the fix, exit 2. Run in a child under a timeout so a
    regression fails instead of hanging the suite."""
    import os
    import subprocess
    import sys

    root = tmp_path / "empty"
    root.mkdir()
    for s in range(2):
        tarfile.open(root / f"e-{s}.tar", "w").close()     # a valid tar with no member
    spec = str(root / "e-{0..1}.tar")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "mixedae_fast.cli", "pretrain", "--no-progress", *TINY,
           f"--run.out_dir={tmp_path / 'runs'}", "--data.labels=none", f"--data.path={spec}",
           "--data.format=webdataset", "--data.epoch_size=8"]
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[-1].startswith("error: webdataset shards") and "no sample in them" in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(ValueError, match="no sample in them"):
        next(iter(ShardLoader(spec, batch_size=2, img_size=8, epoch_size=8, labels=False)))


def test_val_and_bank_read_each_sample_once_from_any_spec(tmp_path):
    """Issue 25: data.val_path as a brace range (or pipe:) used to fail with 'does not exist' (the val and bank
    loaders read tars through a second reader that knew only local paths). One pass, in shard order, unaugmented:
    the same batches as the file loader gives for the same images in a folder."""
    from mixedae_fast.pipelines.torch_loader import FileImageLoader

    root = _write_shards(tmp_path / "d", shards=2, per=5)
    folder = tmp_path / "folder" / "c"
    folder.mkdir(parents=True)
    for i in range(10):
        (folder / f"{i:05d}.png").write_bytes(_png(i * 9 % 256))
    files = [x for x, _ in FileImageLoader(folder.parent, batch_size=4, img_size=8, augment=False, shuffle=False,
                                           drop_last=False, verify="off")]
    for spec in (str(root / "train-{000..001}.tar"), ",".join(f"pipe:cat {p}" for p in sorted(root.glob("*.tar")))):
        val = ShardLoader(spec, batch_size=4, img_size=8, augment=False, single_pass=True)
        got = list(val)
        assert [len(y) for _, y in got] == [4, 4, 2] and torch.cat([y for _, y in got]).tolist() == [i % 3 for i in
                                                                                                     range(10)]
        for (a, _), b in zip(got, files, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    bank = ShardLoader(str(root), batch_size=4, img_size=8, augment=False, single_pass=True, limit=7)
    assert len(bank) == 2 and [len(y) for _, y in bank] == [4, 3]


def test_a_corrupt_image_is_skipped_and_listed_with_shard_and_key(tmp_path):
    """Issue 25: one undecodable image in a shard used to end the run ('cannot identify image file <_io.BytesIO
    ...>', no shard or key named). Now it is skipped, the epoch stays full, and the SkipLog names shard and key."""
    from mixedae_fast.pipelines.shards import SkipLog

    root = _write_shards(tmp_path / "d", shards=2, per=12, bad={"00005"})
    log = SkipLog()
    loader = ShardLoader(str(root / "train-{000..001}.tar"), batch_size=4, img_size=8, max_bad_fraction=0.2,
                         skip_log=log)
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and all(len(y) == 4 for _, y in batches)
    assert 5 * 9 not in [v for x, _ in batches for v in _values(x)]
    assert list(log.samples) == [(str(root / "train-000.tar"), "00005")]
    assert "not an image PIL can read" in log.samples[(str(root / "train-000.tar"), "00005")]
    assert "BytesIO" not in log.samples[(str(root / "train-000.tar"), "00005")]
    log.write_to(tmp_path / "skipped_images.json")
    import json

    assert json.loads((tmp_path / "skipped_images.json").read_text())[0]["key"] == "00005"
    val = ShardLoader(str(root), batch_size=5, img_size=8, augment=False, single_pass=True, skip_log=log,
                      max_bad_fraction=0.2)
    assert sum(len(y) for _, y in val) == 23 and val.skipped == 1
    with pytest.raises(ValueError, match=r"1 of \d+ samples .* more than data.max_bad_fraction = 0 allows .*"
                                         r"train-000.tar key '00005'.*--data.max_bad_fraction="):
        list(ShardLoader(str(root), batch_size=4, img_size=8, max_bad_fraction=0))


def test_unreadable_shard_is_one_error_naming_it(tmp_path):
    # the library reports the failed command's status or, when it reads first, an empty stream
    with pytest.raises(ValueError, match=r"shard 'pipe:false' could not be read \((OSError: the command exited "
                                         r"with status 1|ReadError: empty file)\); check that it exists"):
        list(ShardLoader("pipe:false", batch_size=2, img_size=8, epoch_size=4))


def test_pretrain_skips_bad_samples_and_evaluates_on_shard_specs(tmp_path, capsys):
    """The CLI end to end: brace-range train and pipe: val shards (eval and the kNN bank read them too), one corrupt
    image listed in skipped_images.json with shard and key; with data.max_bad_fraction=0 the same data stops the
    run with one error line naming the count and the key to raise, and the run folder keeps its files."""
    import json

    from mixedae_fast.cli import main

    root = _write_shards(tmp_path / "shards", shards=2, per=12, bad={"00005"})
    _write_shards(tmp_path / "shards", shards=2, per=6, name="val")
    val = ",".join(f"pipe:cat {root / f'val-{s:03d}.tar'}" for s in range(2))    # a pass of unknown length
    common = ["pretrain", "--no-progress", *TINY, f"--run.out_dir={tmp_path / 'runs'}", "--data.format=webdataset",
              f"--data.path={root / 'train-{000..001}.tar'}", f"--data.val_path={val}", "--run.eval=true"]
    assert main([*common, "--run.name=ok", "--data.max_bad_fraction=0.5"]) == 0
    run = tmp_path / "runs" / "ok"
    listed = json.loads((run / "skipped_images.json").read_text())
    assert [(e["shard"], e["key"]) for e in listed] == [(str(root / "train-000.tar"), "00005")]
    report = json.loads((run / "report.json").read_text())
    assert "knn" in report["eval"]["pretrained"]
    capsys.readouterr()
    assert main([*common, "--run.name=strict", "--data.max_bad_fraction=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 of ") and "data.max_bad_fraction = 0 allows" in err[0], err
    assert "--data.max_bad_fraction=" in err[0] and "Traceback" not in err[0]
    strict = tmp_path / "runs" / "strict"
    assert (strict / "config.yaml").is_file() and str(strict / "skipped_images.json") in err[0]
    assert json.loads((strict / "skipped_images.json").read_text())[0]["key"] == "00005"


def test_eval_and_visualize_read_a_run_on_shards_as_its_own_evaluation(tmp_path, capsys, cache):
    """Issue 25: `mixedae-fast eval RUN` on a run trained on shards used to refuse ('reads ImageFolders'), so a run
    could not be evaluated again on its own data. Now eval reads the bank and val through pretrain's own loaders:
    the same figures as the run's report.json for the same checkpoint; visualize draws from the same val; finetune
    (which needs ImageFolders) and a run without val shards stay one error line saying what works."""
    import json

    from mixedae_fast.cli import main

    root = _write_shards(tmp_path / "shards", shards=3, per=8)
    _write_shards(tmp_path / "shards", shards=2, per=6, name="val")
    runs = tmp_path / "runs"
    common = ["pretrain", "--no-progress", *TINY, f"--run.out_dir={runs}", "--data.format=webdataset",
              f"--data.path={root / 'train-{000..002}.tar'}"]
    assert main([*common, f"--data.val_path={root / 'val-{000..001}.tar'}", "--run.eval=true",
                 "--run.name=ok"]) == 0
    run = runs / "ok"
    ours = json.loads((run / "report.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    got = json.loads((run / "eval_run.json").read_text())
    assert got["step"] == ours["steps"] and (got["num_train"], got["num_val"], got["num_classes"]) == (24, 12, 3)
    for model in ("pretrained", "random_init"):
        assert got["results"][model]["avg"] == ours["eval"][model], model    # kNN and probe, to the digit
    assert "webdataset shards" in capsys.readouterr().out
    assert main(["eval", str(run), "--max-train", "10", "--no-probe", "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["num_train"] == 10
    assert main(["visualize", str(run), "--out", str(tmp_path / "pictures")]) == 0
    assert (tmp_path / "pictures" / "reconstruction.png").is_file()

    capsys.readouterr()
    assert main(["finetune", str(run), "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finetune reads ImageFolders" in err[0] and "--data-dir DIR" in err[0], err
    assert main([*common, "--run.name=noval"]) == 0
    capsys.readouterr()
    assert main(["eval", str(runs / "noval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without data.val_path" in err[0] and "--data-dir DIR" in err[0], err
