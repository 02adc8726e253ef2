"""DALI loader: the torch-loader contract on CPU (shapes, dtypes, labels in ImageFolder order, values),
the epoch arithmetic (len, drop_last, shards, resume), both loaders listing the same files, webdataset
shards fed by the one tar reader (pipelines/shards.py), and the errors.
GPU: the "mixed" decode with bf16/fp16 output."""
import io
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'mixedae_fast[dali-cu13]', "
                    "or the [dali] extra); the DALI loader is untested here")

from mixedae_fast.pipelines import dali  # noqa: E402
from mixedae_fast.pipelines.dali import DaliLoader  # noqa: E402
from mixedae_fast.pipelines.synthetic import CLASSES  # noqa: E402
from mixedae_fast.pipelines.torch_loader import TensorBatchLoader  # noqa: E402


@pytest.fixture
def root(image_folder):
    """root/{train,val}/<class>/<i>.jpg: 40 train and 20 val images of 40 px, 10 classes (conftest's shared
    folder, the torch loader's tests' too)."""
    return image_folder(40, 20, size=40)


def folder_samples(folder: Path):
    """(relative path, label) in torchvision ImageFolder order: sorted classes, sorted files."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    return [(f"{c}/{f.name}", i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())]


def epoch(loader):
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), batches


def test_cpu_batches_keep_the_loader_contract(root):
    loader = DaliLoader(root / "train", batch_size=8, img_size=32)
    assert len(loader) == 5
    n = 0
    for images, labels in loader:
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert labels.shape == (8,) and labels.dtype == torch.int64 and labels.device.type == "cpu"
        assert torch.isfinite(images).all()
        n += 1
    assert n == 5
    assert abs(images.mean().item()) < 0.7 and 0.4 < images.std().item() < 1.6   # normalised, not 0-255
    for dtype in (torch.float16, torch.bfloat16):
        images, _ = next(iter(DaliLoader(root / "train", batch_size=4, img_size=32, dtype=dtype)))
        assert images.dtype == dtype


def test_eval_matches_torch_loader_and_imagefolder_labels(root):
    """No shuffle, eval graph at the native size: the same samples in the same order as torchvision's
    ImageFolder, and the same normalised pixels as TensorBatchLoader up to JPEG decoder differences."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    folder = root / "val"
    images, labels, _ = epoch(DaliLoader(folder, batch_size=20, img_size=40, augment=False, shuffle=False))
    ref = ImageFolder(str(folder))
    assert labels.tolist() == ref.targets
    assert ref.classes == list(CLASSES)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in ref.samples])
    expected, _ = next(iter(TensorBatchLoader(pixels, ref.targets, batch_size=20, img_size=40, augment=False,
                                              shuffle=False)))
    assert (images - expected).abs().max() < 1e-5       # both decode with libjpeg-turbo: the same pixels
    # Resized (both antialiased bilinear): equal up to the filters' rounding.
    images, _, _ = epoch(DaliLoader(folder, batch_size=20, img_size=32, augment=False, shuffle=False))
    expected, _ = next(iter(TensorBatchLoader(pixels, ref.targets, batch_size=20, img_size=32, augment=False,
                                              shuffle=False)))
    diff = (images - expected).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())


def test_label_order_is_byte_order_of_class_folders(root, tmp_path):
    """Upper case sorts before lower case (byte order, as Python's sorted and torchvision), uneven classes."""
    src = sorted((root / "val").rglob("*.jpg"))
    layout = {"Zebra": 3, "apple": 1, "apple2": 2, "banana": 2}
    k = 0
    for name, count in layout.items():
        (tmp_path / name).mkdir()
        for _ in range(count):
            shutil.copy(src[k], tmp_path / name / f"{k:03d}.jpg")
            k += 1
    (tmp_path / "notes.txt").write_text("not a class")
    _, labels, _ = epoch(DaliLoader(tmp_path, batch_size=8, img_size=16, augment=False, shuffle=False))
    assert labels.tolist() == [label for _, label in folder_samples(tmp_path)] == [0, 0, 0, 1, 2, 2, 3, 3]


def test_non_square_images(tmp_path):
    """Eval: shorter side to S, then the centre S x S; train: any crop resized to S x S."""
    from PIL import Image

    (tmp_path / "c").mkdir()
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, 16:48] = 255                      # white centre half, black sides
    for k in range(4):
        Image.fromarray(img).save(tmp_path / "c" / f"{k}.png")
    images, _, _ = epoch(DaliLoader(tmp_path, batch_size=4, img_size=16, augment=False, shuffle=False))
    assert images.shape == (4, 3, 16, 16)
    white = (1 - torch.tensor(dali.IMAGENET_MEAN)) / torch.tensor(dali.IMAGENET_STD)
    assert torch.allclose(images[:, :, :, 2:-2], white.view(1, 3, 1, 1).expand(4, 3, 16, 12), atol=1e-3)
    images, _, _ = epoch(DaliLoader(tmp_path, batch_size=4, img_size=16))
    assert images.shape == (4, 3, 16, 16)


def test_epochs_are_reproducible_and_differ(root):
    """Same seed, same epochs (bitwise on the CPU, whatever the thread count); the next epoch differs."""
    runs = []
    for threads in (2, 1):
        loader = DaliLoader(root / "train", batch_size=8, img_size=32, seed=3, num_threads=threads)
        runs.append([epoch(loader)[:2]])
        loader.set_epoch(1)
        runs[-1].append(epoch(loader)[:2])
    for (a, la), (b, lb) in zip(*runs):
        assert torch.equal(a, b) and torch.equal(la, lb)
    (a, la), (b, lb) = runs[0]
    assert not torch.equal(a, b) and not torch.equal(la, lb)


def test_each_epoch_is_one_pass(root):
    """Consecutive epochs share a pipeline, yet each is one pass over the data: no sample twice, and with
    drop_last=False every sample once (a DALI reader left unpadded would run into the next epoch)."""
    drop = DaliLoader(root / "val", batch_size=6, img_size=16, augment=False, seed=5)
    keep = DaliLoader(root / "val", batch_size=6, img_size=16, augment=False, seed=5, drop_last=False)
    everything = Counter(label for _, label in folder_samples(root / "val"))
    for e in range(3):
        drop.set_epoch(e)
        keep.set_epoch(e)
        images, _, batches = epoch(drop)
        assert len(batches) == 3
        flat = images.flatten(1)
        assert torch.cdist(flat, flat).add(torch.eye(len(flat)) * 1e9).min() > 1e-3   # 18 distinct images
        assert Counter(epoch(keep)[1].tolist()) == everything


def test_eval_is_deterministic(root):
    loader = DaliLoader(root / "val", batch_size=5, img_size=32, augment=False, shuffle=False)
    a, la, _ = epoch(loader)
    loader.set_epoch(7)
    b, lb, _ = epoch(loader)
    assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("drop_last, expect", [(True, [6] * 6), (False, [6] * 6 + [4])])
def test_batches_per_epoch(root, drop_last, expect):
    loader = DaliLoader(root / "train", batch_size=6, img_size=16, drop_last=drop_last)
    _, labels, batches = epoch(loader)
    assert len(loader) == len(expect) and [len(b[1]) for b in batches] == expect
    if not drop_last:
        assert Counter(labels.tolist()) == Counter(label for _, label in folder_samples(root / "train"))


def test_shards_cover_the_dataset_once(root):
    everything = Counter(label for _, label in folder_samples(root / "val"))
    for shuffle in (False, True):
        shards = [DaliLoader(root / "val", batch_size=4, img_size=16, augment=False, shuffle=shuffle,
                             drop_last=False, shard_id=s, num_shards=3) for s in range(3)]
        assert len({len(s) for s in shards}) == 1
        assert sum((Counter(epoch(s)[1].tolist()) for s in shards), Counter()) == everything
    # drop_last: every shard yields (20 // 3) // 4 batches, so ranks stay in step.
    assert [len(list(DaliLoader(root / "val", batch_size=4, img_size=16, shard_id=s, num_shards=3)))
            for s in range(3)] == [1, 1, 1]


def test_resume_continues_at_the_same_position(root):
    loader = DaliLoader(root / "train", batch_size=8, img_size=32, seed=1)
    loader.set_epoch(2)
    _, _, full = epoch(loader)
    loader.set_epoch(2, start_step=3)
    assert loader.state_dict() == {"epoch": 2, "start_step": 3, "seed": 1}
    resumed = list(loader)
    assert len(resumed) == len(loader) - 3 == 2
    for (x, y), (rx, ry) in zip(full[3:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert loader.start_step == 0 and len(list(loader)) == len(loader)


@pytest.mark.parametrize("batch_size, batches", [(10, 2), (6, 3)])   # 20 images: 2 exact, 3 + a dropped tail
def test_next_epoch_is_prefetched_across_the_boundary(root, monkeypatch, batch_size, batches):
    """When an epoch's last batch is handed out, DALI is already running the next epoch's first batch
    (the pipeline has scheduled runs beyond it), and ``set_epoch(e + 1)`` continues that pipeline instead
    of rebuilding it (a rebuild throws the prefetched work away and costs ~2 s with GPU decoding); each
    epoch stays one clean pass."""
    opened = []
    real_open = DaliLoader._open
    monkeypatch.setattr(DaliLoader, "_open", lambda self, e: opened.append(e) or real_open(self, e))
    loader = DaliLoader(root / "val", batch_size=batch_size, img_size=16, seed=4)
    assert len(loader) == batches and opened == [0]
    pipe, got = loader._pipe, []
    for e in range(3):
        loader.set_epoch(e)
        epoch_batches = []
        for step, (images, labels) in enumerate(loader):
            epoch_batches.append((images.clone(), labels.clone()))
            if step == batches - 1:
                assert not loader._pipe.empty(), "nothing scheduled past the epoch's last batch"
        got.append(epoch_batches)
    assert opened == [0] and loader._pipe is pipe, "a pipeline was rebuilt at an epoch boundary"
    for epoch_batches in got:             # one pass each (no image twice), and the epochs differ
        flat = torch.cat([x for x, _ in epoch_batches]).flatten(1)
        assert len(epoch_batches) == batches and torch.cdist(flat, flat).add(torch.eye(len(flat)) * 1e9).min() > 1e-3
    assert not torch.equal(got[0][0][0], got[1][0][0])
    loader.set_epoch(1, start_step=1)     # a resume rebuilds at the named epoch
    assert len(list(loader)) == batches - 1 and opened[-1] == 1


def test_file_list_and_explicit_files(root, tmp_path):
    folder = root / "train"
    samples = folder_samples(folder)
    listing = root / "train_list.txt"
    listing.write_text("".join(f"train/{p} {label}\n" for p, label in samples))
    want = Counter(label for _, label in samples)
    _, labels, _ = epoch(DaliLoader(listing, "filelist", batch_size=5, img_size=16, drop_last=False))
    assert Counter(labels.tolist()) == want
    files, file_labels = zip(*samples)
    _, labels, _ = epoch(DaliLoader(folder, batch_size=5, img_size=16, drop_last=False, files=files,
                                    labels=file_labels))
    assert Counter(labels.tolist()) == want


def write_tar(path: Path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_through_the_shard_reader(root, tmp_path):
    """Issue 25: DALI read tars with its own reader (local paths only: a brace range, pipe: or URL 'did not
    exist'; one corrupt image stopped it). Now shards.py's reader feeds DALI: any spec, labels as the torch
    loader reads them, a corrupt image skipped and listed with shard and key; val in one pass."""
    from mixedae_fast.pipelines.dali import DaliShardLoader
    from mixedae_fast.pipelines.shards import SkipLog

    folder = root / "train"
    samples = folder_samples(folder)
    members = [m for k, (p, label) in enumerate(samples)
               for m in ((f"s{k:05d}.jpg", (folder / p).read_bytes() if k != 7 else b"not a jpeg"),
                         (f"s{k:05d}.cls", f"{label}\n".encode()))]
    write_tar(tmp_path / "a-0.tar", members[:40])
    write_tar(tmp_path / "a-1.tar", members[40:])
    log = SkipLog()
    for spec in (str(tmp_path / "a-{0..1}.tar"), f"pipe:cat {tmp_path / 'a-0.tar'},pipe:cat {tmp_path / 'a-1.tar'}"):
        val = DaliShardLoader(spec, batch_size=6, img_size=24, augment=False, single_pass=True, epoch_size=40,
                              max_bad_fraction=0.1, skip_log=log)
        images, labels, _ = epoch(val)
        assert images.shape == (39, 3, 24, 24) and torch.isfinite(images).all()
        assert labels.tolist() == [label for k, (_, label) in enumerate(samples) if k != 7]
    assert sorted(log.samples) == sorted([(f"pipe:cat {tmp_path / 'a-0.tar'}", "s00007"),
                                          (str(tmp_path / "a-0.tar"), "s00007")])
    train = DaliShardLoader(tmp_path, batch_size=4, img_size=16, max_bad_fraction=0.1)
    assert len(train) == 10 and [x.shape for x, _ in train] == [(4, 3, 16, 16)] * 10 and train.skipped >= 1
    with pytest.raises(ValueError, match="data.max_bad_fraction = 0 allows"):
        list(DaliShardLoader(tmp_path, batch_size=4, img_size=16, max_bad_fraction=0))


def test_build_loaders_feeds_dali_from_the_shard_reader(tmp_path):
    """data.backend=dali with webdataset train and val given as brace ranges: train, val and the bank all
    read through shards.py and decode in DALI (on the CPU here)."""
    from PIL import Image

    from mixedae_fast.config import load_config
    from mixedae_fast.pipelines.dali import DaliShardLoader
    from mixedae_fast.train.data import build_loaders

    for name, n in (("train", 16), ("val", 8)):
        members = []
        for k in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (20, 20), (k * 15, 40, 90)).save(buf, "JPEG")
            members += [(f"{k:04d}.jpg", buf.getvalue()), (f"{k:04d}.cls", str(k % 2).encode())]
        write_tar(tmp_path / f"{name}-0.tar", members[:n])
        write_tar(tmp_path / f"{name}-1.tar", members[n:])
    cfg = load_config("cpu_tiny", ["--model.img_size=16", "--data.batch_size=4", "--data.backend=dali",
                                   "--data.format=webdataset", "--data.num_workers=0",
                                   f"--data.path={tmp_path / 'train-{0..1}.tar'}",
                                   f"--data.val_path={tmp_path / 'val-{0..1}.tar'}"])
    loaders = build_loaders(cfg, torch.device("cpu"), torch.float32)
    assert all(isinstance(x, DaliShardLoader) for x in (loaders.train, loaders.val, loaders.bank))
    assert len(loaders.train) == 4 and sum(len(y) for _, y in loaders.val) == 8
    assert sum(len(y) for _, y in loaders.bank) == 16


def test_corrupt_file_stops_dali_and_files_skips_it(root, tmp_path):
    src = sorted((root / "val" / CLASSES[0]).glob("*.jpg"))
    (tmp_path / "a").mkdir()
    for k, p in enumerate(src):
        shutil.copy(p, tmp_path / "a" / f"{k}.jpg")
    data = src[0].read_bytes()
    (tmp_path / "a" / "9_cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match="files="):
        list(DaliLoader(tmp_path, batch_size=3, img_size=16, augment=False, shuffle=False, drop_last=False))
    good = [f"a/{k}.jpg" for k in range(len(src))]
    _, labels, _ = epoch(DaliLoader(tmp_path, batch_size=3, img_size=16, drop_last=False, files=good,
                                    labels=[0] * len(good)))
    assert labels.tolist() == [0] * len(good)


def test_errors(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="make-data"):
        DaliLoader(tmp_path / "missing", batch_size=2, img_size=16)
    with pytest.raises(ValueError, match="DaliShardLoader"):
        DaliLoader(tmp_path / "missing", "webdataset", batch_size=2, img_size=16)
    with pytest.raises(ValueError, match="no class subfolders"):
        DaliLoader(tmp_path, batch_size=2, img_size=16)
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="no images"):
        DaliLoader(tmp_path, batch_size=2, img_size=16)
    with pytest.warns(UserWarning, match="did you mean"):   # the dataset root, not a split: as the torch loader
        DaliLoader(root, batch_size=2, img_size=16)
    with pytest.raises(ValueError, match="names no shard"):
        dali.DaliShardLoader(tmp_path, batch_size=2, img_size=16)
    with pytest.raises(ValueError, match="fewer than one batch"):
        DaliLoader(root / "val", batch_size=64, img_size=16)
    with pytest.raises(ValueError, match="fmt must be one of"):
        DaliLoader(root / "val", "lmdb", batch_size=2, img_size=16)
    (tmp_path / "list.txt").write_text("only_a_path.jpg\n")
    with pytest.raises(ValueError, match="expected '<path> <integer label>'"):
        DaliLoader(tmp_path / "list.txt", "filelist", batch_size=2, img_size=16)


def test_not_installed(monkeypatch, root):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    assert not dali.dali_available()
    extras = r"pip install 'mixedae_fast\[dali-cu13\]' \(CUDA 13\) or 'mixedae_fast\[dali-cu12\]'"
    with pytest.raises(ImportError, match=extras):
        DaliLoader(root / "val", batch_size=2, img_size=16)


def test_module_imports_without_dali():
    code = ("import sys; sys.modules['nvidia.dali'] = None\n"
            "import mixedae_fast.pipelines.dali as d\n"
            "assert not d.dali_available()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_loader_runs_on_cpu(tmp_path):
    import json

    from mixedae_fast.benchmarks import bench_loader

    out = tmp_path / "bench.json"
    result = bench_loader.main([str(tmp_path / "data"), "--make-data", "24", "--size", "32", "--batch", "4",
                                "--img-size", "32", "--warmup", "1", "--iters", "4", "--window", "2",
                                "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["images_per_s"] == result["images_per_s"] > 0
    assert {"device", "torch", "dali", "date", "git_sha", "command"} <= saved.keys()


def test_bench_loader_times_the_shard_readers_on_the_same_images(tmp_path):
    """The shard backends read tars written from the folder: every image once, with its class."""
    from mixedae_fast.benchmarks import bench_loader
    from mixedae_fast.pipelines.files import scan_image_folder
    from mixedae_fast.pipelines.shards import count_local_samples, expand_spec

    result = bench_loader.main([str(tmp_path / "data"), "--make-data", "24", "--size", "32", "--batch", "4",
                                "--img-size", "32", "--warmup", "1", "--iters", "4", "--window", "2",
                                "--device", "cpu", "--per-shard", "10", "--workers", "0",
                                "--backend", "dali,dali-shards,torch-shards"])
    assert [r["backend"] for r in result["rows"]] == ["dali", "dali-shards", "torch-shards"]
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    spec = bench_loader.folder_to_shards(tmp_path / "data" / "train", tmp_path / "data" / "train.shards", 10)
    assert count_local_samples(expand_spec(spec)) == 24 == len(scan_image_folder(tmp_path / "data" / "train")[0])
    with pytest.raises(SystemExit, match="error: --backend"):
        bench_loader.main([str(tmp_path / "data" / "train"), "--backend", "dali,ffcv"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_mixed_decode(root, dtype):
    loader = DaliLoader(root / "train", batch_size=8, img_size=32, device="cuda:0", dtype=dtype)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == dtype and images.device == torch.device("cuda:0")
    assert labels.dtype == torch.int64 and labels.device == torch.device("cuda:0")
    assert torch.isfinite(images.float()).all()
    event = loader.ready_event()                 # the benchmark's data phase waits on DALI's output stream
    torch.cuda.current_stream().wait_event(event)
    event.synchronize()
    assert DaliLoader(root / "val", batch_size=5, img_size=16).ready_event() is None   # CPU: nothing to wait for
    # Eval on the GPU decoder vs the CPU one: the same samples, pixels equal up to decoder differences.
    gpu, gpu_labels, _ = epoch(DaliLoader(root / "val", batch_size=5, img_size=40, device="cuda:0", dtype=dtype,
                                          augment=False, shuffle=False))
    cpu, cpu_labels, _ = epoch(DaliLoader(root / "val", batch_size=5, img_size=40, augment=False, shuffle=False))
    assert torch.equal(gpu_labels.cpu(), cpu_labels)
    assert (gpu.float().cpu() - cpu).abs().mean() < 0.05


def test_both_loaders_list_the_same_samples(root, tmp_path):
    """One discovery (pipelines/files.py) for DALI and the torch loader: the same files from a folder
    (nested subfolders, upper-case and non-JPEG suffixes, hidden files included) and a file list (shards
    have one reader for both: test_webdataset_through_the_shard_reader)."""
    from PIL import Image

    from mixedae_fast.pipelines.torch_loader import FileImageLoader

    folder = tmp_path / "tree"
    shutil.copytree(root / "val", folder)
    jpg = next(folder.rglob("*.jpg"))
    (folder / CLASSES[0] / "deeper").mkdir()
    shutil.copy(jpg, folder / CLASSES[0] / "deeper" / "x.JPG")
    Image.open(jpg).save(folder / CLASSES[1] / "y.png")
    shutil.copy(jpg, folder / CLASSES[1] / ".hidden.jpg")
    (folder / CLASSES[1] / "notes.txt").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"tree/{p} {label}\n" for p, label in folder_samples(root / "val")[:7]))

    for path, fmt in ((folder, "imagefolder"), (listing, "filelist")):
        dali_loader = DaliLoader(path, fmt, batch_size=2, img_size=16, drop_last=False)
        torch_loader = FileImageLoader(path, batch_size=2, img_size=16, fmt=fmt, drop_last=False, verify="off")
        torch_sources = [s for s, _ in torch_loader.dataset.samples]
        assert sorted(dali_loader.sources) == sorted(map(str, torch_sources)), fmt
    assert any(s.endswith("x.JPG") for s in DaliLoader(folder, batch_size=2, img_size=16).sources)
