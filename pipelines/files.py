"""Image sources on disk, and checking them before training.

Two layouts (``data.format``) are read into one list of samples ``(path, label)``:

    imagefolder   root/<class>/**/<image>        classes = sorted subfolder names (torchvision order)
    filelist      lines "<path> <int label>"     paths relative to the list file's folder

The third, ``webdataset`` (tar shards), is a stream, not a list of files: ``pipelines/shards.py`` (the
one tar reader) reads it for every loader.

    samples, classes = open_source("data/train", "imagefolder")
    good, bad = verify_images([s for s, _ in samples])    # bad: [(path, reason)]; cached by (path, size, mtime)

``verify_images`` decodes every image once (PIL ``verify()`` then a full ``load()``, which is what
catches truncated JPEGs) so a bad file is skipped up front instead of failing mid-epoch. It runs
PIL in threads (its decoders release the GIL), decodes JPEGs at 1/8 scale (``draft``: the entropy
decoding, where truncation shows, still runs in full), and caches each result in
``$MIXEDAE_CACHE/verified/<digest of the data root>.json`` keyed by (path, size, mtime), so the next
run only stats the files.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from mixedae_fast.choices import DATA_FORMATS
from mixedae_fast.fsutil import atomic_write_text, cache_root

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FORMATS = DATA_FORMATS
_CACHE_VERSION = 1
_MAKE_DATA_HINT = ("create the default dataset with `mixedae-fast make-data`, or set data.path to an existing "
                   "ImageFolder root, file list or webdataset shards")


Source = str   # a file path


def read_bytes(source: Source) -> bytes:
    """The encoded image: the whole file."""
    with open(source, "rb") as f:
        return f.read()


def describe(source: Source) -> str:
    return str(source)


def _require(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist; {_MAKE_DATA_HINT}")
    return path


def _visible(name: str) -> bool:
    return not name.startswith(".")


def scan_image_folder(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    """``(paths, labels, classes)`` of an ImageFolder tree, in torchvision ``ImageFolder`` order: classes
    are the sorted subfolder names, files are walked per class in sorted order (subfolders included).
    Extensions ``IMAGE_EXTENSIONS``, any case; hidden files and folders are ignored."""
    root = _require(root, "image folder")
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is a file, not an ImageFolder root (root/<class>/<image>); "
                         "for a file list or a tar set data.format to filelist or webdataset")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))
    if not classes:
        raise ValueError(f"{str(root)!r} has no class subfolders; an ImageFolder root holds one folder per "
                         f"class with the images inside (root/<class>/<image>); for unlabelled pretraining images "
                         f"set data.labels=none; {_MAKE_DATA_HINT}")
    if set(classes) <= {"train", "val", "test"}:
        split = root / ("train" if "train" in classes else classes[0])
        warnings.warn(f"the classes of {str(root)!r} are {classes}: did you mean {str(split)!r}?", stacklevel=2)
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        before = len(paths)
        others = [os.path.realpath(root / c) for c in classes if c != name]
        for folder, files in _walk_once(root / name, others):
            for f in sorted(files):
                if _visible(f) and f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(folder, f))
                    labels.append(label)
        if len(paths) == before:
            empty.append(name)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the {len(classes)} class folders "
                         f"of {str(root)!r}; {_MAKE_DATA_HINT}")
    if empty:
        warnings.warn(f"{len(empty)} class folders of {str(root)!r} hold no images: {empty[:5]}; their labels "
                      "stay reserved", stacklevel=2)
    return paths, labels, classes


def _walk_once(top: Path, others: list[str] = ()) -> list[tuple[str, list[str]]]:
    """``(folder, files)`` of every visible folder under ``top`` in torchvision's order (``sorted(os.walk(...,
    followlinks=True))``), each directory once: a symbolic link back to a folder already walked (a loop,
    or a second way to the same folder) is not followed again, so a loop cannot list images over and
    over or never end. Nor is a link to ``top``'s own ancestors (the data root: every class again, under
    this label) or into ``others`` (the other classes' folders): their images have their own label."""
    top_real = os.path.realpath(top)

    def foreign(path: str) -> bool:
        real = os.path.realpath(path)
        return (top_real == real or top_real.startswith(real.rstrip(os.sep) + os.sep)
                or any(real == o or real.startswith(o + os.sep) for o in others))

    seen, found = set(), []
    for folder, dirs, files in os.walk(top, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        # pruned during the walk, so hidden folders and foreign links are not entered
        dirs[:] = [d for d in dirs if _visible(d) and not (os.path.islink(os.path.join(folder, d))
                                                            and foreign(os.path.join(folder, d)))]
        found.append((folder, files))
    return sorted(found)


def to_rgb(im):
    """A PIL image as 8-bit RGB, whatever its mode: 16-bit greyscale (``I;16``, also ``I`` holding 16-bit
    values) is scaled to 0..255 rather than clipped (``convert("RGB")`` turns it almost white); palette
    images go through RGBA so a transparency entry is read; greyscale, alpha and CMYK convert as PIL
    does (alpha dropped)."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" and a.size and a.max() <= 1.0 else 255.0
        if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() > 255):
            top = 65535.0
        grey = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def read_file_list(path: str | Path, labels: bool = True) -> tuple[list[str], list[int]]:
    """``(paths, labels)`` from a text file of ``<path> <integer label>`` lines (the path may contain
    spaces; relative paths are relative to the list file's folder). Blank lines and ``#`` comments
    are skipped; any other line that does not parse raises ``ValueError`` with its line number.
    ``labels=False``: each line is just a path (every label -1)."""
    if not labels:
        return _read_path_list(path)
    path = _require(path, "file list")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; a file list is a text file of '<path> <label>' lines "
                         "(for an ImageFolder root set data.format=imagefolder)")
    base, paths, labels = path.parent, [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        try:
            if len(parts) != 2:
                raise ValueError
            label = int(parts[1])
        except ValueError:
            raise ValueError(f"{path}:{number}: expected '<path> <integer label>', got {line!r}; fix or remove that "
                             "line ('#' starts a comment)") from None
        if label < 0:
            raise ValueError(f"{path}:{number}: labels must be >= 0 (class indices 0, 1, ...), got {label}; fix "
                             "that line")
        paths.append(str(base / Path(parts[0]).expanduser()))
        labels.append(label)
    if not paths:
        raise ValueError(f"file list {str(path)!r} lists no images; expected '<path> <integer label>' lines")
    return paths, labels


def _read_path_list(path: str | Path) -> tuple[list[str], list[int]]:
    path = _require(path, "file list")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; a file list is a text file of image paths, one a line "
                         "(for a folder of images set data.format=imagefolder)")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    paths = [str(path.parent / Path(ln).expanduser()) for ln in lines if ln and not ln.startswith("#")]
    if not paths:
        raise ValueError(f"file list {str(path)!r} lists no images; write one image path a line ('#' starts a "
                         "comment), relative to the list's folder or absolute")
    return paths, [-1] * len(paths)


def scan_images(root: str | Path) -> list[str]:
    """Every visible image under ``root`` (any depth, each folder once, sorted): an unlabelled tree."""
    root = _require(root, "image folder")
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is a file, not a folder of images; point data.path at a folder (for a "
                         "text file of image paths set data.format=filelist)")
    paths = [os.path.join(folder, f) for folder, files in _walk_once(root) for f in sorted(files)
             if _visible(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}; {_MAKE_DATA_HINT}")
    return paths


def open_source(path: str | Path, fmt: str = "imagefolder",
                labels: bool = True) -> tuple[list[tuple[Source, int]], list[str] | None]:
    """``(samples, classes)``: the samples ``(source, label)`` of ``path`` read as ``fmt``
    (``imagefolder`` or ``filelist``; webdataset shards stream through ``pipelines/shards.py``);
    ``classes`` are the ImageFolder class names, None for a file list.
    ``labels=False`` (``data.labels=none``): no labels needed — any folder tree of images, a list of
    paths, shards without ``cls`` — and every label is -1."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "webdataset":
        raise ValueError(f"{str(path)!r}: webdataset shards are a stream, not a list of files; read them with "
                         "pipelines.shards.ShardLoader (data.format=webdataset does, for every loader)")
    _require(path, "data.path")
    if fmt == "filelist":
        paths, labs = read_file_list(path, labels)
        return list(zip(paths, labs)), None
    if not labels:
        return [(p, -1) for p in scan_images(path)], None
    paths, labels, classes = scan_image_folder(path)
    return list(zip(paths, labels)), classes


# -- verification ----------------------------------------------------------------------------------

def check_image(source: Source) -> tuple[str, int, int]:
    """``(reason, width, height)``: reason is "" for an image PIL decodes in full, else why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = read_bytes(source)
    except OSError as e:
        return f"unreadable: {e.strerror or e}", 0, 0
    if not data:
        return "empty file (0 bytes)", 0, 0
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()           # structure and checksums (PNG CRCs); does not decode
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if im.format == "JPEG":
                im.draft("RGB", (1, 1))   # IDCT at 1/8 scale: the whole stream is still decoded
            im.load()
    except UnidentifiedImageError:
        return "not an image PIL can read", 0, 0
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        return f"corrupt: {type(e).__name__}: {e}", 0, 0
    return "", width, height


def _default_cache(sources: Sequence[Source]) -> Path:
    root = os.path.commonpath([os.path.abspath(f) for f in set(sources)])
    digest = hashlib.sha1(root.encode()).hexdigest()[:16]
    return cache_root() / "verified" / f"{digest}.json"


def _stats(sources: Sequence[Source]) -> list[tuple[str, int, int] | None]:
    """Per source ``(key, size, mtime_ns)`` of the file that holds it, or None if it cannot be stat'ed."""
    seen: dict[str, tuple[int, int] | None] = {}
    out = []
    for s in sources:
        f = os.path.abspath(s)
        if f not in seen:
            try:
                st = os.stat(f)
                seen[f] = (st.st_size, st.st_mtime_ns)
            except OSError:
                seen[f] = None
        out.append(None if seen[f] is None else (f, *seen[f]))
    return out


VERIFY_MODES = ("full", "sample", "off")
SAMPLE_MIN, SAMPLE_FRACTION = 1000, 0.01  # data.verify=sample: 1% of the images, at least 1,000


def verify_subset(n: int, mode: str, seed: int = 0) -> list[int]:
    """Indices of the ``n`` sources that ``data.verify`` checks: all (``full``), none (``off``), or a
    seeded random ``max(1000, 1%)`` of them (``sample``: the bad rate is estimated, not every bad file
    found; the torch loader replaces a file that fails later, DALI cannot)."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"data.verify = {mode!r}: must be one of {', '.join(VERIFY_MODES)}")
    if mode == "full":
        return list(range(n))
    if mode == "off":
        return []
    k = min(n, max(SAMPLE_MIN, int(n * SAMPLE_FRACTION)))
    import random

    return sorted(random.Random(seed).sample(range(n), k))


class Cost(NamedTuple):
    """What a verification cost: images decoded (not found in the cache), found cached, seconds."""
    decoded: int = 0
    cached: int = 0
    seconds: float = 0.0

    def rate_line(self, what: str) -> str | None:
        """``verified ...: N images decoded in T s (R images/s), M from the cache``, or None when nothing
        was decoded."""
        if not self.decoded:
            return None
        rate = self.decoded / max(self.seconds, 1e-9)
        return (f"verified {what}: {self.decoded} images decoded in {self.seconds:.1f} s ({rate:.0f} images/s; "
                f"1.28 M would take {1_281_167 / rate / 60:.0f} min), {self.cached} from the cache")


class Verified(NamedTuple):
    """:func:`verify_sources`'s answer: the indices to keep, ``(source, reason)`` of the bad ones,
    ``check_image``'s result of every checked good source by index, and what the check cost."""
    keep: list[int]
    bad: list[tuple[str, str]]
    checked: dict[int, tuple[str, int, int]]
    cost: Cost


def _cache_lock(cache_file: Path):
    """An exclusive ``flock`` on ``<cache>.lock`` (a no-op where the folder cannot hold one)."""
    import contextlib

    @contextlib.contextmanager
    def held():
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            f = open(cache_file.with_name(cache_file.name + ".lock"), "a")
        except OSError:
            yield
            return
        with f:
            try:
                import fcntl

                fcntl.flock(f, fcntl.LOCK_EX)
            except (ImportError, OSError):
                pass  # no lock there: each process verifies on its own, as before
            yield

    return held()


def _inspect_locked(sources, stats, cache_file, num_workers):
    entries: dict = {}
    if cache_file is not None and cache_file.is_file():
        try:
            found = json.loads(cache_file.read_text())
            entries = found["entries"] if found.get("version") == _CACHE_VERSION else {}
        except (ValueError, KeyError, TypeError):
            entries = {}      # a damaged cache is only a lost speed-up
    results: list = [None] * len(sources)
    todo = []
    for i, st in enumerate(stats):
        if st is None:
            results[i] = ("file not found", 0, 0)
            continue
        hit = entries.get(st[0])
        if hit is not None and hit[0] == st[1] and hit[1] == st[2]:
            results[i] = (hit[2], hit[3], hit[4])
        else:
            todo.append(i)
    if todo:
        workers = num_workers or len(os.sched_getaffinity(0))
        chunks = [todo[k:k + 64] for k in range(0, len(todo), 64)]
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            for chunk, res in zip(chunks, pool.map(lambda c: [check_image(sources[i]) for i in c], chunks)):
                for i, r in zip(chunk, res):
                    results[i] = r
                    entries[stats[i][0]] = [stats[i][1], stats[i][2], *r]
        if cache_file is not None:
            try:
                atomic_write_text(cache_file, json.dumps({"version": _CACHE_VERSION, "entries": entries},
                                                         separators=(",", ":")))
            except OSError as e:
                warnings.warn(f"could not write the verification cache {cache_file}: {e}", stacklevel=2)
    return results, todo


def inspect_images(sources: Sequence[Source], num_workers: int | None = None,
                   cache: str | Path | bool | None = True) -> tuple[list[tuple[str, int, int]], Cost]:
    """``(results, cost)``: ``check_image`` of every source, in order, reusing and updating the cache (see
    the module docstring; ``cache`` True = the default file, a path = that file, False/None = none), and
    what it cost.

    Processes verifying the same data at once (the ranks of a job) take turns on a lock beside the
    cache file: the first decodes and writes the cache, the others then find every file in it, so a
    data set is decoded once per machine (per cluster where the cache folder is shared and supports
    ``flock``)."""
    import contextlib
    import time

    t0 = time.perf_counter()
    sources = list(sources)
    stats = _stats(sources)
    cache_file = None if not cache or not sources else (_default_cache(sources) if cache is True else Path(cache))
    with _cache_lock(cache_file) if cache_file is not None else contextlib.nullcontext():
        results, todo = _inspect_locked(sources, stats, cache_file, num_workers)
    return results, Cost(len(todo), len(sources) - len(todo), time.perf_counter() - t0)


def verify_sources(sources: Sequence[Source], mode: str = "full", seed: int = 0, cache=True,
                   where: str = "") -> Verified:
    """``data.verify`` over ``sources`` (both loaders use it): :class:`Verified` — the indices to keep
    (every source but the checked ones that failed), ``(source, reason)`` of those, ``check_image``'s
    result of every checked source that decodes, by index, and the cost. Refuses a set whose every
    checked image fails; warns with the estimated bad rate in ``sample`` mode."""
    picked = verify_subset(len(sources), mode, seed)
    if not picked:
        return Verified(list(range(len(sources))), [], {}, Cost())
    subset = [sources[i] for i in picked]
    results, cost = inspect_images(subset, cache=cache)
    if all(r[0] for r in results):
        first = "; ".join(f"{describe(src)}: {r[0]}" for src, r in zip(subset[:3], results))
        raise ValueError(f"none of the {len(subset)} images checked{where} can be decoded ({first}); fix or "
                         "regenerate the data (`mixedae-fast make-data`) or point data.path elsewhere")
    good, bad = split_results(subset, results)
    checked = {picked[i]: results[i] for i in good}
    if mode == "sample" and bad:
        warnings.warn(f"data.verify=sample: {len(bad)} of {len(subset)} checked images{where} are bad "
                      f"(~{100 * len(bad) / len(subset):.1f}%); the unchecked ones are replaced when they fail (torch "
                      "loader; DALI stops on one); data.verify=full finds them all", stacklevel=3)
    dropped = set(picked) - set(checked)
    return Verified([i for i in range(len(sources)) if i not in dropped], bad, checked, cost)


def split_results(sources: Sequence[Source], results) -> tuple[list[int], list[tuple[str, str]]]:
    """``(good_indices, bad)`` from ``inspect_images`` results, warning with the count and the first few."""
    good = [i for i, r in enumerate(results) if not r[0]]
    bad = [(describe(sources[i]), r[0]) for i, r in enumerate(results) if r[0]]
    if bad:
        first = "; ".join(f"{p}: {why}" for p, why in bad[:3])
        warnings.warn(f"skipping {len(bad)} of {len(results)} images that cannot be decoded ({first}"
                      f"{'; ...' if len(bad) > 3 else ''})", stacklevel=3)
    return good, bad


def verify_images(paths: Sequence[Source], num_workers: int | None = None,
                  cache: str | Path | bool | None = True) -> tuple[list[int], list[tuple[str, str]]]:
    """``(good_indices, bad)`` where ``bad`` lists ``(path, reason)`` for every file that is missing,
    empty, not an image or corrupt (truncated included). Warns with the count and the first few;
    the caller gets the full list (e.g. to write into the run folder)."""
    return split_results(paths, inspect_images(paths, num_workers, cache)[0])
