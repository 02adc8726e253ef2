"""Which implementation each op takes on this card: the one table of measured choices (``measured.json``
beside this file), its one reader, and the one knob that consults it (``runtime.kernels``).

Ops: the attention modes (``none``, ``oracle``, ``topk``: one of the attention backends) and the mixing
ops (``assignment``, ``patch_mix``, ``unmix``: ``triton`` or ``torch``). The table has a ``cpu`` row, a
``default_cuda`` row (cards nobody measured: SDPA, the eager reference for topk, the torch references for
the mixing ops) and, under ``devices``, one row per measured CUDA card (``torch.cuda.get_device_name``)
whose entries each name the result file they come from; an op a card's row lacks takes ``default_cuda``'s.
The fused TopK kernel's entry also names the forward and backward tilings measured fastest on that card.

:func:`choose` is the rule ``runtime.kernels`` states, for every op:

* ``auto``: the table's entry for the card (a Triton mixing kernel still passes its self-check first,
  ``kernels/_triton.py``);
* ``triton``: the Triton kernel for each op that has one (``topk`` attention and the mixing ops), the
  table's entry for the others;
* ``torch``: no Triton kernel: where the table names one, the ``default_cuda`` (or ``cpu``) row's entry.

``runtime.attention_backend`` other than ``auto`` names the attention backend outright, whatever the table
says. Rows are built from benchmark result files (``bench_attention --table-row FILE --write``,
``bench_kernels --table-row FILE --write``), which :func:`write_row` merges into the card's row.

:func:`kernel_variant` is the benchmarks' and tests' override of the fused TopK kernel's tiling and select.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.resources
import json
from pathlib import Path

import torch

from mixedae_fast.choices import ATTENTION_BACKENDS, HA_MODES, KERNEL_BACKENDS

KERNEL_OPS = ("assignment", "patch_mix", "unmix")
OPS = (*HA_MODES, *KERNEL_OPS)
TRITON_OPS = ("topk", *KERNEL_OPS)  # the ops with a Triton kernel of ours (attention 'triton' is SDPA elsewhere)
# what a table entry may name, per op
IMPLEMENTATIONS = {**{mode: tuple(b for b in ATTENTION_BACKENDS if b != "auto") for mode in HA_MODES},
                   **{op: ("triton", "torch") for op in KERNEL_OPS}}
TABLE = importlib.resources.files("mixedae_fast") / "measured.json"

# The fused TopK kernel's forward tilings, (query rows a program, warps), and its backward's, (keys a key
# block, query rows a block, warps, pipeline stages), by name; kernels/homologous_attention.py says what
# each compiles to. The card's ``topk`` entry names the ones measured fastest there (``triton_tiling``,
# ``triton_bwd_tiling``); other cards and the CPU take the defaults. Every tiling computes the same
# contract; the last bits of bf16 results may differ between them, so a card keeps one.
FWD_TILINGS = {"m32w8": (32, 8), "m64w4": (64, 4), "m128w8": (128, 8)}
DEFAULT_TILING = "m32w8"
BWD_TILINGS = {"n128m32w8": (128, 32, 8, 2), "n64m32w4": (64, 32, 4, 1), "n128m16w8": (128, 16, 8, 1),
               "n256m16w16": (256, 16, 16, 1)}
DEFAULT_BWD_TILING = "n128m32w8"
TILING_KEYS = {"triton_tiling": (FWD_TILINGS, DEFAULT_TILING), "triton_bwd_tiling": (BWD_TILINGS, DEFAULT_BWD_TILING)}
SELECTS = {"search": 2, "radix": 1, "none": 0}  # the fused forward's K-th value search -> its SELECT constexpr


def card(device: torch.device | str) -> str | None:
    """The table's key for ``device``: the CUDA card's name, None (the ``cpu`` row) for any other device."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def check_table(table: dict, where: str) -> dict:
    """``table`` if every entry names an implementation its op has (and a known tiling), the ``cpu`` and
    ``default_cuda`` rows naming every op; else a ValueError naming ``where``, the row and the op."""
    for name in ("cpu", "default_cuda"):
        missing = [op for op in OPS if op not in table.get(name, {})]
        if missing:
            raise ValueError(f"{where}: the {name!r} row names no choice for {', '.join(missing)}: add them "
                             f"({', '.join(f'{op}: {IMPLEMENTATIONS[op][-1]}' for op in missing)} are always correct)")
    rows = {"cpu": table["cpu"], "default_cuda": table["default_cuda"], **table.get("devices", {})}
    for row_name, row in rows.items():
        for op, entry in row.items():
            choice = entry.get("backend") if isinstance(entry, dict) else entry
            if op not in IMPLEMENTATIONS or choice not in IMPLEMENTATIONS[op]:
                what = (f"names {choice!r}, not one of {', '.join(IMPLEMENTATIONS[op])}" if op in IMPLEMENTATIONS
                        else f"is no op (ops: {', '.join(OPS)})")
                raise ValueError(f"{where}: row {row_name!r}, op {op!r} {what}: fix that entry, or rebuild the row "
                                 "with bench_attention / bench_kernels --table-row ... --write")
            for key, (names, _) in TILING_KEYS.items():
                if isinstance(entry, dict) and key in entry and entry[key] not in names:
                    raise ValueError(f"{where}: row {row_name!r} names the {key} {entry[key]!r}, not one of "
                                     f"{', '.join(names)}")
    return table


@functools.cache
def table() -> dict:
    """The shipped table, checked (:func:`check_table`) once per process."""
    return check_table(json.loads(TABLE.read_text(encoding="utf-8")), str(TABLE))


def _fallback(op: str, card_name: str | None, rows: dict) -> str:
    return rows["cpu" if card_name is None else "default_cuda"][op]


def entry(op: str, card_name: str | None, rows: dict | None = None) -> dict:
    """The table's entry for ``op`` on ``card_name`` (None: the CPU) as ``{"backend": ..., ...}``."""
    if op not in OPS:
        raise ValueError(f"op {op!r} is not one of {', '.join(OPS)}")
    rows = table() if rows is None else rows
    found = None if card_name is None else rows.get("devices", {}).get(card_name, {}).get(op)
    found = _fallback(op, card_name, rows) if found is None else found
    return found if isinstance(found, dict) else {"backend": found}


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the answer
def choose(op: str, device: str, kernels: str = "auto") -> str:
    """The implementation ``op`` takes on ``device`` under ``runtime.kernels = kernels`` (the module's rule)."""
    if kernels not in KERNEL_BACKENDS:
        raise ValueError(f"kernels={kernels!r} is not one of {', '.join(KERNEL_BACKENDS)}")
    card_name = card(device)
    measured = entry(op, card_name)["backend"]
    if kernels == "triton" and op in TRITON_OPS:
        return "triton"
    if kernels == "torch" and measured == "triton":
        return _fallback(op, card_name, table())
    return measured


def tiling_in(rows: dict, card_name: str | None, key: str = "triton_tiling") -> str:
    """The tiling (``key``: ``triton_tiling``, the forward's, or ``triton_bwd_tiling``) a table's ``topk``
    entry names for ``card_name``, else the default one."""
    names, default = TILING_KEYS[key]
    name = entry("topk", card_name, rows).get(key, default)
    if name not in names:
        raise ValueError(f"measured.json: {card_name!r} names the {key} {name!r}, not one of {', '.join(names)}; "
                         "fix that entry, or rebuild the row with bench_attention --table-row ... --write")
    return name


# The benchmarks' override of the fused TopK kernel (kernel_variant); None: the card's tiling.
_VARIANT = {"tiling": None, "select": "search", "bwd_tiling": None}


@contextlib.contextmanager
def kernel_variant(tiling: str | None = None, select: str = "search", bwd_tiling: str | None = None):
    """Within the block, the fused forward runs ``tiling`` (a name of :data:`FWD_TILINGS`; ``None``: the
    card's), its K-th value search ``select`` (``search``: the bracketing search, the default; ``radix``:
    the 32-step radix search it falls back on; ``none``: every patch key kept, an ablation that times the
    select and is not TopK attention), and the backward ``bwd_tiling`` (:data:`BWD_TILINGS`; ``None``: the
    card's). For benchmarks and tests; the defaults everywhere else."""
    if tiling is not None and tiling not in FWD_TILINGS:
        raise ValueError(f"unknown tiling {tiling!r}; choose from {', '.join(FWD_TILINGS)}")
    if select not in SELECTS:
        raise ValueError(f"unknown select {select!r}; choose from {', '.join(SELECTS)}")
    if bwd_tiling is not None and bwd_tiling not in BWD_TILINGS:
        raise ValueError(f"unknown backward tiling {bwd_tiling!r}; choose from {', '.join(BWD_TILINGS)}")
    saved = dict(_VARIANT)
    _VARIANT.update(tiling=tiling, select=select, bwd_tiling=bwd_tiling)
    try:
        yield
    finally:
        _VARIANT.update(saved)


def card_tiling(device: torch.device | str, key: str = "triton_tiling") -> str:
    """The tiling (the forward's, or with ``key="triton_bwd_tiling"`` the backward's) the fused kernel runs
    on ``device`` outside :func:`kernel_variant`: the card's from the table."""
    return tiling_in(table(), card(device), key)


def tiling(device: torch.device | str, key: str = "triton_tiling") -> str:
    """The tiling the fused kernel runs now: :func:`kernel_variant`'s, else :func:`card_tiling`."""
    return _VARIANT["bwd_tiling" if key == "triton_bwd_tiling" else "tiling"] or card_tiling(device, key)


def select() -> int:
    """The fused forward's SELECT constexpr now (:func:`kernel_variant`'s select)."""
    return SELECTS[_VARIANT["select"]]


def write_row(card_name: str, row: dict, path: Path | None = None) -> Path:
    """Merge ``row`` (``{op: entry}``, a benchmark's ``--table-row``) into ``card_name``'s row of the table
    at ``path`` (default: the shipped one), checked first; the card's other ops keep their entries."""
    path = Path(str(TABLE)) if path is None else path
    data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("devices", {}).setdefault(card_name, {}).update(row)
    check_table(data, str(path))
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table.cache_clear()
    return path
