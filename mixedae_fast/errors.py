"""Errors whose message is written for the user (what happened, why, the fix): the CLI prints them as
one ``error:`` line. Bad input raises ``ValueError`` (``ConfigError``, ``CheckpointError``: exit 2);
a failure on the way that is not the input's fault raises :class:`RunFailure` (exit 1);
:func:`error_line` turns any exception into that line and its exit code."""
from __future__ import annotations

import errno
import os


class RunFailure(RuntimeError):
    """Something failed on the way (a check, a divergence): the message says what and what to do."""


def error_line(e: BaseException, debug: bool = False) -> tuple[int, str]:
    """``(exit code, message)`` of the one ``error:`` line a failure ends in: our own errors carry what, why
    and the fix; others get their first line. 2 for bad input (a config, a path, a run, a refused write), 1
    for a failure on the way (a full disk, a NaN stop, anything unexpected)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        return 2, str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.errno and e.strerror and e.strerror != os.strerror(e.errno):
        return (2 if isinstance(e, PermissionError) else 1), e.strerror  # ours: it names the fix
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {e.filename}" if e.filename else ""
        return 1, (f"{e.strerror or first}{where}: the disk is full; free space or write elsewhere "
                   "(run.out_dir, MIXEDAE_CACHE); files already written are intact")
    if isinstance(e, PermissionError):
        return 2, (f"permission denied: {e.filename or first}; choose a folder you can write (run.out_dir, --out, "
                   "MIXEDAE_CACHE)")
    if isinstance(e, OSError):
        return 1, f"{first or e}" + (f" ({e.filename})" if e.filename and str(e.filename) not in first else "")
    if isinstance(e, (FloatingPointError, RunFailure)):
        return 1, first
    hint = "" if debug else "; run again with --debug (or MIXEDAE_DEBUG=1) for the traceback"
    return 1, f"{type(e).__name__}: {first[:500]} (unexpected{hint})"
