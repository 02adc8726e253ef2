"""Files written whole or not at all, and the cache folder: the two filesystem facts every layer uses
(pipelines included), kept here once. Imports nothing of ours."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """``$MIXEDAE_CACHE``, default ``~/.cache/mixedae_fast``: the embedded and offline datasets, the
    verification records. Set but empty counts as unset (as XDG's variables do):
    an empty path is the current folder, and the data sets would land wherever the command ran."""
    return Path(os.environ.get("MIXEDAE_CACHE", "").strip() or "~/.cache/mixedae_fast").expanduser()


def atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """``write(f)`` into a temp file (binary) in the same folder, fsync, then rename over ``path``: a
    crash or a full disk leaves the previous file intact. A failed write raises ``OSError`` naming the
    file and the free space (torch reports a full disk as a bare "file write failed")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _write_error(path: Path, e: Exception) -> OSError:
    import errno
    import shutil

    if isinstance(e, OSError) and e.errno not in (None, errno.ENOSPC, errno.EDQUOT):
        return e  # permission, read-only filesystem...: the OSError says it
    if not isinstance(e, (OSError, RuntimeError)):
        return e  # not a failed write (torch reports one as a RuntimeError)
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return OSError(errno.ENOSPC, f"could not write {path} ({reason}; {free}): is the disk full? The previous "
                   "file, if any, is intact; free some space or write elsewhere (run.out_dir)")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode()))
