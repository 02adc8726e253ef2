"""Every training loader keeps pipelines/contract.py's BatchLoader contract: the protocol's methods,
len passes of images [B, 3, S, S] and int64 labels, and set_epoch(e, k) that resumes a pass at batch k
with the same batches as the uninterrupted pass (for the loaders whose passes are a function of (seed, e))."""
import torch

from mixedae_fast.pipelines.contract import BatchLoader
from mixedae_fast.pipelines.torch_loader import FileImageLoader, TensorBatchLoader


def _loaders(folder):
    yield "tensor", TensorBatchLoader(torch.randint(0, 256, (24, 16, 16, 3), dtype=torch.uint8), torch.arange(24) % 3,
                                      batch_size=4, img_size=16,
                                      seed=1)
    yield "files", FileImageLoader(folder, batch_size=4, img_size=16, seed=1, verify="off")
    try:
        from mixedae_fast.pipelines.dali import DaliLoader, dali_available
    except ImportError:
        return
    if dali_available():
        yield "dali", DaliLoader(folder, batch_size=4, img_size=16, seed=1)


def test_every_loader_keeps_the_contract(image_folder):
    folder = image_folder(24, 8) / "train"
    names = []
    for name, loader in _loaders(folder):
        names.append(name)
        assert isinstance(loader, BatchLoader), name
        loader.set_epoch(2)
        full = list(loader)
        assert len(full) == len(loader) > 2, name
        for images, labels in full:
            assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32, name
            assert labels.shape == (4,) and labels.dtype == torch.int64, name
        loader.set_epoch(2, start_step=2)
        rest = list(loader)
        assert len(rest) == len(loader) - 2, name
        if name != "dali":  # DALI resumes at the position, not with the same samples (pipelines/dali.py)
            for (a, la), (b, lb) in zip(full[2:], rest, strict=True):
                assert torch.equal(a, b) and torch.equal(la, lb), name
    assert names[:2] == ["tensor", "files"]
