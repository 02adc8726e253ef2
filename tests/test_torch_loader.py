"""FileImageLoader and its sources: ImageFolder / file list give the same samples (webdataset shards
stream through pipelines/shards.py, tested in test_shards.py), bad
files are skipped up front (and replaced if they go bad later), and batches are a pure function of
(seed, epoch, step): resumed, sharded or loaded by workers, they are bitwise the same."""
import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixedae_fast.pipelines import files
from mixedae_fast.pipelines.files import open_source, read_file_list, scan_image_folder, verify_images
from mixedae_fast.pipelines.synthetic import CLASSES
from mixedae_fast.pipelines.torch_loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochBatchSampler,
    FileImageLoader,
    random_resized_crop_params,
    resized_crop_tensor,
    sample_params,
)

pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture
def data(image_folder) -> Path:
    """root/train/<class>/*.jpg: 40 images of 40 px (4 per class), conftest's shared folder: read only."""
    return image_folder(40, 20, size=40) / "train"


@pytest.fixture
def copy(data, tmp_path) -> Path:
    """A private copy of the train folder, to damage."""
    return Path(shutil.copytree(data, tmp_path / "train"))


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# -- sources ------------------------------------------------------------------------------------------

def test_scan_matches_torchvision_imagefolder(data):
    from torchvision.datasets import ImageFolder

    paths, labels, classes = scan_image_folder(data)
    tv = ImageFolder(str(data))
    assert classes == list(CLASSES) == tv.classes
    assert list(zip(paths, labels)) == tv.samples
    assert Counter(labels) == Counter({c: 4 for c in range(10)})


def test_scan_ignores_hidden_and_other_files(copy):
    real = next((copy / "ring").iterdir())
    shutil.copy(real, copy / "ring" / ".hidden.jpg")
    shutil.copy(real, copy / "ring" / "UPPER.JPEG")
    (copy / "ring" / "notes.txt").write_text("not an image")
    (copy / ".cache").mkdir()
    shutil.copy(real, copy / ".cache" / "x.jpg")
    paths, labels, classes = scan_image_folder(copy)
    names = [Path(p).name for p in paths]
    assert classes == list(CLASSES) and len(paths) == 41
    assert "UPPER.JPEG" in names and ".hidden.jpg" not in names and "notes.txt" not in names


def write_sources(data: Path, tmp_path: Path):
    """A file list holding the same images as ``data``, in scan order."""
    paths, labels, _ = scan_image_folder(data)
    lines = ["# path label", ""] + [f"{Path(p).relative_to(data.parent)} {y}" for p, y in zip(paths, labels)]
    shutil.copytree(data, tmp_path / "train", dirs_exist_ok=True)
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "list.txt"


def test_two_sources_same_samples_and_batches(data, tmp_path):
    file_list = write_sources(data, tmp_path)
    folder, classes = open_source(data, "imagefolder")
    listed, _ = open_source(file_list, "filelist")
    assert classes == list(CLASSES)
    assert Counter(y for _, y in folder) == Counter(y for _, y in listed)
    for (p, y), (q, z) in zip(folder, listed):
        assert files.read_bytes(p) == files.read_bytes(q) and y == z
    # Same samples in the same order => bitwise the same batches.
    kw = dict(batch_size=8, img_size=32, seed=5)
    ref = batches(FileImageLoader(data, **kw))
    assert_same(ref, batches(FileImageLoader(file_list, fmt="filelist", **kw)))


def test_file_list_errors(tmp_path):
    (tmp_path / "a.txt").write_text("# header\nx.jpg 1\n\nnolabel.jpg\n")
    with pytest.raises(ValueError, match=r"a.txt:4: expected '<path> <integer label>'"):
        read_file_list(tmp_path / "a.txt")
    (tmp_path / "b.txt").write_text("x.jpg cat\n")
    with pytest.raises(ValueError, match=r"b.txt:1:"):
        read_file_list(tmp_path / "b.txt")
    (tmp_path / "c.txt").write_text("dir with space/x.jpg 3\n")
    assert read_file_list(tmp_path / "c.txt") == ([str(tmp_path / "dir with space/x.jpg")], [3])


def test_webdataset_is_not_a_file_list(data, tmp_path):
    """One tar reader (pipelines/shards.py): the file discovery refuses shards instead of reading them again."""
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        tar.add(next((data / "ring").iterdir()), arcname="a.jpg")
    with pytest.raises(ValueError, match=r"ShardLoader"):
        open_source(tmp_path / "s.tar", "webdataset")


# -- batches ------------------------------------------------------------------------------------------

def test_shapes_dtypes_and_normalisation(data):
    loader = FileImageLoader(data, 8, 32, dtype=torch.bfloat16)
    assert len(loader) == 5 and loader.classes == list(CLASSES) and loader.num_small == 0 and not loader.bad
    out = batches(loader)
    assert len(out) == 5
    for x, y in out:
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.bfloat16
        assert y.shape == (8,) and y.dtype == torch.int64
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    x = torch.cat([x for x, _ in out]).float()
    assert (x.amin((0, 2, 3)) >= lo - 0.02).all() and (x.amax((0, 2, 3)) <= hi + 0.02).all()
    assert sorted(torch.cat([y for _, y in out]).tolist()) == sorted(scan_image_folder(data)[1])


def test_resume_is_exact_and_epochs_differ(data):
    a = FileImageLoader(data, 8, 32, seed=3)
    full = batches(a)
    b = FileImageLoader(data, 8, 32, seed=3)
    b.set_epoch(0, start_step=3)
    assert b.state_dict() == {"epoch": 0, "start_step": 3, "seed": 3}
    assert_same(full[3:], batches(b))
    assert_same(full, batches(b))                 # start_step applies to one pass only
    a.set_epoch(1)
    assert not torch.equal(full[0][0], batches(a)[0][0])


def test_workers_give_the_same_batches(data):
    ref = batches(FileImageLoader(data, 8, 32, seed=1))
    loader = FileImageLoader(data, 8, 32, seed=1, num_workers=2)
    assert_same(ref, batches(loader))
    loader.set_epoch(0, start_step=2)             # persistent workers, a second pass
    assert_same(ref[2:], batches(loader))


@pytest.mark.parametrize("batch_size, num_batches", [(20, 2), (13, 3)])   # 40 images: 3 batches + 1 dropped
def test_workers_prepare_the_next_epoch_across_the_boundary(data, batch_size, num_batches):
    """When an epoch's last batch is handed out the workers already hold the next epoch's first batches
    (one DataLoader iterator runs on across epochs); ``set_epoch(e + 1)`` continues it, and every epoch,
    continued or resumed, is bitwise a fresh loader's."""
    def fresh(epoch, start_step=0):
        ref = FileImageLoader(data, batch_size, 32, seed=2)
        ref.set_epoch(epoch, start_step)
        return batches(ref)

    loader = FileImageLoader(data, batch_size, 32, seed=2, num_workers=1, prefetch_factor=2)
    assert len(loader) == num_batches
    for e in range(3):
        loader.set_epoch(e)
        got = []
        for step, (x, y) in enumerate(loader):
            got.append((x.clone(), y.clone()))
            if step == num_batches - 1:
                assert loader.stream.dealt >= (e + 1, 0), f"epoch {e + 1} not started at the end of epoch {e}"
        assert loader.streams_started == 1, "the stream was restarted at an epoch boundary"
        assert_same(got, fresh(e))
    loader.set_epoch(1, start_step=1)                # a resume starts a stream at the position
    assert_same(batches(loader), fresh(1, 1))
    assert_same(batches(loader), fresh(1))          # no set_epoch: the same epoch again
    assert loader.streams_started == 3


def test_eval_mode_is_the_centre_square_resized(data):
    loader = FileImageLoader(data, 8, 32, augment=False, shuffle=False)
    x, y = next(iter(loader))
    paths, labels, _ = scan_image_folder(data)
    ref = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR)) for p in paths[:8]])
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2).float() / 255
    ref = (ref - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ref)
    assert y.tolist() == labels[:8]


def test_shards_are_disjoint_equal_and_cover():
    n, shards = 40, 3
    samplers = [EpochBatchSampler(n, 4, seed=7, shard_id=k, num_shards=shards) for k in range(shards)]
    parts = [s.indices(2).tolist() for s in samplers]
    assert [len(p) for p in parts] == [13] * 3 and [len(s) for s in samplers] == [3] * 3
    union = set().union(*parts)
    assert len(union) == 39 and union <= set(range(n))
    full = EpochBatchSampler(n, 4, seed=7).indices(2).tolist()
    assert union == set(full[:39])                  # the remainder is dropped, not a random sample
    for s in samplers:
        s.set_epoch(2, start_step=1)
        assert [j for b in s for _, j in b] == s.indices(2).tolist()[4:12]


def test_sharded_loaders_split_the_epoch(data):
    seen = []
    for k in range(2):
        loader = FileImageLoader(data, 4, 32, seed=2, shard_id=k, num_shards=2)
        assert len(loader) == 5
        seen += [y for _, ys in loader for y in ys.tolist()]
    assert Counter(seen) == Counter(scan_image_folder(data)[1])


def test_crop_params_match_torchvision():
    from torchvision.transforms import RandomResizedCrop

    for seed, (h, w), scale in [(0, (40, 40), (0.2, 1.0)), (1, (375, 500), (0.08, 1.0)), (2, (10, 300), (0.9, 1.0)),
                                (3, (300, 12), (0.9, 1.0)), (4, (64, 48), (0.2, 1.0))]:
        torch.manual_seed(seed)
        expect = RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), [3 / 4, 4 / 3])
        got = random_resized_crop_params(h, w, scale, generator=torch.Generator().manual_seed(seed))
        assert got == tuple(expect)


def test_device_crop_matches_pil_crop(data):
    """The crop of the device-decode path (torch, any device) against the PIL path, same boxes."""
    loader = FileImageLoader(data, 8, 32, jpeg_draft=False)
    ds = loader.dataset
    for i in range(8):
        source = ds.samples[i][0]
        pil = ds.crop(files.read_bytes(source), 0, i).float() / 255
        img = torch.from_numpy(np.asarray(Image.open(source).convert("RGB")).copy()).permute(2, 0, 1)
        box, flip = sample_params(ds.seed, 0, i, img.shape[1], img.shape[2], True, ds.crop_scale)
        dev = resized_crop_tensor(img, box, flip, 32)
        assert (dev - pil).abs().mean() < 0.01, i     # PIL and torch bilinear differ at the edges (~0.002)


# -- bad input ----------------------------------------------------------------------------------------

def damage(folder: Path) -> dict[str, str]:
    real = sorted((folder / "disc").iterdir())[0].read_bytes()
    (folder / "disc" / "empty.jpg").write_bytes(b"")
    (folder / "disc" / "text.jpg").write_text("this is not a JPEG\n")
    (folder / "disc" / "truncated.jpg").write_bytes(real[:len(real) // 2])
    return {"empty.jpg": "empty", "text.jpg": "not an image", "truncated.jpg": "truncated"}


def test_bad_files_are_skipped_listed_and_counted(copy):
    expect = damage(copy)
    with pytest.warns(UserWarning, match="skipping 3 of 43 images"):
        loader = FileImageLoader(copy, 8, 32)
    assert {Path(p).name: why for p, why in loader.bad}.keys() == expect.keys()
    for p, why in loader.bad:
        assert expect[Path(p).name] in why, (p, why)
    assert len(loader.dataset) == 40 and len(batches(loader)) == 5
    assert loader.report()["bad"] == [list(b) for b in loader.bad]
    paths = scan_image_folder(copy)[0]
    with pytest.warns(UserWarning, match="skipping 3"):
        good, bad = verify_images(paths, num_workers=2)
    assert len(good) == 40 and sorted(bad) == sorted(loader.bad)


def test_file_going_bad_later_is_replaced_and_counted(copy):
    loader = FileImageLoader(copy, 8, 32)
    victim = loader.dataset.samples[5][0]
    Path(victim).write_bytes(b"gone bad")
    with pytest.warns(UserWarning, match="failed to load after verification"):
        out = batches(loader)
    assert len(out) == 5 and loader.substituted == 1 and loader.failed == {victim: 1}
    assert_same(out, batches(loader))            # the replacement is deterministic too
    assert loader.substituted == 2


def test_small_images_are_counted(data):
    with pytest.warns(UserWarning, match="40 images smaller than 48 px were upscaled"):
        loader = FileImageLoader(data, 8, 48)
    assert loader.num_small == 40 and next(iter(loader))[0].shape == (8, 3, 48, 48)


def test_errors_name_the_problem(tmp_path, copy):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*mixedae-fast make-data"):
        FileImageLoader(tmp_path / "nowhere", 8, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        FileImageLoader(tmp_path / "empty", 8, 32)
    (tmp_path / "empty" / "cat").mkdir()
    (tmp_path / "empty" / "cat" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        FileImageLoader(tmp_path / "empty", 8, 32)
    for p in copy.rglob("*.jpg"):
        p.write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 40 images .* can be decoded"):
        FileImageLoader(copy, 8, 32)
    with pytest.raises(ValueError, match="data.format must be one of"):
        open_source(tmp_path, "lmdb")


def test_verification_is_cached(copy, monkeypatch):
    damage(copy)
    paths = scan_image_folder(copy)[0]
    with pytest.warns(UserWarning):
        first = verify_images(paths)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("Image.open called on a cache hit")

    monkeypatch.setattr(Image, "open", spy)
    with pytest.warns(UserWarning):
        assert verify_images(paths) == first
    assert calls == []
    Path(paths[0]).write_bytes(b"changed")        # size and mtime change: checked again
    with pytest.warns(UserWarning, match="skipping 4"):
        good, bad = verify_images(paths)
    assert len(calls) == 1 and paths[0] in [p for p, _ in bad]


# -- GPU ----------------------------------------------------------------------------------------------

def test_device_decode_path_on_cpu_with_a_stand_in_decoder(copy, monkeypatch):
    """The ``gpu_decode`` plumbing (bytes from workers, per-image boxes, PIL fallback for what the decoder
    refuses, substitution) on the CPU, with PIL standing in for nvJPEG."""
    from mixedae_fast.pipelines import torch_loader

    def pil_decode(blobs, device):
        out = []
        for b in blobs:
            try:
                im = Image.open(io.BytesIO(b.numpy().tobytes()))
                assert im.format == "JPEG"          # refuse PNGs, as nvJPEG does
                out.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).to(device))
            except Exception:
                out.append(None)
        return out

    Image.open(next((copy / "ring").iterdir())).save(copy / "ring" / "z.png")
    monkeypatch.setattr(torch_loader, "decode_images", pil_decode)
    kw = dict(batch_size=8, img_size=32, seed=4, jpeg_draft=False, drop_last=False)   # all 41 samples
    ref = batches(FileImageLoader(copy, **kw))
    loader = FileImageLoader(copy, num_workers=2, **kw)
    loader.gpu_decode = loader.dataset.raw = True      # what gpu_decode=True sets, minus the CUDA check
    out = batches(loader)
    for (xa, ya), (xb, yb) in zip(out, ref):
        assert torch.equal(ya, yb) and (xa - xb).abs().mean() < 0.05
    assert len(out) == 6 and any(s.endswith(".png") for s, _ in loader.dataset.samples)
    victim = loader.dataset.samples[7][0]
    Path(victim).write_bytes(b"gone bad")         # refused by the decoder and by PIL: replaced
    with pytest.warns(UserWarning, match="failed to load after verification"):
        assert len(batches(loader)) == 6
    assert loader.failed == {victim: 1} and loader.substituted == 1


@pytest.mark.gpu
def test_gpu_decode_matches_cpu_decode(copy):
    """nvJPEG decode + device crop: bitwise repeatable, close to the PIL path; PNGs and files that go bad
    later take the PIL fallback."""
    png = copy / "ring" / "z.png"
    Image.open(next((copy / "ring").iterdir())).save(png)
    kw = dict(batch_size=8, img_size=32, device="cuda", dtype=torch.bfloat16, seed=4)
    gpu = FileImageLoader(copy, gpu_decode=True, num_workers=2, **kw)
    cpu = FileImageLoader(copy, jpeg_draft=False, **kw)
    a, b = batches(gpu), batches(cpu)
    assert_same(a, batches(gpu))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == (8, 3, 32, 32) and xa.dtype == torch.bfloat16 and xa.is_cuda
        assert torch.equal(ya, yb)
        assert (xa.float() - xb.float()).abs().mean() < 0.1        # nvJPEG vs libjpeg, torch vs PIL resize
    Path(gpu.dataset.samples[3][0]).write_bytes(b"gone bad")
    with pytest.warns(UserWarning, match="failed to load after verification"):
        assert len(batches(gpu)) == len(a)
    assert gpu.substituted == 1
