"""Errors whose message is written for the user (what happened, why, the fix): the CLI prints them as
one ``error:`` line. Bad input raises ``ValueError`` (``ConfigError``, ``CheckpointError``: exit 2);
a failure on the way that is not the input's fault raises :class:`RunFailure` (exit 1)."""


class RunFailure(RuntimeError):
    """Something failed on the way (a check, a divergence): the message says what and what to do."""
