"""An error inside a DataLoader worker (``data.num_workers > 0``) ends as the one ``error:`` line, with the
exit code, that the same error gives in the main process (``num_workers=0``): the sample, the reason and
the fix, no worker traceback (``--debug`` shows it). The workers are forked, so what a test patches here
holds in them too."""
import multiprocessing
import shutil
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES

from mixedae_fast.cli import main
from mixedae_fast.errors import error_line
from mixedae_fast.pipelines import torch_loader
from mixedae_fast.pipelines.torch_loader import FileImageLoader

pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture
def data(image_folder, tmp_path) -> Path:
    """A private copy of 10 + 10 images of 16 px, to damage."""
    return Path(shutil.copytree(image_folder(10, 10), tmp_path / "data"))


def _unreadable(monkeypatch, train: Path):
    """Every file fails to read in the loader, after verification (which reads through files.read_bytes)."""
    def denied(source):
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(torch_loader, "read_bytes", denied)


def _overwritten(monkeypatch, train: Path):
    for p in train.rglob("*.jpg"):
        p.write_bytes(b"not a jpeg any more")


def _crop_bug(monkeypatch, train: Path):
    def broken(self, data, epoch, index):
        raise TypeError("crop() got an unexpected keyword argument 'box'")

    monkeypatch.setattr(torch_loader.ImageFileDataset, "crop", broken)


def _crop_refuses(monkeypatch, train: Path):
    def refuses(*args, **kwargs):
        raise ValueError("crop_scale = (0.9, 0.2): must be increasing")

    monkeypatch.setattr(torch_loader, "sample_params", refuses)


def _crop_os_error(monkeypatch, train: Path):
    def full(self, data, epoch, index):
        raise OSError(28, "No space left on device", "/tmp/scratch/crop.bin")

    monkeypatch.setattr(torch_loader.ImageFileDataset, "crop", full)


def _posterize_zero(image, epoch, index):
    raise ValueError("bits must be between or equal to 1 and 8")


def _augmentation_bug(monkeypatch, train: Path):
    return _posterize_zero


CASES = {"unreadable": _unreadable, "overwritten": _overwritten, "crop-bug": _crop_bug,
         "crop-refuses": _crop_refuses, "crop-os-error": _crop_os_error, "augmentation-bug": _augmentation_bug}


@pytest.mark.parametrize("case", CASES)
def test_a_worker_error_is_the_in_process_error(case, image_folder, tmp_path, monkeypatch):
    lines = {}
    for workers in (0, 2):
        train = Path(shutil.copytree(image_folder(10, 10) / "train", tmp_path / f"train{workers}"))
        loader = FileImageLoader(train, batch_size=4, img_size=16, num_workers=workers)
        loader.dataset.pil_transform = CASES[case](monkeypatch, train)     # broken after verification
        with pytest.raises(Exception) as caught:
            next(iter(loader))
        lines[workers] = (type(caught.value), *error_line(caught.value, debug=False))
        monkeypatch.undo()
    kind, code, line = lines[0]
    assert lines[2] == (kind, code, line.replace("train0", "train2")), lines
    line = lines[2][2]
    assert "\n" not in line and "Caught" not in line and "Traceback" not in line, line


def test_files_that_fail_after_verification_name_the_file_the_reason_and_the_fix(data, monkeypatch):
    _unreadable(monkeypatch, data)
    loader = FileImageLoader(data / "train", batch_size=4, img_size=16, num_workers=2)
    with pytest.raises(Exception) as caught:
        next(iter(loader))
    code, line = error_line(caught.value, debug=False)
    assert code == 1 and "unexpected" not in line, line
    assert "/train/" in line and ".jpg" in line and "Permission denied" in line, line     # the file, the reason
    assert "after verification" in line and "restore" in line, line                        # what happened, the fix
    assert not multiprocessing.active_children()   # the workers were stopped, not left to the garbage collector


TINY = [*TINY_OVERRIDES, "--optim.epochs=1", "--optim.warmup_epochs=0", "--run.eval=false", "--data.backend=torch"]


@pytest.mark.parametrize("debug", [False, True])
def test_the_command_line_prints_one_error_line_for_a_worker_error(data, tmp_path, monkeypatch, capsys, debug):
    _unreadable(monkeypatch, data)
    results = {}
    for workers in (0, 2):
        code = main(["pretrain", "--no-progress", *TINY, f"--data.path={data / 'train'}",
                     f"--data.val_path={data / 'val'}", f"--data.num_workers={workers}",
                     f"--run.out_dir={tmp_path / f'runs{workers}'}", *(["--debug"] if debug else [])])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
        results[workers] = (code, errors[0])
        if workers and debug:
            assert "in DataLoader worker process" in err and "Original Traceback" in err, err  # the worker's
        elif not debug:
            assert "Traceback" not in err and "Caught" not in err, err
    assert results[2] == results[0] and results[0][0] == 1, results


class _TwoArguments(Exception):
    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


def _through_torch(exc: BaseException) -> BaseException:
    """``exc`` as torch re-raises it from a worker."""
    from torch.utils.data._utils import ExceptionWrapper

    try:
        try:
            raise KeyError("inner cause")
        except KeyError as inner:
            raise exc from inner
    except BaseException:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 1")
    try:
        wrapper.reraise()
    except BaseException as e:
        return e


@pytest.mark.parametrize("exc, kind, text", [
    (ValueError("two\nlines"), ValueError, "two\nlines"),
    (FileNotFoundError(2, "No such file or directory", "/a/b c.jpg"), FileNotFoundError,
     "[Errno 2] No such file or directory: '/a/b c.jpg'"),
    (OSError(18, "Invalid cross-device link", "/a", None, "/b"), OSError,
     "[Errno 18] Invalid cross-device link: '/a' -> '/b'"),
    (_TwoArguments("sample 3", "bad"), RuntimeError, "_TwoArguments: sample 3: bad"),
    (TypeError(), TypeError, ""),
])
def test_worker_error_takes_the_exception_out_of_torch_s_wrapper(exc, kind, text):
    from mixedae_fast.errors import worker_error

    wrapped = _through_torch(exc)
    assert "Original Traceback" in str(wrapped)
    original = worker_error(wrapped)
    assert type(original) is kind and str(original) == text
    if isinstance(exc, FileNotFoundError):
        assert (original.errno, original.strerror, original.filename) == (2, "No such file or directory", "/a/b c.jpg")
    assert worker_error(exc) is None and worker_error(original) is None      # not from a worker: left alone
