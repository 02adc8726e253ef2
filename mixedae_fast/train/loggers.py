"""Where a run's scalars and pictures go (``run.loggers``): ``csv``, ``tensorboard``, ``wandb``.

``metrics.csv`` is the run's own record (resume truncates it, the loss-curve picture reads it), so
the trainer always writes it; ``csv`` in the list is accepted for clarity. The other sinks receive
every metrics row and every training picture:

- ``tensorboard``: event files in ``runs/<name>/tb`` (``pip install 'mixedae_fast[log]'``);
- ``wandb``: Weights & Biases, in ``runs/<name>/wandb``. The mode is wandb's own ``WANDB_MODE``
  when set, else ``online`` with credentials (``WANDB_API_KEY`` or a ``wandb login``, which wandb
  keeps in ``~/.netrc`` or ``$NETRC``) and ``offline`` without (sync
  later with ``wandb sync``). A resumed run continues the same wandb run (its id is kept in the run
  folder). ``run.wandb_project`` / ``run.wandb_entity`` name the project and entity (unset: wandb's
  ``WANDB_PROJECT`` / ``WANDB_ENTITY``, then project ``mixedae_fast`` and the login's default entity).

Without any picture sink, pictures are written as ``pictures/<name>-<step>.png``.
"""
from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

LOGGERS = ("csv", "tensorboard", "wandb")


class MissingLogger(ValueError):
    """A sink in ``run.loggers`` whose package is not installed; the message names the extra."""


def require(names) -> None:
    """Refuse, before a run starts, a sink in ``run.loggers`` whose package is missing (MissingLogger)."""
    for name, module in (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")):
        if name in names:
            try:
                __import__(module)
            except ImportError:
                raise MissingLogger(f"run.loggers has {name} but it is not installed: pip install "
                                    f"'mixedae_fast[log]' (or {name}), or drop it from run.loggers") from None


def wandb_mode(env) -> str:
    """``WANDB_MODE`` when set; else ``online`` when wandb has credentials (``WANDB_API_KEY``, or the
    key ``wandb login`` wrote to the netrc file for ``WANDB_BASE_URL``'s host), else ``offline``."""
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        entry = None
    return "online" if entry and entry[2] else "offline"


def _flat(row: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class Loggers:
    """The sinks of one run (rank 0 only). ``scalars(row, step)`` and ``image(name, array, step)`` go to
    every sink; ``close()`` flushes them."""

    def __init__(self, names, run_dir: str | os.PathLike, config: dict | None = None, run_name: str | None = None,
                 project: str | None = None, entity: str | None = None):
        unknown = [n for n in names if n not in LOGGERS]
        if unknown:
            raise ValueError(f"run.loggers: {unknown} not among {', '.join(LOGGERS)}; list some of those, e.g. "
                             "--run.loggers=[csv,tensorboard]")
        self.run_dir = Path(run_dir)
        self.names = tuple(dict.fromkeys(names))
        require(self.names)
        self._tb = self._tensorboard() if "tensorboard" in self.names else None
        self._wandb = None
        if "wandb" in self.names:
            self._wandb = self._wandb_run(config or {}, run_name or self.run_dir.name, project, entity)

    @property
    def has_picture_sink(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tb"))

    def _wandb_run(self, config: dict, run_name: str, project: str | None, entity: str | None):
        import wandb

        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        if not id_file.is_file():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        (self.run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        return wandb.init(project=project or os.environ.get("WANDB_PROJECT", "mixedae_fast"),
                          entity=entity or os.environ.get("WANDB_ENTITY") or None, name=run_name, id=run_id,
                          resume="allow", dir=str(self.run_dir), mode=wandb_mode(os.environ), config=config)

    def scalars(self, row: dict, step: int, section: str = "train") -> None:
        """The numbers of ``row`` as ``<section>/<key>`` at ``step``; nested dicts add ``/``-joined keys
        (the final evaluation: ``eval/pretrained/knn``)."""
        values = {f"{section}/{k}": v for k, v in _flat(row).items() if k != "step"}
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def image(self, name: str, array: np.ndarray, step: int) -> None:
        """``array``: uint8 ``[H, W, 3]``."""
        if self._tb is not None:
            self._tb.add_image(f"pictures/{name}", array, step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"pictures/{name}": wandb.Image(array)}, step=step)
        if not self.has_picture_sink:
            from PIL import Image

            from mixedae_fast.fsutil import atomic_write

            atomic_write(self.run_dir / "pictures" / f"{name}-{step:08d}.png",
                         lambda f: Image.fromarray(array).save(f, format="PNG"))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
