"""Typed configuration for MixedAE pretraining: dataclasses, YAML presets, CLI overrides, validation.

One schema (docs/architecture.md): a YAML file with the sections ``model``, ``mixing``, ``runtime``, ``data``,
``optim``, ``run``, ``dist`` (several processes) and ``init`` (the weights a run starts from), then
``--section.key=value`` overrides whose values are parsed as YAML. Every value that follows from the config
(N, n, K, the HC switches, the learning rate) is computed once, in :func:`derive`. Invalid values fail at
load with the field as ``section.key``, the value and what is allowed. No torch import here: the CLI checks
a config before it pays for torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import keyword
import math
import os
import re
import reprlib
import sys
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mixedae_fast import choices

# Allowed values of the enum-like fields (mixedae_fast/choices.py: a new backend is one more entry there).
CHOICES: dict[str, tuple[str, ...]] = {
    "mixing.ha": choices.HA_MODES,
    "mixing.hc_on": choices.HC_ON,
    "mixing.segment_embed": choices.SEGMENT_EMBED,
    "mixing.hc_form": choices.HC_FORMS,
    "runtime.attention_backend": choices.ATTENTION_BACKENDS,
    "runtime.kernels": choices.KERNEL_BACKENDS,
    "runtime.precision": choices.PRECISIONS,
    "data.backend": choices.DATA_BACKENDS,
    "data.format": choices.DATA_FORMATS,
    "data.labels": choices.DATA_LABELS,
    "data.verify": choices.DATA_VERIFY,
    "optim.optimizer": choices.OPTIMIZERS,
    "dist.backend": choices.DIST_BACKENDS,
    "dist.grad_comm": ("fp32", "bf16"),
}
ATTENTION_BACKENDS = choices.ATTENTION_BACKENDS
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# PyYAML (YAML 1.1) reads "1e-3" as a string; float fields accept such strings.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # newline, tab, escape...: never in a name or a path we write
_OVERRIDE = re.compile(r"(?:--)?([A-Za-z_]\w*)\.([A-Za-z_]\w*)=(.*)", re.S)


class ConfigError(ValueError):
    """An invalid config: the message names the field as ``section.key``, the value and what is allowed."""


class ConfigWarning(UserWarning):
    """A valid config with a setting that has no effect."""


@dataclass
class ModelConfig:
    img_size: int = 224  # S, input side in pixels
    patch_size: int = 16  # P; S % P == 0
    in_chans: int = 3  # image channels
    embed_dim: int = 768  # encoder width D (ViT-B)
    depth: int = 12  # encoder blocks
    num_heads: int = 12  # encoder attention heads; embed_dim % num_heads == 0
    decoder_embed_dim: int = 512  # MAE decoder: 8 blocks, 512 wide, 16 heads
    decoder_depth: int = 8  # decoder blocks (global attention)
    decoder_num_heads: int = 16  # decoder attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim, encoder and decoder


@dataclass
class MixingConfig:
    group_size: int = 4  # r, images mixed into one encoder sequence; r=1 is MAE's random masking
    mask_ratio: float = 0.75  # m; each source keeps n = int(N*(1-m)) positions, and r*n <= N
    ha: str = "topk"  # homologous attention: topk (recognition) | oracle (upper bound) | none (naive)
    ha_layers: list[int] | None = None  # blocks with HA; None = all; negative indices count from the end
    topk: int | None = None  # K patch keys kept per query (plus CLS); None = n
    hc_on: str = "attention"  # where the homologous contrastive loss acts: attention | head | tokens | both
    hc_weight: float = 1.0  # lambda_hc; 0 turns the loss off
    hc_tau: float = 0.2  # temperature of the head/tokens SupCon loss
    # the attention HC loss (mixedae_fast/model/hc.py); the defaults are the loss above
    hc_heads: int | None = 1  # the loss on heads 0 .. hc_heads-1 only (default: head 0); null = every head
    hc_form: str = "infonce"  # infonce (one positive set) | supcon (each same-source key pulled up)
    segment_embed: str = "none"  # encoder = learned per-slot embedding; leaks the grouping (ablation)
    norm_pix_loss: bool = True  # per-patch normalised pixel targets, as MAE


@dataclass
class RuntimeConfig:
    attention_backend: str = "auto"  # how attention computes; auto = as runtime.kernels chooses, else this backend
    kernels: str = "auto"  # Triton kernels (mixing ops, fused TopK attention): auto = where measured.json says faster
    compile: bool = False  # torch.compile the model
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch's CPU threads; 0 = auto: the CPUs this process may use (affinity mask, cgroup quota), or
    # OMP_NUM_THREADS when set
    threads: int = 0


@dataclass
class DataConfig:
    backend: str = "auto"  # auto | dali | torch | embedded (in memory, no files; synthetic: its old name)
    path: str | None = None  # training images; None = the embedded default data
    format: str = "imagefolder"  # imagefolder | filelist | webdataset
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    batch_size: int = 256  # images per rank and micro-step; a multiple of mixing.group_size
    num_workers: int = 4  # loader processes decoding images (torch loader) / DALI CPU threads
    val_path: str | None = None  # evaluation images; None = the embedded default val set
    # auto: labels where the format has them (class folders, list labels, .cls); none: training data
    # needs no labels (any folder tree of images, a list of paths, shards without .cls); val stays labelled
    labels: str = "auto"
    # webdataset: samples in all shards (needed for remote/pipe: shards; local ones are counted)
    epoch_size: int | None = None
    # check images decode before step 1 (cached per file): full | sample (a seeded 1%, >= 1,000: estimates
    # the bad rate at ImageNet scale in seconds) | off; the rate is printed so the full cost is known
    verify: str = "full"
    # webdataset shards stream unchecked: an unreadable sample (not an image, cut short, no image member) is
    # skipped and listed with its shard and key in <run>/skipped_images.json; past this fraction of the samples
    # read in an epoch (judged over at least 1,000 while it runs) the run stops; 0 = stop at the first one
    max_bad_fraction: float = 0.01


@dataclass
class OptimConfig:
    optimizer: str = "auto"  # auto = apex FusedAdam when importable, else fused torch AdamW
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256 unless lr is set
    lr: float | None = None  # absolute peak lr; overrides base_lr
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.05  # AdamW decoupled weight decay; none on biases and norms
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (MAE's)
    warmup_epochs: float = 40.0  # linear warm-up from 0 to the peak lr, per step
    epochs: int = 400  # schedule length: the cosine reaches min_lr at the end of the last epoch
    accum_steps: int = 1  # gradient accumulation micro-steps per optimizer step
    clip_grad: float | None = None  # max grad norm; None = no clipping
    max_nan_steps: int = 10  # consecutive non-finite steps before the run stops


@dataclass
class RunConfig:
    name: str = "mixedae"  # run directory: <out_dir>/<name>
    out_dir: str = "runs"  # parent folder of the run directories
    seed: int = 0  # keys the assignment, the augmentation and the init: same seed, same run
    log_every: int = 50  # optimizer steps between metrics rows (metrics.csv, loggers, the log line)
    ckpt_every: int = 1000  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept
    resume: str = "none"  # none | auto (latest in the run directory) | <checkpoint path> | https:// URL of one
    # resume although optimiser settings changed (lr, clip_grad, max_nan_steps, ...; checkpoint.OVERRIDABLE):
    # a deliberate choice, logged (what one does after a NaN stop); model, mixing and data stay fixed
    resume_override: bool = False
    eval: bool = True  # kNN / probe evaluation at the end
    vis_every: int = 0  # steps between pictures (to run.loggers' TensorBoard/W&B, else PNGs in pictures/); 0 = none
    # where scalars and pictures go besides metrics.csv (always written): csv | tensorboard | wandb
    # (tensorboard and wandb: pip install 'mixedae_fast[log]'; wandb offline unless logged in)
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    # epochs between kNN monitors (top-1 of the encoder on the first batches of the bank and val; to the
    # console line and run.loggers as monitor/knn); 0 = off
    monitor_every: int = 0
    wandb_project: str | None = None  # W&B project (unset: $WANDB_PROJECT, else mixedae_fast)
    wandb_entity: str | None = None  # W&B entity, a user or team (unset: $WANDB_ENTITY, else the login's default)
    profile_steps: str | None = None  # "A:B": trace optimizer steps A..B with torch.profiler into <run>/profile/


@dataclass
class DistConfig:
    """Several processes (torchrun / SLURM; see mixedae_fast/train/distributed.py). No effect on one process."""

    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    # a collective that waits longer fails the job (a dead or stalled rank); it must exceed the longest
    # pause of rank 0 alone (a checkpoint save)
    timeout_s: float = 600.0
    grad_comm: str = "fp32"  # fp32 | bf16: gradients all-reduced in bf16 (a DDP comm hook), half the bytes
    bucket_mb: float = 25.0  # DDP bucket size: each bucket is all-reduced while backward goes on


@dataclass
class InitConfig:
    """The weights a new run starts from (mixedae_fast/train/init_weights.py); a resumed run takes its checkpoint's.
    The key is ``init.from`` (the field ``from_``: ``from`` is a Python keyword)."""

    from_: str | None = None  # None = MAE's random init; else a checkpoint file or https:// URL (MAE's official
    #   layout, its decoder too where it has one, or one of ours), timm:NAME (timm's pretrained weights) or a
    #   timm local-dir:/hf-hub: folder (an export of ours); the encoder must have the config's sizes


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def derive(self, world_size: int = 1) -> Derived:
        return derive(self, world_size)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


@dataclass(frozen=True)
class Derived:
    """Values that follow from a validated config; computed only by :func:`derive`."""

    grid: int  # S // P patches per side
    num_patches: int  # N
    patch_dim: int  # P*P*C values per patch
    n_visible: int  # n = int(N * (1 - m)) positions per source (int as MAE, not round)
    encoder_len: int  # 1 + r*n tokens per group sequence (CLS first)
    num_groups_per_rank: int  # G = batch_size // r per rank and micro-step
    topk: int  # K
    ha_layers: tuple[int, ...]  # resolved, sorted, unique block indices; () when ha == none
    hc_attention: bool  # HC InfoNCE on the attention logits of the HA blocks
    hc_features: bool  # HC SupCon on the projection head / the tokens
    hc_active: bool  # hc_attention or hc_features
    world_size: int
    global_batch: int  # batch_size * world_size * accum_steps images per optimizer step
    lr: float  # optim.lr, else base_lr * global_batch / 256


def _resolve_ha_layers(mixing: MixingConfig, depth: int) -> tuple[int, ...]:
    return choices.resolve_ha_layers(mixing.ha, mixing.ha_layers, depth)


def _hc_flags(mixing: MixingConfig, ha_layers: tuple[int, ...]) -> tuple[bool, bool]:
    return choices.hc_flags(mixing.hc_weight, mixing.group_size, mixing.hc_on, mixing.ha, ha_layers)


def derive(cfg: Config, world_size: int = 1) -> Derived:
    """All derived values, in one place. ``cfg`` must be validated."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size = {world_size!r}: must be an int >= 1")
    m, x = cfg.model, cfg.mixing
    grid = m.img_size // m.patch_size
    num_patches = grid * grid
    n = choices.n_visible(num_patches, x.mask_ratio)
    ha_layers = _resolve_ha_layers(x, m.depth)
    hc_attention, hc_features = _hc_flags(x, ha_layers)
    global_batch = cfg.data.batch_size * world_size * cfg.optim.accum_steps
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * global_batch / 256
    return Derived(
        grid=grid, num_patches=num_patches, patch_dim=m.patch_size**2 * m.in_chans, n_visible=n,
        encoder_len=1 + x.group_size * n, num_groups_per_rank=cfg.data.batch_size // x.group_size,
        topk=n if x.topk is None else x.topk, ha_layers=ha_layers, hc_attention=hc_attention,
        hc_features=hc_features, hc_active=hc_attention or hc_features, world_size=world_size,
        global_batch=global_batch, lr=lr,
    )


# ---------------------------------------------------------------- types, dicts, YAML

def config_key(attr: str) -> str:
    """The config key of a dataclass field: ``from_`` is ``from`` (a keyword cannot name a field)."""
    return attr[:-1] if attr.endswith("_") and keyword.iskeyword(attr[:-1]) else attr


def _attr(key: str) -> str:
    return f"{key}_" if keyword.iskeyword(key) else key


@functools.cache
def _field_types(cls: type) -> dict[str, typing.Any]:
    """``{config key: type}`` of a section's dataclass."""
    return {config_key(k): v for k, v in typing.get_type_hints(cls).items()}


def _type_name(tp: typing.Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _coerce(key: str, value: typing.Any, tp: typing.Any) -> typing.Any:
    """``value`` as type ``tp``: bool is not an int, an int is a float, a list becomes a tuple."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            for arg in args:
                if arg is not type(None):
                    try:
                        return _coerce(key, value, arg)
                    except ConfigError:
                        pass
        elif origin in (list, tuple) and isinstance(value, (list, tuple)):
            if origin is list:
                return [_coerce(key, v, args[0]) for v in value]
            if len(value) == len(args):
                return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
        elif tp is bool and isinstance(value, bool):
            return value
        elif tp is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        elif tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
        elif tp is str and isinstance(value, str):
            return value
    except ConfigError:
        pass
    raise ConfigError(f"{key} = {reprlib.repr(value)}: expected {_type_name(tp)}, got {type(value).__name__}; "
                      f"write it as {_type_name(tp)} (in the YAML file or as --{key}=VALUE)")


def _unknown(what: str, name: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown {what} '{name}'{hint} (valid: {', '.join(valid)})")


def _check_key(section: str, key: str | None = None) -> None:
    if section not in SECTIONS:
        raise _unknown("section", section, list(SECTIONS))
    names = list(_field_types(SECTIONS[section]))
    if key is not None and key not in names:
        raise _unknown("key", f"{section}.{key}", [f"{section}.{k}" for k in names])


# Keys that once existed, with the value that meant "off": research variants of the HC loss that lost to
# MAE mode on both data sets of the 2026-11-30 studies (docs/study.md) and left the product. A stored
# config (a run's config.yaml, a checkpoint) holding one at that value loads as it always did; any other
# value, or an override, is refused: that run needs the version that still trained it.
REMOVED_KEYS: dict[str, typing.Any] = {
    "mixing.hc_margin": 1.0, "mixing.hc_grad": "full", "mixing.hc_select": "attention",
    "mixing.hc_select_dim": 16, "mixing.topk_self": False,
}
REMOVED_VALUES: dict[str, tuple] = {"mixing.hc_form": ("hinge",)}
LAST_WITH_REMOVED = "01c425d"  # the last commit that trains them


def _removed(what: str) -> ConfigError:
    return ConfigError(f"{what}: this HC variant was removed (it lost to MAE mode on both study data sets, "
                       f"docs/study.md); to train, evaluate or resume a run that used it, check out git "
                       f"{LAST_WITH_REMOVED}, else drop the setting")


def drop_removed_keys(d: typing.Mapping[str, typing.Any]) -> dict[str, typing.Any]:
    """``d`` (nested config mappings) without the :data:`REMOVED_KEYS` that hold their "off" value; a
    ConfigError naming the first removed key or value that was on."""
    out = {}
    for section, values in d.items():
        if not isinstance(values, typing.Mapping):
            out[section] = values
            continue
        kept = {}
        for key, value in values.items():
            name = f"{section}.{key}"
            if name in REMOVED_KEYS:
                if value != REMOVED_KEYS[name]:
                    raise _removed(f"{name} = {value!r}")
                continue
            if value in REMOVED_VALUES.get(name, ()):
                raise _removed(f"{name} = {value!r}")
            kept[key] = value
        out[section] = kept
    return out


def config_from_dict(d: typing.Mapping[str, typing.Any] | None) -> Config:
    """A validated :class:`Config` from nested mappings (missing sections/keys take their defaults)."""
    d = d or {}
    if not isinstance(d, typing.Mapping):
        raise ConfigError(f"a config must be a mapping of sections (model:, data:, optim:, ...), got "
                          f"{type(d).__name__}; write one section per line with its keys indented under it")
    d = drop_removed_keys(d)
    sections = {}
    for section, values in d.items():
        _check_key(str(section))
        values = values or {}
        if not isinstance(values, typing.Mapping):
            raise ConfigError(f"section '{section}' = {reprlib.repr(values)}: must be a mapping of keys; write its "
                              f"settings as 'key: value' lines indented under '{section}:'")
        for key in values:
            _check_key(section, str(key))
        sections[section] = SECTIONS[section](**{_attr(k): v for k, v in values.items()})
    return validate(Config(**sections))


def config_to_dict(cfg: Config) -> dict[str, dict[str, typing.Any]]:
    """Plain YAML-safe nested dict (tuples as lists)."""
    plain = lambda v: [plain(i) for i in v] if isinstance(v, (list, tuple)) else v
    return {s: {config_key(k): plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in SECTIONS}


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path


def presets_dir():
    """The YAML presets: package data once installed, else ``<repo>/configs``."""
    try:
        from importlib.resources import files

        found = files("mixedae_fast.configs")
        if any(p.name.endswith(".yaml") for p in found.iterdir()):
            return found
    except (ImportError, TypeError, FileNotFoundError):
        pass
    return Path(__file__).resolve().parent.parent / "configs"


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in presets_dir().iterdir() if p.name.endswith(".yaml"))


def _read_config_text(config: str | os.PathLike) -> tuple[str, str]:
    s = os.fspath(config)
    if isinstance(config, os.PathLike) or _is_file_ref(s):
        if not Path(s).is_file():
            raise ConfigError(f"config file {s}: no such file; pass the path of an existing YAML file or a preset "
                              f"name ({', '.join(available_presets())})")
        return Path(s).read_text(encoding="utf-8"), s
    preset = presets_dir().joinpath(f"{s}.yaml")
    if not preset.is_file():
        raise _unknown("preset", s, available_presets())
    return preset.read_text(encoding="utf-8"), f"preset {s}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one section (line {key_node.start_mark.line + 1}); "
                                  "YAML keeps only the last one: remove one of them")
            try:
                seen.add(key)
            except TypeError:
                pass  # an unhashable key: SafeLoader refuses it itself
        return super().construct_mapping(node, deep=deep)


    def get_single_node(self):
        # aliases share one node, so a few hundred bytes can stand for billions of values ("billion
        # laughs"); count the document as if every alias were written out, and refuse it before building it
        node = super().get_single_node()
        size, sizes = 0, {}
        for n in _postorder(node):
            children = n.value if isinstance(n, yaml.SequenceNode) else (
                [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else [])
            # a node not yet sized is an alias to an ancestor (a cycle): endless once written out
            sizes[id(n)] = size = 1 + sum(sizes.get(id(c), _MAX_EXPANDED_NODES) for c in children)
            if size > _MAX_EXPANDED_NODES:
                raise ConfigError(f"the YAML expands to more than {_MAX_EXPANDED_NODES} values through its aliases "
                                  f"(*name, line {n.start_mark.line + 1}); a config is far smaller: write the "
                                  "values out or use fewer nested aliases")
        return node


_MAX_EXPANDED_NODES = 100_000


def _postorder(root):
    """Each distinct node of a composed YAML graph once, children before parents (no recursion: a config
    may nest deeply)."""
    seen, order, stack = set(), [], [(root, False)]
    while stack:
        n, done = stack.pop()
        if done:
            order.append(n)
            continue
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.append((n, True))
        if isinstance(n, yaml.SequenceNode):
            stack.extend((c, False) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            stack.extend((c, False) for pair in n.value for c in pair)
    return order


def safe_load_unique(text: str):
    """``yaml.safe_load`` that refuses duplicate keys (ConfigError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def apply_override(d: dict[str, typing.Any], item: str) -> None:
    """Apply ``--section.key=value`` (or ``section.key=value``) to nested dict ``d``; value is YAML."""
    match = _OVERRIDE.fullmatch(item.strip())
    if not match:
        raise ConfigError(f"override {item!r} is not of the form --section.key=value; write it as, e.g., "
                          "--optim.epochs=10 (the value is read as YAML)")
    section, key, raw = match.groups()
    if f"{section}.{key}" in REMOVED_KEYS:
        raise _removed(f"--{section}.{key}")
    _check_key(section, key)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    tp = _field_types(SECTIONS[section])[key]
    # a str field (or str | None): the value as typed; a list[str] field still parses as a YAML list
    accepts_str = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))
    if accepts_str and value is not None and not isinstance(value, str):
        value = raw  # --run.name=2024 is the name "2024"
    if accepts_str and isinstance(value, str) and raw[:1] not in ("'", '"'):
        value = raw  # as typed: YAML would cut " #..." as a comment and fold a newline (validation refuses it)
    if not isinstance(d.get(section), dict):
        d[section] = dict(d.get(section) or {})
    d[section][key] = value


def load_config(config: str | os.PathLike | None = "cpu_tiny", overrides: Sequence[str] = ()) -> Config:
    """Load a preset name (``cpu_tiny``) or YAML path (None = dataclass defaults), apply overrides,
    validate. A YAML file may start from a preset or another file with ``base: <preset or path>`` (a
    relative path is relative to the file): its sections are merged key by key over the base's."""
    d: dict[str, typing.Any] = {} if config is None else _load_dict(config)
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        apply_override(d, item)
    return config_from_dict(d)


def _load_dict(config: str | os.PathLike, chain: tuple[str, ...] = ()) -> dict[str, typing.Any]:
    text, source = _read_config_text(config)
    if source in chain:
        raise ConfigError(f"{source}: its base chain comes back to itself ({' -> '.join([*chain, source])}); "
                          "remove one of the base: lines")
    try:
        d = safe_load_unique(text) or {}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML{_yaml_where(e)}: {_yaml_problem(e)}; fix that line (a config "
                          "is 'key: value' lines indented under their section)") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the top level is a {type(d).__name__}, not a mapping of sections; write "
                          "'section:' lines (model:, data:, optim:, ...) with their keys indented under them")
    base = d.pop("base", None)
    if base is None:
        return d
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{source}: base = {base!r}: must name a preset ({', '.join(available_presets())}) or a "
                          "YAML file")
    if _is_file_ref(base) and not os.path.isabs(os.path.expanduser(base)) and not source.startswith("preset "):
        base = str(Path(os.fspath(config)).parent / base)
    merged = _load_dict(base, (*chain, source))
    for section, values in d.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's reason on one line (its message spans several, with the offending text drawn)."""
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    context, mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and mark is not None:
        problem += f" ({context} that starts at line {mark.line + 1})"
    return problem


def _is_file_ref(config: str) -> bool:
    return config.endswith((".yaml", ".yml")) or os.sep in config or "/" in config


# ---------------------------------------------------------------- validation

_GT0, _GE0 = (lambda v: v > 0, "must be > 0"), (lambda v: v >= 0, "must be >= 0")
_GE1 = (lambda v: v >= 1, "must be >= 1")
# Range of each field on its own: key -> (predicate, what is allowed). Relations are in validate().
_RULES: dict[str, tuple[typing.Callable[[typing.Any], typing.Any], str]] = {
    **{key: (lambda v, c=c: v in c, f"must be one of {', '.join(c)}") for key, c in CHOICES.items()},
    **{f"model.{f.name}": _GT0 for f in dataclasses.fields(ModelConfig)},
    "mixing.group_size": _GE1, "mixing.hc_tau": _GT0, "mixing.hc_weight": _GE0,
    "mixing.mask_ratio": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "runtime.device": (_DEVICE.fullmatch, "must be auto, cpu, cuda or cuda:N"),
    "data.crop_scale": (lambda v: 0 < v[0] <= v[1] <= 1, "must be [lo, hi] with 0 < lo <= hi <= 1"),
    "data.batch_size": _GE1, "data.num_workers": _GE0, "runtime.threads": _GE0,
    "data.epoch_size": (lambda v: v is None or v >= 1, "must be >= 1 (samples in all shards), or null"),
    "data.max_bad_fraction": (lambda v: 0 <= v <= 1, "must be in [0, 1] (0 = stop at the first unreadable sample)"),
    "optim.base_lr": _GT0, "optim.min_lr": _GE0, "optim.weight_decay": _GE0, "optim.warmup_epochs": _GE0,
    "optim.lr": (lambda v: v is None or v > 0, "must be > 0, or null to derive it from optim.base_lr"),
    "optim.betas": (lambda v: all(0 <= b < 1 for b in v), "each must be in [0, 1)"),
    "optim.clip_grad": (lambda v: v is None or v > 0, "must be > 0 or null (no clipping)"),
    **dict.fromkeys(["optim.epochs", "optim.accum_steps", "optim.max_nan_steps", "run.log_every",
                     "run.ckpt_every", "run.keep_last"], _GE1),
    "run.resume": (lambda v: bool(v) and not _CONTROL.search(v), "must be none, auto, a checkpoint path or an "
                   "https:// URL of one"),
    "init.from": (lambda v: v is None or (v.strip() and not _CONTROL.search(v)), "must be null (random init), a "
                  "checkpoint path or https:// URL, timm:NAME, local-dir:FOLDER or hf-hub:USER/REPO"),
    "run.name": (lambda v: _safe_name(v), "must be one folder name: not empty, '.' or '..', without '/', '\\' "
                 "or control characters (it becomes <run.out_dir>/<run.name>)"),
    "run.out_dir": (lambda v: bool(v) and not _CONTROL.search(v), "must be a folder path without control "
                    "characters (newlines, tabs, ...)"),
    "dist.timeout_s": _GT0, "dist.bucket_mb": _GT0,
    "run.vis_every": (lambda v: v >= 0, "must be >= 0 (0 = no pictures during training)"),
    "run.monitor_every": (lambda v: v >= 0, "must be >= 0 (epochs between kNN monitors; 0 = off)"),
    "run.loggers": (lambda v: all(x in ("csv", "tensorboard", "wandb") for x in v),
                    "must be a list of csv, tensorboard, wandb, e.g. [csv, tensorboard]"),
    "run.profile_steps": (lambda v: v is None or _profile_window(v), "must be 'A:B' with 1 <= A <= B (optimizer "
                          "steps to trace), or null"),
}


def _profile_window(spec: str) -> bool:
    a, sep, b = str(spec).partition(":")
    return bool(sep) and a.strip().isdigit() and b.strip().isdigit() and 1 <= int(a) <= int(b)


def check_backend_on(cfg: Config, device_type: str) -> None:
    """The attention backend runs on the device the run got (``runtime.device=auto`` resolves to cpu on a
    machine without CUDA, where xformers and flex cannot train)."""
    backend = cfg.runtime.attention_backend
    if device_type == "cpu" and backend in ("xformers", "flex"):
        raise ConfigError(f"runtime.attention_backend = {backend!r} with runtime.device = {cfg.runtime.device!r} "
                          "on the CPU: " + ("xformers has no CPU operators" if backend == "xformers" else
                                            "torch has no FlexAttention backward on CPU")
                          + "; use auto, sdpa or eager on CPU")


def _safe_name(name: str) -> bool:
    return name not in ("", ".", "..") and not any(c in name for c in "/\\") and not _CONTROL.search(name)


def check_resume_target(cfg: Config) -> None:
    """``run.resume`` names a checkpoint that exists (checked when a run starts, not in :func:`validate`: a
    trained run's config.yaml stays loadable after the file it resumed from is gone)."""
    resume = cfg.run.resume
    if resume.startswith(("https://", "http://")):
        return  # downloaded when the run starts (checkpoint.download_checkpoint)
    if resume not in ("none", "auto") and not Path(resume).expanduser().is_file():
        what = "a folder" if Path(resume).expanduser().is_dir() else "no such file"
        raise ConfigError(f"run.resume = {resume!r}: {what}; use none, auto (the newest checkpoint of the run "
                          "folder), the path of a checkpoint file (runs/<name>/checkpoints/ckpt-*.pt) or an "
                          "https:// URL of one")


def validate(cfg: Config) -> Config:
    """Check types (normalising lists to tuples, ints to floats) and ranges; raise one ConfigError
    listing every problem. Warns (ConfigWarning) about settings that have no effect."""
    errors: list[str] = []
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        for key, tp in _field_types(cls).items():
            name = f"{section}.{key}"
            try:
                value = _coerce(name, getattr(obj, _attr(key)), tp)
            except ConfigError as e:
                errors.append(str(e))
                continue
            setattr(obj, _attr(key), value)
            if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple)
                                                                           else (value,))):
                errors.append(f"{name} = {value!r}: must be finite (NaN or infinity would only fail later, as "
                              "non-finite weights)")
                continue
            ok, allowed = _RULES.get(name, (None, ""))
            if ok is not None and not ok(value):
                errors.append(f"{name} = {value!r}: {allowed}")
    if errors:
        raise ConfigError(_join(errors))

    # Relations between fields; every size is known to be positive here.
    m, x, b = cfg.model, cfg.mixing, cfg.data.batch_size
    for a, per, what in ((m.img_size, m.patch_size, "img_size % patch_size"),
                         (m.embed_dim, m.num_heads, "embed_dim % num_heads"),
                         (m.decoder_embed_dim, m.decoder_num_heads, "decoder_embed_dim % decoder_num_heads")):
        if a % per:
            errors.append(f"model.{what} = {a} % {per} = {a % per}: must be 0")
    r, big_n = x.group_size, (m.img_size // m.patch_size) ** 2
    n = choices.n_visible(big_n, x.mask_ratio)
    if n < 1:
        errors.append(f"mixing.mask_ratio = {x.mask_ratio!r}: leaves n_visible = int({big_n} * "
                      f"(1 - {x.mask_ratio})) = {n}; lower it so that n_visible >= 1")
    elif n == big_n:
        errors.append(f"mixing.mask_ratio = {x.mask_ratio!r}: keeps all {big_n} patches visible, so no patch is "
                      "left to reconstruct and the loss is 0/0 = NaN; raise mixing.mask_ratio (MAE: 0.75)")
    elif r * n > big_n:
        errors.append(f"mixing.group_size * n_visible = {r} * {n} = {r * n} > num_patches = {big_n}: "
                      f"raise mixing.mask_ratio to >= {1 - 1 / r:.4g} or lower mixing.group_size "
                      f"to <= {big_n // n}")
    if b % r:
        near = " or ".join(str(v) for v in (b // r * r, b // r * r + r) if v > 0)
        errors.append(f"data.batch_size = {b}: must be a multiple of mixing.group_size = {r}; "
                      f"nearest valid: {near}")
    bad = [i for i in x.ha_layers or () if not -m.depth <= i < m.depth]
    if bad:
        errors.append(f"mixing.ha_layers = {x.ha_layers!r}: indices {bad} out of range for model.depth = "
                      f"{m.depth}; allowed [{-m.depth}, {m.depth})")
    if x.topk is not None and n >= 1 and not 1 <= x.topk <= r * n:
        errors.append(f"mixing.topk = {x.topk!r}: must be in [1, group_size * n_visible] = [1, {r * n}], "
                      f"or null (= n_visible = {n})")
    backend = cfg.runtime.attention_backend
    if cfg.runtime.device == "cpu":
        try:
            check_backend_on(cfg, "cpu")
        except ConfigError as e:
            errors.append(str(e))
    fused = ("runtime.attention_backend = 'triton'" if backend == "triton" else
             "runtime.kernels = 'triton' (with runtime.attention_backend = 'auto')"
             if backend == "auto" and cfg.runtime.kernels == "triton" else None)
    if fused and x.ha == "topk" and 1 + r * n > choices.TRITON_TOPK_MAX_SEQ:
        errors.append(f"{fused}: the fused TopK kernel takes sequences of <= "
                      f"{choices.TRITON_TOPK_MAX_SEQ} "
                      f"tokens, this config makes 1 + group_size * n_visible = {1 + r * n}; use flex, sdpa or eager")
    if errors:
        raise ConfigError(_join(errors))
    problems = choices.hc_problems(x.hc_weight, r, x.hc_on, x.ha, _resolve_ha_layers(x, m.depth), x.hc_heads,
                                   m.num_heads, n)
    if problems:
        raise ConfigError(_join([f"mixing.{name} = {getattr(x, name)!r}: {why}"
                                 for name, (_, why) in problems.items()]))
    ignored = choices.hc_ignored(x.hc_weight, r, x.hc_on, x.ha, _resolve_ha_layers(x, m.depth))
    if ignored:
        level, frame = 1, sys._getframe()  # point the warning at the caller outside this module
        while frame is not None and frame.f_code.co_filename == __file__:
            level, frame = level + 1, frame.f_back
        warnings.warn(f"mixing.hc_weight = {x.hc_weight} partly or wholly ignored: {'; '.join(ignored)} "
                      f"(got ha={x.ha}, group_size={r})", ConfigWarning, stacklevel=level)
    return cfg


def _join(errors: list[str]) -> str:
    """The problems as one line: the CLI prints each failure as one ``error:`` line."""
    return errors[0] if len(errors) == 1 else f"{len(errors)} config errors: " + "; ".join(
        f"({i}) {e}" for i, e in enumerate(errors, 1))
