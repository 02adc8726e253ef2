"""The loader contract every training loader keeps (``TensorBatchLoader``, ``FileImageLoader``,
``ShardLoader``, ``DaliLoader``), written down as a ``Protocol`` that the trainer and the benchmarks
rely on and ``tests/test_loader_contract.py`` checks each loader against.

    loader.set_epoch(epoch, start_step)   # the pass to give next, from batch start_step on (a resume)
    for images, labels in loader: ...     # len(loader) - start_step batches, then the pass ends
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchLoader(Protocol):
    """Batches of ``(images [B, 3, S, S], labels int64 [B])``, both on the training device; images
    normalised with ImageNet's mean and std, in the loader's dtype (fp32, bf16 or fp16). Labels are -1
    for unlabelled data (``data.labels=none``).

    ``len(loader)``: the batches of one pass (an epoch), the same on every shard, so that ranks step
    together. ``set_epoch(e, k)``: the next iteration gives pass ``e`` from its batch ``k`` on (``0 <=
    k <= len``); a pass's order and augmentation are a function of ``(seed, e)`` and the shard, so a
    resumed run reads from the same position. Optional beyond the protocol: ``state_dict()`` (what a
    checkpoint records), ``ready_event()`` (a CUDA event the step waits for, when the loader produces
    batches on a stream of its own), ``bad`` (files skipped as unreadable, with the reason)."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_step: int = 0) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
