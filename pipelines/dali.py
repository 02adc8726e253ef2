"""NVIDIA DALI loaders with the contract of ``torch_loader`` (images ``[B, 3, S, S]`` normalised on the
training device, int64 labels ``[B]``), decoding and augmenting on the GPU (``device="cuda:N"``) or CPU.

Layers, top to bottom: the augmentation graphs (``train_graph``, ``eval_graph``) are plain functions
of DataNodes; the two pipelines (``file_pipeline``: an explicit list of files, ``external_pipeline``:
encoded images handed in by Python) add a source and take batch size, threads, device and seed at call
time, as ``@pipeline_def`` functions do; ``DaliLoader`` iterates the first, ``DaliShardLoader`` feeds the
second. Which files: ``pipelines/files.py`` finds them (``open_source``) for this loader and the torch
loader alike, so both read the same samples from the same ``data.path``. Webdataset shards have one
reader, ``pipelines/shards.py``'s: ``DaliShardLoader`` takes its batches of encoded images (the same
specs, skipped samples and bad-rate limit as the torch loader) and DALI decodes and augments them.

    loader = DaliLoader("data/train", batch_size=256, img_size=224, device="cuda:0", dtype=torch.bfloat16)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_step)      # start_step only on the epoch a run resumes in
        for images, labels in loader: ...

What is exact. One pipeline serves consecutive epochs: building and starting one with GPU decoding took
about 2 s on an H200, too much to pay every epoch. Its reader runs on into the next epoch, so while the
step consumes an epoch's last batch DALI is already decoding the next epoch's first ones (``prefetch``
batches ahead): no stall at an epoch boundary, as long as the caller names the next epoch
(``set_epoch(e+1)``); iterating again without it repeats epoch ``e`` and rebuilds. It is (re)built,
seeded with ``hash((seed, e0))`` (the same on every shard, so the shards stay a partition), for the
first epoch iterated, and again whenever ``set_epoch`` does not name the epoch that follows a finished
one (a resume, a jump, an epoch left unfinished). Exact are: the epoch boundary (each epoch is one pass
over the shard: the reader pads its shard, so an epoch never runs into the next; with ``drop_last`` the
tail of the pass is decoded and dropped) and the number of batches, ``len``, the same on every shard.
Epoch ``e``'s order and augmentation are a function of ``(seed, e0, e - e0, data, shard_id, num_shards,
batch_size)`` and the DALI version: bitwise on the CPU whatever ``num_threads`` (tested), and bitwise
with GPU decoding in our H200 check (which DALI does not promise). So ``set_epoch(e, start_step=k)``
rebuilds at ``e0 = e`` and consumes (decodes and drops) ``k`` batches: a resumed run continues at the
same data position and for the same number of batches, but not with the same samples or augmentation as
the interrupted run (unless that run had started at ``e``). This is not ``TensorBatchLoader``'s stream
either: DALI draws its own numbers, and ``random_shuffle`` is no uniform permutation: the reader
shuffles the file list once with a fixed seed (which splits it into shards) and mixes each epoch through
a buffer of 1024 samples.

Corrupt files. DALI cannot skip a sample: a file that does not decode (text named ``.jpg``, a JPEG
cut short by more than its end marker; the same files PIL rejects) or an empty file stops the
pipeline with a RuntimeError (``Failed to decode sample #i : path`` for a cut JPEG, only
``nvImageCodec failure`` for a non-image). ``DaliLoader`` re-raises it with the remedy: verify the
files once (the torch loader does) and pass the good ones as ``files=[...], labels=[...]``.

bf16: DALI 2.4 has no bfloat16 type (``types.DALIDataType`` lists none), so for bf16 the graph
emits fp32 and torch casts it: one correctly rounded cast, the same numbers as
``torch_loader.normalize(x).to(torch.bfloat16)``. fp16 is emitted by DALI directly.
"""
from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from mixedae_fast.errors import RunFailure
from mixedae_fast.pipelines.files import open_source
from mixedae_fast.pipelines.shards import ShardLoader
from mixedae_fast.pipelines.torch_loader import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("imagefolder", "filelist")   # webdataset shards: DaliShardLoader
INSTALL_HINT = "pip install 'mixedae_fast[dali-cu13]' (CUDA 13) or 'mixedae_fast[dali-cu12]' (CUDA 12)"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _dali():
    """The ``nvidia.dali`` module, or an ImportError that says how to install it."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except (ImportError, OSError) as e:
        raise ImportError(f"the DALI loader needs NVIDIA DALI: {INSTALL_HINT} ({e})") from e
    return dali


def _dali_dtype(dtype: torch.dtype):
    types = _dali().types
    if dtype == torch.float16:
        return types.FLOAT16
    if dtype in (torch.float32, torch.bfloat16):     # no BFLOAT16 in DALI 2.4: fp32, cast in torch
        return types.FLOAT
    raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


def _decoder_args(decode_device: str) -> dict:
    # "mixed": the A100/H100 hardware JPEG decoder takes 75% of each batch, CUDA the rest (BENCHMARKS.md).
    return {"hw_decoder_load": 0.75} if decode_device == "mixed" else {}


def _op_device(decode_device: str) -> str:
    return "gpu" if decode_device == "mixed" else "cpu"


# ---------------------------------------------------------------------------------------------------
# Augmentation graphs: encoded images (DataNode) -> normalised [3, S, S] images (DataNode)

def train_graph(jpegs, *, decode_device: str = "cpu", img_size: int = 224, crop_scale=(0.2, 1.0),
                mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype: torch.dtype = torch.float32):
    """RandomResizedCrop(crop_scale, ratio 3/4-4/3) fused into the decoder (only the crop is decoded),
    resize to ``img_size``², horizontal flip with probability 1/2, normalise, CHW."""
    dali = _dali()
    fn, types = dali.fn, dali.types
    images = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                           random_area=list(crop_scale), random_aspect_ratio=[3 / 4, 4 / 3],
                                           num_attempts=10, **_decoder_args(decode_device))
    images = fn.resize(images, device=_op_device(decode_device), resize_x=img_size, resize_y=img_size)
    return fn.crop_mirror_normalize(images, device=_op_device(decode_device), mirror=fn.random.coin_flip(),
                                    mean=[255 * m for m in mean], std=[255 * s for s in std],
                                    output_layout="CHW", dtype=_dali_dtype(dtype))


def eval_graph(jpegs, *, decode_device: str = "cpu", img_size: int = 224, crop_pct: float = 1.0,
               mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype: torch.dtype = torch.float32):
    """Resize the shorter side to ``floor(img_size / crop_pct)``, center-crop ``img_size``², normalise,
    CHW; no randomness. ``crop_pct=1.0`` keeps the whole of a square image (as the torch loader's eval
    does); 0.875 is the classic ImageNet evaluation."""
    dali = _dali()
    fn, types = dali.fn, dali.types
    images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **_decoder_args(decode_device))
    images = fn.resize(images, device=_op_device(decode_device), resize_shorter=math.floor(img_size / crop_pct))
    return fn.crop_mirror_normalize(images, device=_op_device(decode_device), crop=(img_size, img_size),
                                    crop_pos_x=0.5, crop_pos_y=0.5,
                                    mean=[255 * m for m in mean], std=[255 * s for s in std],
                                    output_layout="CHW", dtype=_dali_dtype(dtype))


# ---------------------------------------------------------------------------------------------------
# Pipelines: a reader + a graph. Each takes pipeline arguments (batch_size, num_threads, device_id,
# seed, prefetch_queue_depth) at call time, like any @pipeline_def function, and returns a Pipeline.

def _pipeline_def(fn):
    """``nvidia.dali.pipeline_def``, applied at call time so that this module imports without DALI."""
    @functools.wraps(fn)
    def make(*args, **kwargs):
        return _dali().pipeline_def(fn, enable_conditionals=False)(*args, **kwargs)
    return make


def _reader_args(shard_id: int, num_shards: int, shuffle: bool, pad_last_batch: bool, reader_seed: int) -> dict:
    return {"name": "Reader", "shard_id": shard_id, "num_shards": num_shards, "random_shuffle": shuffle,
            "pad_last_batch": pad_last_batch, "stick_to_shard": True, "seed": reader_seed}


def _outputs(images, labels):
    return images, (labels.gpu() if images.device == "gpu" else labels)


@_pipeline_def
def file_pipeline(root, graph, files, labels, shard_id=0, num_shards=1, shuffle=True, pad_last_batch=False,
                  reader_seed=0):
    """Exactly ``files`` (paths relative to ``root``, or absolute) with their ``labels``: the list
    ``pipelines/files.py`` found (the one discovery both loaders read), so DALI and the torch loader
    read the same files from the same folder or file list."""
    fn = _dali().fn
    reader = _reader_args(shard_id, num_shards, shuffle, pad_last_batch, reader_seed)
    jpegs, labels = fn.readers.file(files=[str(Path(root, f)) for f in files], labels=list(labels), **reader)
    return _outputs(graph(jpegs), labels)


@_pipeline_def
def external_pipeline(graph):
    """Encoded images fed each batch with ``pipe.feed_input("jpegs", [uint8 arrays])`` (batches may be
    smaller than ``batch_size``): ``DaliShardLoader`` feeds it from the webdataset reader."""
    dali = _dali()
    return graph(dali.fn.external_source(name="jpegs", dtype=dali.types.UINT8, ndim=1))


class DaliLoader:
    """Batches ``(images [B, 3, S, S] in dtype on device, labels int64 [B] on device)`` from a DALI
    pipeline; the contract and API of ``torch_loader.TensorBatchLoader`` (see the module docstring for
    what is exact on resume).

    ``fmt``: ``imagefolder`` (``path`` = folder of class folders) or ``filelist`` (``path`` = text file
    of ``relative/path label`` lines); webdataset shards: :class:`DaliShardLoader`. ``files``/``labels``:
    read exactly these files (relative to ``path`` or absolute) — a list verified up front, so that a
    corrupt file cannot stop the pipeline. ``device``: ``"cpu"`` decodes on the CPU; ``"cuda:N"`` decodes with nvJPEG
    (``"mixed"``) and augments on GPU N. ``drop_last``: every shard yields ``(n // num_shards) //
    batch_size`` full batches (equal on all ranks); else every sample once, the last batch partial.
    """

    def __init__(self, path, fmt: str = "imagefolder", *, batch_size: int, img_size: int, device="cpu",
                 dtype: torch.dtype = torch.float32, augment: bool = True, crop_scale=(0.2, 1.0), seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, shard_id: int = 0, num_shards: int = 1,
                 num_threads: int = 2, prefetch: int = 2, files: Sequence | None = None,
                 labels: Sequence[int] | None = None):
        self._plugin = _plugin()
        if fmt == "webdataset":
            raise ValueError("DaliLoader reads folders and file lists; webdataset shards: DaliShardLoader")
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, num_shards={num_shards}), got {shard_id}")
        self.device, self.dtype = torch.device(device), dtype
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        self.path, self.fmt = Path(path).expanduser(), fmt
        self.batch_size, self.img_size, self.augment, self.crop_scale = batch_size, img_size, augment, crop_scale
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.shard_id, self.num_shards, self.num_threads, self.prefetch = shard_id, num_shards, num_threads, prefetch
        self._source = self._resolve_source(files, labels)
        self.epoch, self.start_step = 0, 0
        self._open(0)
        self.num_samples = self._pipe.reader_meta("Reader")["epoch_size"]
        # The iterator runs PARTIAL over a padded shard: ceil(padded shard / B) batches, the same on every
        # shard; drop_last keeps the full batches that every shard has.
        full = (self.num_samples // num_shards) // batch_size
        self._len = full if drop_last else len(self._it)
        if self._len == 0:
            raise ValueError(f"{self.num_samples} images in {num_shards} shard(s) are fewer than one batch "
                             f"of {batch_size}; lower data.batch_size, use fewer ranks, or add images")

    def _resolve_source(self, files, labels):
        """The reader and its arguments. Files come from ``pipelines/files.py`` (``open_source``: the same
        discovery the torch loader uses) unless ``files=`` names them."""
        if files is not None:
            if labels is None or len(labels) != len(files) or not files:
                raise ValueError("files= needs a non-empty list and labels= of the same length")
        else:
            samples, _ = open_source(self.path, self.fmt)
            files, labels = [s for s, _ in samples], [lab for _, lab in samples]
        self.sources = [str(Path(self.path, f)) for f in files]
        return file_pipeline, {"root": self.path, "files": [str(f) for f in files], "labels": [int(x) for x in labels]}

    def _open(self, epoch: int) -> None:
        """Build the pipeline seeded for ``epoch`` and its iterator (which starts decoding)."""
        self._pipe = self._it = self._next_epoch = None     # free the old one first (GPU memory)
        graph, device_id = _graph_for(self.device, self.img_size, self.dtype, self.augment, self.crop_scale)
        seed = hash((self.seed, epoch)) & 0x7FFF_FFFF     # one seed for all shards: they stay a partition
        pipeline, source = self._source
        pipe = pipeline(**source, graph=graph, shard_id=self.shard_id, num_shards=self.num_shards,
                        shuffle=self.shuffle, pad_last_batch=True, reader_seed=seed,
                        batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id, seed=seed,
                        prefetch_queue_depth=self.prefetch)
        try:
            pipe.build()
        except RuntimeError as e:
            raise RunFailure(f"DALI could not open the data at {self.path}: {_first_error(e)}; check data.path "
                             "and data.format, or read it with data.backend=torch") from e
        try:
            self._it = self._plugin.DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader",
                                                        last_batch_policy=self._plugin.LastBatchPolicy.PARTIAL,
                                                        auto_reset=True)
        except RuntimeError as e:
            raise self._read_error(e) from e
        self._pipe, self._next_epoch = pipe, epoch

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step must be in [0, {len(self)}], got {start_step}")
        self.epoch, self.start_step = epoch, start_step

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.start_step, "seed": self.seed}

    def __iter__(self):
        if self._next_epoch != self.epoch:
            self._open(self.epoch)
        self._next_epoch = None          # mid-epoch until the pass is finished
        try:
            for step, (batch,) in enumerate(self._it):
                if self.start_step <= step < len(self):
                    yield batch["images"].to(self.dtype), batch["labels"].reshape(-1).to(torch.int64)
        except RuntimeError as e:
            self._pipe = self._it = None
            raise self._read_error(e) from e
        self._next_epoch, self.start_step = self.epoch + 1, 0

    def ready_event(self):
        """A CUDA event recorded now on the stream DALI produces its outputs on, for the step's stream to
        wait for (the benchmark's data phase does): the batch just handed out is done when it fires. An
        upper bound: later batches DALI has already enqueued there are waited for too. None on the CPU."""
        if self.device.type != "cuda" or self._pipe is None:
            return None
        handle = self._pipe.output_stream()
        stream = torch.cuda.ExternalStream(int(getattr(handle, "handle", handle)), device=self.device)
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _read_error(self, e: Exception) -> RuntimeError:
        return RuntimeError(
            f"DALI stopped reading {self.path} (epoch {self.epoch}): {_first_error(e)}. A corrupt or non-image "
            "file stops a DALI pipeline (it cannot skip samples): verify the files once and pass the good ones "
            "as DaliLoader(..., files=[...], labels=[...])")


class DaliShardLoader:
    """Webdataset shards read by ``pipelines/shards.py`` (the one tar reader: the same specs, order,
    skipped samples, ``skip_log`` and bad-rate limit as the torch loader's ``ShardLoader``; its workers
    read the tars and check each image's header, :func:`~mixedae_fast.pipelines.shards.check_encoded`),
    decoded and augmented by DALI (nvJPEG on ``cuda:N``, the CPU otherwise) with ``train_graph`` /
    ``eval_graph``: the contract of ``DaliLoader``. ``**shard_kw`` go to ``ShardLoader`` (``shuffle``,
    ``num_workers``, ``shard_id``, ``num_shards``, ``epoch_size``, ``labels``, ``single_pass``, ``limit``,
    ``max_bad_fraction``, ``skip_log``).

    DALI runs each batch as it is handed over (no DALI prefetch; the reader's workers read ahead). The
    pipeline is built, seeded with ``hash((seed, e0))``, for the first epoch iterated and kept for the
    following ones, as ``DaliLoader``'s; a resume reads the same samples from the same position (the
    reader replays the epoch) with other random crops. A sample whose header passes but that DALI cannot
    decode (corrupt inside its compressed data) stops the pass with an error naming its shard and key:
    DALI cannot drop one sample of a batch, the torch loader (``data.backend=torch``) skips it."""

    def __init__(self, spec, *, batch_size: int, img_size: int, device="cpu", dtype: torch.dtype = torch.float32,
                 augment: bool = True, crop_scale=(0.2, 1.0), seed: int = 0, num_threads: int = 2, **shard_kw):
        self._plugin = _plugin()
        self.device, self.dtype = torch.device(device), dtype
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        self.shards = ShardLoader(spec, batch_size=batch_size, img_size=img_size, augment=augment,
                                  crop_scale=crop_scale, seed=seed, **shard_kw)
        self.batch_size, self.img_size, self.augment, self.crop_scale = batch_size, img_size, augment, crop_scale
        self.seed, self.num_threads = seed, num_threads
        self.epoch, self._pipe, self._next_epoch = 0, None, None

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def skipped(self) -> int:
        return self.shards.skipped

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.shards.set_epoch(epoch, start_step)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.shards.start_step, "seed": self.seed}

    def _open(self, epoch: int) -> None:
        self._pipe = None
        graph, device_id = _graph_for(self.device, self.img_size, self.dtype, self.augment, self.crop_scale)
        seed = hash((self.seed, epoch)) & 0x7FFF_FFFF
        pipe = external_pipeline(graph=graph, batch_size=self.batch_size, num_threads=self.num_threads,
                                 device_id=device_id, seed=seed, prefetch_queue_depth=1, exec_pipelined=False,
                                 exec_async=False)
        pipe.build()
        self._pipe = pipe

    def __iter__(self):
        if self._pipe is None or self._next_epoch != self.epoch:
            self._open(self.epoch)
        self._next_epoch = None          # mid-epoch until the pass is finished
        for batch in self.shards.raw_batches():
            yield self._decode(batch), batch.labels.to(self.device, non_blocking=True)
        self._next_epoch = self.epoch + 1

    def _decode(self, batch) -> torch.Tensor:
        self._pipe.feed_input("jpegs", batch.images)
        try:
            (images,) = self._pipe.run()
        except RuntimeError as e:
            self._pipe = None            # a failed DALI pipeline is no longer valid
            raise _undecodable(batch, e) from e
        images = images.as_tensor()
        out = torch.empty(images.shape(), dtype=torch.float16 if self.dtype == torch.float16 else torch.float32,
                          device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._plugin.feed_ndarray(images, out, cuda_stream=stream)
        return out.to(self.dtype)


def _undecodable(batch, e: Exception) -> Exception:
    """DALI's failure on a batch, as the sample PIL cannot decode either (its shard and key), or as DALI said it."""
    from PIL import Image

    for data, (url, key) in zip(batch.images, batch.keys):
        try:
            with Image.open(io.BytesIO(data.tobytes())) as im:
                im.load()
        except Exception as bad:  # noqa: BLE001 - whatever PIL raises, this is the sample that stopped DALI
            return ValueError(f"webdataset shard {url} key {key!r}: an image DALI cannot decode "
                              f"({type(bad).__name__}: {str(bad)[:120]}). DALI cannot drop one sample of a batch; "
                              "read these shards with data.backend=torch (it skips and lists such samples), or "
                              "remove the sample from the shard")
    return RuntimeError(f"DALI could not decode a batch of {batch.keys[0][0]}: {_first_error(e)}")


def _graph_for(device: torch.device, img_size: int, dtype, augment: bool, crop_scale):
    """``(graph, device_id)``: the train or eval graph decoding on ``device`` (``mixed`` = nvJPEG on CUDA)."""
    decode = "mixed" if device.type == "cuda" else "cpu"
    common = {"decode_device": decode, "img_size": img_size, "dtype": dtype}
    graph = (functools.partial(train_graph, crop_scale=crop_scale, **common) if augment
             else functools.partial(eval_graph, **common))
    device_id = None if decode == "cpu" else (torch.cuda.current_device() if device.index is None else device.index)
    return graph, device_id


def _plugin():
    _dali()
    import nvidia.dali.plugin.pytorch as plugin
    return plugin


def _first_error(e: Exception) -> str:
    """The informative line of a DALI error (its message starts with a traceback of the graph)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Critical error", "Error in", "which was", "File ",
                                                       "encountered", "C++ context", "Current pipeline"))]
    return (useful or lines or [type(e).__name__])[0][:300]
