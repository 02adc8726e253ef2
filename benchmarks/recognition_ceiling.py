"""How much homologous recognition a network learns when recognition is all it is trained for.

    python -m mixedae_fast.benchmarks.recognition_ceiling --dataset embedded --steps 6000 --out r.json

MixedAE's TopK selection can only keep same-source keys as far as a patch's features say where it
came from. This measures how far that goes at a step budget, with nothing else competing for the
network: on the same data, augmentation, mixing (the model's own assignment and ``patch_mix``) and
batch as a pretraining run of ``--config``, two recognisers are trained with a SupCon loss (positives:
the group's patches of the same source, temperature ``--tau``) and nothing else:

- ``content``: each mixed patch alone — the patch embedding plus its position's embedding, then an
  MLP (no attention): what one patch's pixels and position tell;
- ``context``: the config's encoder with global attention (``ha = none``, the same width and depth)
  and a projection head on its output tokens: what a patch and the rest of the mixed image tell.

At each step of ``--eval-at`` the recognisers' *recognition* is measured on the val images (fixed
assignments) as the trainer logs it for a TopK block (docs/method.md §4): each query keeps its K = n
most similar patch keys (cosine similarity of the output features, itself included), and recognition
is the fraction of the kept keys other than itself that share its source; chance is ``(n−1)/(r·n−1)``.
A MixedAE run's recognition at the same step budget can be read against these figures: the TopK
blocks learn recognition *while* learning to reconstruct, from the same tokens.

The result (JSON; a Markdown table beside it with ``--out``) carries machine, date, command and git SHA.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixedae_fast.benchmarks.common import batches, result_head

RECOGNISERS = ("content", "context")


class ContentRecogniser(nn.Module):
    """One patch and its position -> a feature: patch embedding + position embedding, then an MLP."""

    def __init__(self, patch_dim: int, pos_embed: torch.Tensor, dim: int, out_dim: int = 128):
        super().__init__()
        self.embed = nn.Linear(patch_dim, dim)
        self.register_buffer("pos_embed", pos_embed.clone())  # [N, dim], the encoder's sin-cos table
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out_dim))

    def forward(self, mixed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(mixed) + self.pos_embed[ids.long()]
        return self.head(x + self.mlp(x))


class ContextRecogniser(nn.Module):
    """The config's encoder with global attention, and a projection head on its patch tokens."""

    def __init__(self, model, out_dim: int = 128):
        super().__init__()
        self.model = model
        dim = model.pos_embed.shape[-1]
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out_dim))

    def forward(self, mixed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        latent, _ = self.model.forward_encoder(mixed, ids)
        return self.head(latent[:, 1:])


def recognition(features: torch.Tensor, src: torch.Tensor, topk: int) -> torch.Tensor:
    """``features [G, M, C]``, ``src [M]`` -> per-group recognition ``[G]``: each query keeps its ``topk``
    most cosine-similar tokens (itself included, K-th value ties kept); the fraction of the kept tokens
    other than itself that share its source, over the group's queries."""
    from mixedae_fast.kernels.homologous_attention import topk_keep_mask

    z = F.normalize(features.float(), dim=-1)
    sim = z @ z.transpose(-2, -1)
    M = sim.shape[-1]
    eye = torch.eye(M, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye, float("inf"))       # itself always kept, as cosine 1 would keep it (ties aside)
    others = topk_keep_mask(sim, topk) & ~eye
    same = (src[:, None] == src[None, :]).expand_as(others)
    return ((others & same).sum(-1).float() / others.sum(-1).clamp_min(1).float()).mean(-1)


def build(cfg, name: str, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """``(recogniser name, the config's model)``: the model mixes the batches (assignment and
    ``patch_mix`` use none of its weights); ``content`` takes its patch size and position table,
    ``context`` trains its encoder."""
    from mixedae_fast.model.mixedae import build_model

    model = build_model(cfg).to(device)
    if name == "content":
        return ContentRecogniser(model.patch_dim, model.pos_embed[0, 1:], model.pos_embed.shape[-1]).to(device), model
    return ContextRecogniser(model).to(device), model


def train_and_measure(cfg, name: str, train, val, steps: list[int], tau: float, device, progress=print) -> list[dict]:
    """Train recogniser ``name`` for ``max(steps)`` steps; recognition on ``val`` after each of ``steps``."""
    from mixedae_fast.model.losses import supcon_loss

    torch.manual_seed(cfg.run.seed)
    net, mixer = build(cfg, name, device)
    src = torch.arange(mixer.group_size, device=device).repeat_interleave(mixer.n_visible)
    params = [p for p in net.parameters() if p.requires_grad]
    # the config's lr rule for the batch one step sees (this loop does no accumulation across steps)
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * cfg.data.batch_size / 256
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    warmup = max(1, min(steps) // 4)
    r = mixer.group_size
    out, start, it = [], time.perf_counter(), (images for images, _ in batches(train))
    for step in range(1, max(steps) + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / warmup)
        images = next(it)
        ids = mixer.assign(images.shape[0] // r, seed=cfg.run.seed, step=step, device=device)
        mixed = mixer.mix(images, ids)[0]
        loss = supcon_loss(net(mixed, ids), src, tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in steps:
            rec, images = measure(net, mixer, val, src, device)
            out.append({"recogniser": name, "step": step, "recognition": round(rec, 4), "val_images": images,
                        "loss": round(loss.item(), 4),
                        "seconds": round(time.perf_counter() - start, 1)})
            progress(f"{name}: step {step}, recognition {rec:.3f}, loss {loss.item():.3f}, "
                     f"{time.perf_counter() - start:.0f} s")
    return out


@torch.no_grad()
def measure(net, mixer, val, src, device) -> tuple[float, int]:
    """``(mean recognition over the val groups, images used)``, assignments fixed by the batch index."""
    net.eval()
    total, groups = 0.0, 0
    val.set_epoch(0)
    for j, (images, _) in enumerate(val):
        G = images.shape[0] // mixer.group_size
        if G == 0:
            continue
        images = images[:G * mixer.group_size]
        ids = mixer.assign(G, seed=12345, step=j, device=device)
        per_group = recognition(net(mixer.mix(images, ids)[0], ids), src, mixer.topk)
        total, groups = total + per_group.sum().item(), groups + G
    net.train()
    return total / groups, groups * mixer.group_size


def markdown(result: dict) -> str:
    rows = result["rows"]
    steps = sorted({r["step"] for r in rows})
    names = [n for n in RECOGNISERS if any(r["recogniser"] == n for r in rows)]
    at = {(r["recogniser"], r["step"]): r["recognition"] for r in rows}
    lines = ["| recogniser | " + " | ".join(f"step {s}" for s in steps) + " |",
             "| --- | " + " | ".join("---:" for _ in steps) + " |"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{at[(name, s)]:.3f}" for s in steps) + " |")
    return "\n".join(lines) + (
        f"\n\nRecognition on {result['dataset']} val ({result['val_images']} images), K = n = {result['topk']}, "
        f"chance {result['chance']:.3f}; config {result['config']}, batch {result['batch_size']}, SupCon τ "
        f"{result['tau']}. {result['date']}, git {result['git_sha']}, {result['machine']}, OMP_NUM_THREADS "
        f"{result['omp_num_threads']}.\n\nCommand: {result['command']}\n")


def main(argv=None) -> int:
    import os

    from mixedae_fast.config import derive, load_config
    from mixedae_fast.fsutil import atomic_write_text
    from mixedae_fast.study import DATASETS, data_folders
    from mixedae_fast.train.data import build_loaders

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cpu_tiny")
    p.add_argument("--dataset", default="embedded", choices=DATASETS)
    p.add_argument("--data-dir", default=None, help="a folder with train/ and val/ (ImageFolder); overrides --dataset")
    p.add_argument("--recognisers", default=",".join(RECOGNISERS), help="comma-separated: content, context")
    p.add_argument("--steps", type=int, default=6000, help="training steps of each recogniser (default 6000)")
    p.add_argument("--eval-at", default="624,1500,3000",
                   help="comma-separated steps to measure at besides --steps (default 624,1500,3000; 624 is "
                        "the study's budget on the embedded set)")
    p.add_argument("--tau", type=float, default=0.1, help="SupCon temperature (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="result JSON (a .md table is written beside it)")
    p.epilog = "Other arguments of the form --section.key=value override the config (e.g. --data.batch_size=64)."
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "." in o.split("=")[0])]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (config overrides take the form --section.key=value)")
    names = [s.strip() for s in args.recognisers.split(",") if s.strip()]
    if not names or any(n not in RECOGNISERS for n in names):
        p.error(f"--recognisers {args.recognisers!r}: give some of {', '.join(RECOGNISERS)}")
    steps = sorted({args.steps, *(int(s) for s in args.eval_at.split(",") if s.strip() and int(s) <= args.steps)})
    if steps[0] < 1:
        p.error(f"--steps {args.steps}, --eval-at {args.eval_at}: each must be >= 1")
    device = torch.device(args.device)
    base = load_config(args.config, [*overrides, f"--run.seed={args.seed}"])
    train_dir, val_dir, dataset = data_folders(args.dataset, args.data_dir, base.model.img_size)
    cfg = load_config(args.config, [*overrides, f"--run.seed={args.seed}", "--mixing.ha=none", "--mixing.hc_weight=0",
                                    f"--data.path={train_dir}", f"--data.val_path={val_dir}",
                                    "--data.format=imagefolder", "--data.backend=torch"])
    loaders = build_loaders(cfg, device, torch.float32, progress=False)
    derived = derive(cfg)
    r, n, topk = cfg.mixing.group_size, derived.n_visible, derived.topk
    # provenance (git SHA included) taken before training: the code this process loaded
    result = result_head("recognition_ceiling", device, ["python", "-m", "mixedae_fast.benchmarks.recognition_ceiling"],
                         argv, dataset=dataset, config=args.config, batch_size=cfg.data.batch_size, group_size=r,
                         topk=topk, chance=(n - 1) / (r * n - 1), tau=args.tau, seed=args.seed,
                         omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    rows = []
    for name in names:
        rows += train_and_measure(cfg, name, loaders.train, loaders.val, steps, args.tau, device)
    result.update(val_images=rows[0]["val_images"], rows=rows)
    text = json.dumps(result, indent=1)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
        atomic_write_text(out.with_suffix(".md"), markdown(result))
        print(out)
    else:
        print(text)
    return 0 if all(math.isfinite(r["recognition"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
