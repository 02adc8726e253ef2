"""Errors whose message is written for the user (what happened, why, the fix): the CLI prints them as
one ``error:`` line. Bad input raises ``ValueError`` (``ConfigError``, ``CheckpointError``: exit 2);
a failure on the way that is not the input's fault raises :class:`RunFailure` (exit 1). An error raised in a
DataLoader worker reaches the main process wrapped by torch; :func:`worker_error` takes it out."""
import ast
import re


class RunFailure(RuntimeError):
    """Something failed on the way (a check, a divergence): the message says what and what to do."""


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
