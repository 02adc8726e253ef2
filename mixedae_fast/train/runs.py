"""A run folder belongs to one run: claimed with a lock for the run's life, reused only to resume.

    with RunLock(run_dir):                  # refuses a second process; a dead holder's lock is taken over
        check_fresh(run_dir, cfg.run.resume)    # a folder that holds a run is reused only with run.resume
        ...
        set_aside_later_checkpoints(ckpt_dir, step)   # after a resume from an older checkpoint
        truncate_metrics(run_dir / "metrics.csv", step)

Nothing here deletes a file a run wrote: abandoned checkpoints move to ``checkpoints/abandoned-<step>/``
(``resume=auto``, eval and export list only ``checkpoints/ckpt-*.pt``), and metrics rows past the
resumed step are dropped by an atomic rewrite.
"""
from __future__ import annotations

import csv
import io
import os
import socket
import threading
import time
from pathlib import Path

from mixedae_fast.config import ConfigError
from mixedae_fast.fsutil import atomic_write
from mixedae_fast.train.checkpoint import checkpoint_step, list_checkpoints

LOCK_NAME = ".lock"
HEARTBEAT_S = 30  # the lock holder touches its lock this often
STALE_S = 180     # a same-job lock on another node with no beat for this long: its process is gone
# Entries that may be in a run folder before its run starts: `launch slurm` writes its script and
# SLURM its logs into slurm/ before the first rank runs.
_NOT_A_RUN = {LOCK_NAME, "slurm"}


class RunFolderError(ConfigError):
    """A run folder that holds another run, or is in use by another process; the message names the fix."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLock:
    """``run_dir/.lock`` (pid, host, SLURM job id, start time), created exclusively and removed on exit.

    A lock whose process is gone is stale and taken over: same host and no such pid, or the same
    SLURM job id on another host (a requeued job is the same run, possibly on another node) whose
    holder stopped beating. The holder touches the file every :data:`HEARTBEAT_S`; a same-job lock on
    another node is taken over only after :data:`STALE_S` without a beat, so a second ``srun`` of the
    job, or a requeue that overlaps the old step, is refused while the first still runs. A lock from
    another host and another job cannot be checked: the message says to delete it if that process is gone."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.text = (f"pid={os.getpid()} host={socket.gethostname()} slurm_job={os.environ.get('SLURM_JOB_ID', '')} "
                     f"since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        self.held = False
        self._stop = threading.Event()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _parse(self.path)
                if holder is None or not self._stale(holder):
                    raise RunFolderError(self._held_message(holder)) from None
                # rename, not unlink: of two processes that both saw it stale, one wins the rename
                try:
                    os.replace(self.path, self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
                    self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}").unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.text)
            self.held = True
            self._stop.clear()
            threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True).start()
            return
        raise RunFolderError(f"{self.path}: could not take the run folder's lock (it keeps changing); another "
                             "process is starting in the same run folder")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or flaky disk: the next beat tries again

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            try:
                return not _pid_alive(int(holder.get("pid", "")))
            except ValueError:
                return False
        job = os.environ.get("SLURM_JOB_ID", "")
        if job and holder.get("slurm_job") == job:
            try:
                return time.time() - self.path.stat().st_mtime > STALE_S
            except FileNotFoundError:
                return True
        return False

    @staticmethod
    def _who(holder: dict | None) -> str:
        """The lock's holder as a message names it."""
        return (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})" if holder
                else "another process (unreadable lock)")

    def _held_message(self, holder: dict | None) -> str:
        return (f"run folder {self.path.parent} is in use by {self._who(holder)}: two runs in one folder mix "
                f"their metrics and overwrite each other's checkpoints. Wait for it, choose another --run.name, or, "
                f"if that process is gone, delete {self.path}")

    def release(self) -> None:
        self._stop.set()
        if self.held and _parse(self.path) == _parse_text(self.text):
            self.path.unlink(missing_ok=True)
        self.held = False


def _parse_text(text: str) -> dict:
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def _parse(path: Path) -> dict | None:
    try:
        found = _parse_text(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None
    return found if "pid" in found else None


def check_fresh(run_dir: str | os.PathLike, resume: str) -> None:
    """Refuse a run folder that already holds a run unless the run resumes (any ``run.resume`` but none)."""
    run_dir = Path(run_dir)
    if resume != "none" or not run_dir.is_dir():
        return
    found = sorted(e.name for e in run_dir.iterdir() if e.name not in _NOT_A_RUN)
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise RunFolderError(f"run folder {run_dir} already holds a run ({shown}); training into it would mix the "
                             "two runs' metrics and replace its checkpoints. Continue it with --run.resume=auto, or "
                             "start a new run with another --run.name")


def set_aside_later_checkpoints(ckpt_dir: str | os.PathLike, step: int) -> Path | None:
    """Move checkpoints later than ``step`` (a branch abandoned by resuming from an older one) into
    ``ckpt_dir/abandoned-<step>/``; returns that folder, or None when there were none."""
    later = [p for p in list_checkpoints(ckpt_dir) if checkpoint_step(p) > step]
    if not later:
        return None
    target = Path(ckpt_dir) / f"abandoned-{step:08d}"
    if target.exists():  # resumed from this step before: keep both sets apart
        target = Path(ckpt_dir) / f"abandoned-{step:08d}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir(parents=True)
    for p in later:
        os.replace(p, target / p.name)
    return target


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Drop the rows of ``metrics.csv`` past ``step`` (logged by a branch the resume abandons, or since the
    checkpoint a crashed run resumes from), rewriting it atomically. Returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    if "step" not in header:
        return 0

    def keep(row: list[str]) -> bool:
        if len(row) != len(header):
            return False  # a torn last line of a crash ("1" of "12,...")
        try:
            return float(row[header.index("step")]) <= step
        except ValueError:
            return False

    kept = [r for r in body if keep(r)]
    if len(kept) == len(body):
        return 0
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *kept])
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))
    return len(body) - len(kept)
