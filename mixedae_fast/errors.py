"""Errors whose message is written for the user (what happened, why, the fix): the CLI prints them as
one ``error:`` line. Bad input raises ``ValueError`` (``ConfigError``, ``CheckpointError``: exit 2);
a failure on the way that is not the input's fault raises :class:`RunFailure` (exit 1);
:func:`error_line` turns any exception into that line and its exit code. An error raised in a DataLoader
worker reaches the main process wrapped by torch; :func:`worker_error` takes it out."""
from __future__ import annotations

import ast
import errno
import os
import re


class RunFailure(RuntimeError):
    """Something failed on the way (a check, a divergence): the message says what and what to do."""


def error_line(e: BaseException, debug: bool = False) -> tuple[int, str]:
    """``(exit code, message)`` of the one ``error:`` line a failure ends in: our own errors carry what, why
    and the fix; others get their first line. 2 for bad input (a config, a path, a run, a refused write), 1
    for a failure on the way (a full disk, a NaN stop, anything unexpected)."""
    if (original := worker_error(e)) is not None:  # from a DataLoader worker: its traceback was the message
        return error_line(original, debug)
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


_CAUGHT = re.compile(r"Caught (?P<name>\w+) in (?:DataLoader worker process \d+|pin memory thread[^.\n]*)\.\n"
                     r"Original (?P<trace>Traceback \(most recent call last\):\n.*)", re.S)
_NAME = r"'[^']*'|\"[^\"]*\""  # a file name as repr() writes it
_ERRNO = re.compile(rf"\[Errno (?P<errno>\d+)\] (?P<strerror>.*?)"
                    rf"(?:: (?P<filename>{_NAME})(?: -> (?P<filename2>{_NAME}))?)?", re.S)


def worker_error(e: BaseException) -> BaseException | None:
    """The exception a DataLoader worker raised, rebuilt in the main process, or None when ``e`` did not
    come from one. torch re-raises a worker's exception as its type holding "Caught X in DataLoader worker
    process N." and the worker's whole traceback as the message (a ``RuntimeError`` where the type will not
    take one string): the original message is the traceback's last exception line, and an ``OSError``'s
    errno, strerror and filename are read back from it, so the error reads as it would have in the
    main process. Raise it ``from e``: the worker's traceback stays its cause (shown with ``--debug``)."""
    found = _CAUGHT.match(str(e).strip())
    if found is None:
        return None
    name, trace = found["name"], found["trace"]
    # the exception's own line comes last: "[module.]Name: message" (a bare "Name" without a message)
    lines = list(re.finditer(rf"^(?:[\w.]+\.)?{name}(?:: |$)", trace, re.M))
    message = trace[lines[-1].end():].strip() if lines else ""
    kind = type(e)
    if kind.__name__ != name:  # torch could not build the type from one string
        return RuntimeError(f"{name}: {message}" if message else name)
    if issubclass(kind, OSError) and (parts := _ERRNO.fullmatch(message)):
        args = [int(parts["errno"]), parts["strerror"]]
        if parts["filename"]:
            args.append(ast.literal_eval(parts["filename"]))
        if parts["filename2"]:  # OSError(errno, strerror, filename, winerror, filename2)
            args += [None, ast.literal_eval(parts["filename2"])]
        return kind(*args)
    try:
        return kind(message)
    except Exception:  # noqa: BLE001 - a type that takes other arguments: its name and message, as text
        return RuntimeError(f"{name}: {message}")
