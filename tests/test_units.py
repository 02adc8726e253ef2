"""Units the trainer relies on, each on its own: which loader ``data.build_loaders`` picks and what it
hands over (``auto`` on a CPU, DALI's verification of the files, the evaluation bank's limit);
``checkpoint.save_checkpoint``'s keep-last rotation; and what the ranks agree on in ``distributed``
(stop-signal priority, ``mean_over_ranks``, ``check_same``, ``rank_device``), with one process and
with a real 2-process gloo group."""
import json
import socket
import warnings

import pytest
import torch

from mixedae_fast.config import ConfigError
from mixedae_fast.pipelines.torch_loader import FileImageLoader
from mixedae_fast.train import data
from mixedae_fast.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mixedae_fast.train.distributed import Dist, DistEnv, rank_device

# -- data.build_loaders ---------------------------------------------------------------------------

@pytest.fixture
def folder(image_folder):
    """root/{train,val}/<class>/<i>.jpg: 30 train, 10 val images of 16 px, 10 classes (conftest's, shared)."""
    return image_folder(30, 10)


def _cfg(tiny, root, *overrides):
    return tiny.config(f"--data.path={root / 'train'}", f"--data.val_path={root / 'val'}", *overrides)


def _count(loader):
    return sum(len(labels) for _, labels in loader)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks DALI on a CUDA device")
def test_auto_backend_on_cpu_is_the_torch_loader(tiny, folder, cache):
    loaders = data.build_loaders(_cfg(tiny, folder, "--data.backend=auto"), torch.device("cpu"), torch.float32,
                                 progress=False)
    assert loaders.backend == "torch"
    assert all(isinstance(x, FileImageLoader) for x in (loaders.train, loaders.bank, loaders.val))
    assert len(loaders.train) == 30 // 8                                     # full batches of 8 only
    assert _count(loaders.val) == 10 and _count(loaders.bank) == 30         # unaugmented, every image


def test_the_embedded_backend_and_its_old_name_draw_the_same_batches(tiny):
    """``data.backend: embedded`` and ``synthetic`` (its old name, in stored configs) are the one in-memory
    set; its size defaults to the one pair of constants."""
    from mixedae_fast.choices import EMBEDDED_NUM_TRAIN, EMBEDDED_NUM_VAL
    from mixedae_fast.pipelines.synthetic import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL

    assert (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL) == (EMBEDDED_NUM_TRAIN, EMBEDDED_NUM_VAL)
    got = [data.build_loaders(tiny.config(f"--data.backend={name}"), torch.device("cpu"), torch.float32, 16, 8,
                              progress=False) for name in ("embedded", "synthetic")]
    assert [_count(x.val) for x in got] == [8, 8]
    for (xa, ya), (xb, yb) in zip(got[0].train, got[1].train, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_evaluation_bank_is_limited_and_keeps_every_class(tiny, folder, cache, monkeypatch, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    monkeypatch.setattr(data, "EVAL_BANK", 10)
    loaders = data.build_loaders(_cfg(tiny, folder, f"--data.backend={backend}"), torch.device("cpu"),
                                 torch.float32, progress=False)
    labels = torch.cat([y for _, y in loaders.bank])
    assert len(labels) == 10 and sorted(labels.tolist()) == list(range(10))   # 3 of each class, spread
    assert _count(loaders.val) == 10


def test_dali_gets_only_the_files_that_verify(tiny, folder, cache, tmp_path):
    """A text file named .jpg would stop a DALI pipeline: build_loaders verifies the folder first,
    reports the file as skipped and hands DALI the rest."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    import shutil

    root = tmp_path / "data"
    shutil.copytree(folder, root)
    bad = root / "train" / sorted(p.name for p in (root / "train").iterdir())[0] / "broken.jpg"
    bad.write_text("not a picture")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                      # the verifier warns, as it should
        loaders = data.build_loaders(_cfg(tiny, root, "--data.backend=dali"), torch.device("cpu"), torch.float32,
                                     progress=False)
    assert loaders.backend == "dali"
    assert [str(f) for f, _ in loaders.skipped] == [str(bad)]
    assert _count(loaders.train) == (30 // 8) * 8                            # the pipeline runs through
    assert _count(loaders.bank) == 30


# -- checkpoint.save_checkpoint -------------------------------------------------------------------

def test_save_checkpoint_keeps_the_newest_and_only_its_own_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".ckpt-00000009.pt.tmp-1").write_bytes(b"x")            # an interrupted write, not a checkpoint
    for step in (3, 1, 12, 7):                                           # out of order: rotation is by step
        path = save_checkpoint({"step": step, "w": torch.full((2,), float(step))}, tmp_path, step, keep_last=2)
        assert path.name == f"ckpt-{step:08d}.pt" and load_checkpoint(path)["step"] == step
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000007.pt", "ckpt-00000012.pt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert torch.equal(load_checkpoint(tmp_path / "ckpt-00000012.pt")["w"], torch.full((2,), 12.0))
    save_checkpoint({"step": 13}, tmp_path, 13, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000013.pt"]


# -- distributed: one process ---------------------------------------------------------------------

def test_one_process_dist_is_the_identity():
    d = Dist(DistEnv(), torch.device("cpu"))
    parts = ({"loss": torch.tensor(2.5)}, {"recognition": torch.tensor(0.25)})
    assert d.mean_over_ranks(*parts) == parts
    assert d.agree_stop("SIGTERM") == "SIGTERM" and d.agree_stop(None) is None   # no vote, no delay
    d.check_same(3, "step")                                             # nothing to disagree with


def test_rank_device():
    assert rank_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(ConfigError, match="runtime.device = 'mps' with several ranks"):
        rank_device("mps", 0)
    if torch.cuda.is_available():
        assert rank_device("auto", 0) == torch.device("cuda", 0)
        with pytest.raises(RuntimeError, match="start at most one rank per GPU"):
            rank_device("cuda", torch.cuda.device_count())
    else:
        assert rank_device("auto", 1) == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            rank_device("cuda", 0)


# -- distributed: two gloo ranks ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes importing torch: ~10 s on 2 cores
def test_two_ranks_agree_on_stop_signal_metrics_and_checks(tmp_path):
    """Votes come back one call late, the same on both ranks; SIGTERM outranks SIGUSR1, which
    outranks SIGINT; metrics are averaged; ``check_same`` fails on every rank when values differ."""
    import torch.multiprocessing as mp
    from _two_ranks import run_rank

    mp.start_processes(run_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] == seen[1]
    result = seen[0]
    #        (rank 0, rank 1) posted: (SIGINT, SIGTERM), -, (SIGUSR1, SIGINT), -, (None, SIGINT), -
    assert result["stops"] == [None, "SIGTERM", None, "SIGUSR1", None, "SIGINT"]
    assert result["means"] == [1.0, 10.5]
    assert result["same_ok"] is True
    assert result["differ"] == "ranks disagree on step: from 4 to 5"
