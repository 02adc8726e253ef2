"""The config's documentation, generated from the dataclasses in config.py: one source.

Each field of a section dataclass is documented by its comment in config.py — the comment at the end
of its line, or comment lines directly above it. :func:`key_docs` reads them (with the field's type
and default) and :func:`describe_config` renders the list ``pretrain --help`` and ``config --help``
print. A test checks that every field has one. :func:`resolved_yaml` is what ``mixedae-fast config`` prints.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
from dataclasses import dataclass

import yaml

from mixedae_fast import config as C


@dataclass(frozen=True)
class KeyDoc:
    key: str        # section.key
    type: str       # as written in the dataclass
    default: object
    doc: str


def _continues(line: str) -> bool:
    """A comment line that continues the trailing comment of the field line above it: ``#   text``."""
    return line.strip().startswith("#  ")


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the class source: a field line's trailing comment (with the ``#   ``
    lines right below it), else the comment lines right above it."""
    source = inspect.getsource(cls)
    trailing = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT and not tok.line.strip().startswith("#")}
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    for i, line in enumerate(lines, start=1):
        name, colon, _ = line.strip().partition(":")
        if not colon or name.strip() not in names:
            continue
        if i in trailing:
            text, k = trailing[i], i
            while k < len(lines) and _continues(lines[k]):  # "#   more" lines below continue it
                text, k = f"{text} {lines[k].strip().lstrip('#').strip()}", k + 1
            comments[name.strip()] = text
            continue
        block, j = [], i - 1
        while j >= 1 and lines[j - 1].strip().startswith("#") and not _continues(lines[j - 1]):
            block.insert(0, lines[j - 1].strip().lstrip("#").strip())
            j -= 1
        if block:
            comments[name.strip()] = " ".join(block)
    return comments


def key_docs() -> list[KeyDoc]:
    """Every config key, section by section, in the dataclasses' order."""
    out = []
    for section, cls in C.SECTIONS.items():
        comments = _field_comments(cls)
        hints = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in hints.items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            doc = comments.get(name, "")
            choices = C.CHOICES.get(f"{section}.{name}")
            if choices and not all(c in doc for c in choices):
                doc = (doc + "; " if doc else "") + " | ".join(choices)
            out.append(KeyDoc(f"{section}.{C.config_key(name)}", tp, default, doc))
    return out


def describe_config(defaults=None, source: str | None = None) -> str:
    """The config keys as help text: ``section.key  type = default  description``, grouped by
    section. ``defaults``: a Config whose values are shown instead of the dataclass defaults (a preset),
    ``source`` what it was loaded from (``--config vit_base``)."""
    shown = ("the dataclass defaults" if defaults is None else source or "the default preset")
    lines = ["config keys (YAML sections; a YAML file may start with 'base: <preset or file>'; override any key with "
             f"--section.key=value, values parsed as YAML; values shown: {shown}):"]
    current = None
    for d in key_docs():
        section, key = d.key.split(".", 1)
        if section != current:
            current = section
            lines.append(f"  {section}:")
        value = getattr(getattr(defaults, section), C._attr(key)) if defaults is not None else d.default
        lines.append(f"    {d.key:<28} {d.type} = {value!r}")
        if d.doc:
            lines.append(f"        {d.doc}")
    return "\n".join(lines)


def resolved_yaml(cfg) -> str:
    """What ``mixedae-fast config`` prints: ``cfg`` as YAML (loadable with ``--config FILE``), then its derived
    values (:func:`~mixedae_fast.config.derive`) as a commented YAML block."""
    derived = yaml.safe_dump({"derived": {k: list(v) if isinstance(v, tuple) else v
                                          for k, v in vars(C.derive(cfg)).items()}}, sort_keys=False)
    return yaml.safe_dump(C.config_to_dict(cfg), sort_keys=False) + "".join(f"# {line}\n"
                                                                           for line in derived.splitlines())
