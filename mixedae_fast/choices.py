"""The allowed values of every enum-like setting, and the fixed limits the config checks against: each
defined here once and imported by the config (which validates with them) and by the modules that
act on them. Imports nothing, so every layer may import it (kernels and pipelines included)."""

HA_MODES = ("topk", "oracle", "none")                 # mixing.ha: recognition | upper bound | naive mixing
HC_ON = ("attention", "head", "tokens", "both")       # mixing.hc_on: where the HC loss acts
HC_FORMS = ("infonce", "supcon")                      # mixing.hc_form: the row terms of kernels' hc_row_terms
SEGMENT_EMBED = ("none", "encoder")                   # mixing.segment_embed
ATTENTION_BACKENDS = ("auto", "triton", "xformers", "sdpa", "flex", "eager")  # runtime.attention_backend
KERNEL_BACKENDS = ("auto", "triton", "torch")         # runtime.kernels (assignment, patch_mix, unmix)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")         # runtime.precision
# The embedded data set (pipelines/synthetic.py draws it): its name wherever a data set is named
# (make-data --dataset, study --dataset, data.backend), then its old spelling, still accepted so stored
# configs and scripts keep working; and its default size (training, validation images).
EMBEDDED = ("embedded", "synthetic")
EMBEDDED_NUM_TRAIN, EMBEDDED_NUM_VAL = 5000, 1000
OFFLINE_DATASETS = ("digits", "lfw", "photos")       # pipelines/offline.py: real images installable offline
DATA_BACKENDS = ("auto", "dali", "torch", *EMBEDDED)  # data.backend
DATA_FORMATS = ("imagefolder", "filelist", "webdataset")  # data.format
DATA_LABELS = ("auto", "none")                        # data.labels
DATA_VERIFY = ("full", "sample", "off")               # data.verify
OPTIMIZERS = ("auto", "torch", "apex")                # optim.optimizer
DIST_BACKENDS = ("auto", "nccl", "gloo")              # dist.backend

# The fused TopK kernel keeps a whole row of scores on chip: sequences (1 + r*n tokens) up to this long.
TRITON_TOPK_MAX_SEQ = 256


# -- what the mixing settings imply: config.derive and the model's constructor both compute with these --

def n_visible(num_patches: int, mask_ratio: float) -> int:
    """n, the positions each source keeps: ``int(N * (1 - m))`` (``int`` as MAE, not ``round``)."""
    return int(num_patches * (1 - mask_ratio))


def resolve_ha_layers(ha: str, ha_layers, depth: int) -> tuple[int, ...]:
    """The homologous-attention blocks: sorted unique indices (negative ones count from the end); () for
    ``ha = none``; every block for ``ha_layers`` None."""
    if ha == "none":
        return ()
    return tuple(sorted({i % depth for i in (range(depth) if ha_layers is None else ha_layers)}))


def hc_flags(hc_weight: float, group_size: int, hc_on: str, ha: str, ha_layers: tuple[int, ...]) -> tuple[bool, bool]:
    """``(attention, features)``: whether the HC loss acts on the attention logits (needs TopK blocks and
    r > 1) and on the projection head / tokens (needs r > 1)."""
    on = hc_weight > 0 and group_size > 1
    return (on and hc_on in ("attention", "both") and ha == "topk" and bool(ha_layers),
            on and hc_on in ("head", "tokens", "both"))


def hc_problems(hc_weight: float, group_size: int, hc_on: str, ha: str, ha_layers: tuple[int, ...], hc_heads,
                num_heads: int, n_visible: int) -> dict[str, tuple[object, str]]:
    """The HC settings' rules between fields, stated once: ``{setting: (value, what is wrong and the fix)}``,
    empty when they hold. ``config.validate`` reports them under the config's field names; the model's
    constructor, which may be called from Python without a config, raises them."""
    out: dict[str, tuple[object, str]] = {}
    if hc_heads is not None and not 1 <= hc_heads <= num_heads:
        out["hc_heads"] = (hc_heads, f"must be >= 1 and <= model.num_heads = {num_heads}, or null (every head)")
    if any(hc_flags(hc_weight, group_size, hc_on, ha, ha_layers)) and n_visible < 2:
        out["mask_ratio"] = (n_visible, f"the homologous contrastive loss needs n_visible >= 2 (a same-source "
                                        f"positive besides the query), got {n_visible}; lower mixing.mask_ratio "
                                        "or set mixing.hc_weight=0")
    return out


def hc_ignored(hc_weight: float, group_size: int, hc_on: str, ha: str, ha_layers: tuple[int, ...]) -> list[str]:
    """Why a requested HC loss does not act (empty when it acts as asked): the config's warning."""
    attention, features = hc_flags(hc_weight, group_size, hc_on, ha, ha_layers)
    out = []
    if hc_weight > 0 and hc_on in ("attention", "both") and not attention:
        out.append(f"hc_on={hc_on} (attention part) needs ha=topk, group_size > 1 and HA blocks")
    if hc_weight > 0 and hc_on in ("head", "tokens", "both") and not features:
        out.append(f"hc_on={hc_on} (head/tokens part) needs group_size > 1")
    return out
