"""Test setup: Triton's interpreter on machines without CUDA (set before any kernel module imports),
the torchvision shim before timm, and the `gpu` marker skipped without CUDA."""
import os
import warnings
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mixedae_fast._compat import ensure_torchvision  # noqa: E402

ensure_torchvision()

HAS_CUDA = torch.cuda.is_available()


def pytest_runtest_logreport(report):
    """With ``MIXEDAE_FAILURE_LOG=FILE`` (benchmarks/device_check.sh sets it), each failure's report is
    appended to FILE the moment it arrives (with pytest-xdist: on the controller), so a run cut short still
    says what failed and why."""
    path = os.environ.get("MIXEDAE_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):   # once, on the controller
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"== FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n\n")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA: no GPU on this machine (CPU paths are tested separately)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The suite's one cache folder: ``MIXEDAE_CACHE`` points at a fresh folder (the data sets ``--num-train``
    writes, verification results), never at the user's cache, from the first test of a module that asks for
    it to the module's end. One folder per module, so a module-scoped run and the tests that resume or
    evaluate it find the same embedded data; a module puts every test under it with
    ``pytestmark = pytest.mark.usefixtures("cache")``, and a test that changes the variable itself does it
    with ``monkeypatch`` (restored after the test)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("MIXEDAE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """The suite's one image folder: ``image_folder(num_train, num_val, size=16)`` is the root of an ImageFolder
    tree of the embedded scenes, ``root/{train,val}/<class>/<index>.jpg`` (10 classes, seed 0), written once per
    session for each set of arguments and shared: read it, or copy it to damage it."""
    from mixedae_fast.pipelines.synthetic import write_image_folder

    made: dict[tuple, Path] = {}

    def make(num_train: int, num_val: int, size: int = 16) -> Path:
        key = (num_train, num_val, size)
        if key not in made:
            made[key] = write_image_folder(tmp_path_factory.mktemp("images") / "data", num_train, num_val,
                                           size=size, seed=0, progress=False)
        return made[key]

    return make


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache) -> Path:
    """``runs/cpu_tiny`` pretrained through the command line for 5 steps on 40 embedded images of the module's
    cache (checkpoints at steps 3 and 5, no final evaluation): the run the downstream commands' tests
    evaluate, fine-tune, export and visualize. One per module, so a module may add files to it."""
    from mixedae_fast.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    assert main(["pretrain", "--no-progress", "--num-train", "40", "--num-val", "20", *TINY_OVERRIDES,
                 "--optim.epochs=1", "--optim.warmup_epochs=1", "--run.log_every=2", "--run.ckpt_every=3",
                 "--run.eval=false", f"--run.out_dir={root}/runs"]) == 0
    return root / "runs" / "cpu_tiny"


# -- one tiny model for new tests -----------------------------------------------------------------
# 16 px images in patches of 4 (N = 16), embed 32, 2 blocks; r = 4 and n = 4 from cpu_tiny's mixing.
TINY_MODEL = ("--model.img_size=16", "--model.patch_size=4", "--model.embed_dim=32", "--model.depth=2",
              "--model.num_heads=2", "--model.decoder_embed_dim=16", "--model.decoder_depth=1",
              "--model.decoder_num_heads=2")
TINY_OVERRIDES = (*TINY_MODEL, "--data.batch_size=8")  # the model and a batch of 2 groups


class Tiny:
    """The suite's one tiny model. ``tiny.config(*overrides)``: cpu_tiny shrunk to ``TINY_OVERRIDES`` plus
    ``overrides`` (CLI form); ``tiny.model(*overrides, seed=0)``: the model of that config, initialised
    under ``seed``; ``tiny.build(**kw)``: the model from constructor keywords, for the model's own tests."""

    overrides = TINY_OVERRIDES

    @staticmethod
    def config(*overrides: str):
        from mixedae_fast.config import load_config

        return load_config("cpu_tiny", [*TINY_OVERRIDES, *overrides])

    @staticmethod
    def build(**kw):
        """``MixedAutoencoderViT`` from constructor keywords (the model's own checks, no config): 16 px in
        patches of 4 (N = 16), embed 32, 2 blocks of 4 heads, r = 2, n = 4 unless overridden."""
        from mixedae_fast.model.mixedae import MixedAutoencoderViT

        cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=32,
                   decoder_depth=1, decoder_num_heads=4, mlp_ratio=2.0, group_size=2, mask_ratio=0.75)
        cfg.update(kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return MixedAutoencoderViT(**cfg)

    @staticmethod
    def model(*overrides: str, seed: int = 0):
        from mixedae_fast.model.mixedae import build_model

        torch.manual_seed(seed)
        return build_model(Tiny.config(*overrides))


@pytest.fixture
def tiny() -> Tiny:
    return Tiny()


# -- one short training run in memory (the trainer's and the properties' tests) ----------------------
TRAINER_OVERRIDES = (*TINY_OVERRIDES, "--optim.epochs=3", "--optim.warmup_epochs=1", "--run.log_every=2",
                     "--run.ckpt_every=4")


def tiny_images(num=24, size=16, seed=0):
    """``num`` random uint8 HWC images and labels of 3 classes, drawn from ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num, size, size, 3), dtype=np.uint8), rng.integers(0, 3, num)


def tiny_trainer(out_dir, overrides=(), max_steps=None, images=None):
    """A ``Trainer`` of the tiny config (``TRAINER_OVERRIDES`` + ``overrides``) writing under ``out_dir``, on
    :func:`tiny_images` through the in-memory loader; the model initialised under seed 0."""
    from mixedae_fast.config import load_config
    from mixedae_fast.model.mixedae import build_model
    from mixedae_fast.pipelines.torch_loader import TensorBatchLoader
    from mixedae_fast.train.engine import Trainer

    cfg = load_config("cpu_tiny", [*TRAINER_OVERRIDES, f"--run.out_dir={out_dir}", *overrides])
    x, y = tiny_images() if images is None else images
    loader = TensorBatchLoader(x, y, cfg.data.batch_size, cfg.model.img_size, seed=cfg.run.seed)
    torch.manual_seed(0)
    return Trainer(cfg, build_model(cfg), loader, out_dir / cfg.run.name, torch.device("cpu"),
                   max_steps=max_steps, progress=False)
