"""How a study evaluates: its data folders and splits, kNN / probe / few-shot of a run, the summary over
seeds, and what the runs show beyond the table (the kNN curve over training, the features in context,
transfer). Torch is imported inside functions, as in ``study.py`` (the command line starts fast).

The held-out split is a fixed part of the training folder, disjoint from the labelled bank that kNN,
probe and few-shot fit on (:func:`split_indices`); :func:`evaluate_run` scores both splits.

``mixedae-fast study ... --curve`` evaluates every checkpoint a run kept (keep them with
``--run.ckpt_every=N --run.keep_last=M``) with weighted kNN on the study's two splits, and reads the
training statistics the run logged (recognition, head overlap, the attention mass on the query's own
source, on other sources and on the class token) at the same steps: ``curve.md``, ``curve.json`` and
``curve.png`` in the study folder. It shows whether a variant plateaus early or falls behind late.

``--context`` measures what mixing does to a source's tokens: each run's final encoder, kNN of features
of the whole image, of only its visible patches alone, and of those patches inside a mixed group with the
run's own attention (:func:`context_features`): ``context.md`` / ``context.json``.

``--transfer digits,photos`` evaluates each run's final encoder, frozen, on other data sets (kNN, linear
probe, few-shot: the bank from the target's training folder, the table on its val split), and with
``--transfer-finetune-epochs E`` also fine-tunes it briefly on each (``mixedae-fast finetune``, its own
folder under the study's): ``transfer.md`` / ``transfer.json``.

Every evaluation is a file under ``<study>/results/{curve,context,transfer}/``, written
when it completes: a rerun skips what is there, so a long follow-up resumes.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mixedae_fast.choices import EMBEDDED
from mixedae_fast.errors import RunFailure

if TYPE_CHECKING:
    import torch

CONTEXTS = ("full", "alone", "mixed")  # see context_features
# columns of a run's metrics.csv the curve follows (absent for variants without TopK / HC)
CURVE_STATS = ("loss_rec", "recognition", "jaccard", "w_same", "w_other", "w_cls")


# -- a study's evaluation: folders, splits, kNN / probe / few-shot, the seeds' summary ------------

def data_folders(dataset: str, data_dir: str | None, img_size: int) -> tuple[Path, Path, str]:
    """``(train_dir, val_dir, name)``: one folder pair for every run of the study (the embedded set is
    drawn once with data seed 0, whatever the run seeds)."""
    if data_dir is not None:
        root = Path(data_dir)
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"{root} has no {' or '.join(missing)}/ folder; a study folder holds train/ and "
                                    "val/, each with one subfolder per class (ImageFolder layout)")
        return root / "train", root / "val", root.name
    if dataset in EMBEDDED:
        from mixedae_fast.pipelines.synthetic import (
            DEFAULT_NUM_TRAIN,
            DEFAULT_NUM_VAL,
            default_data_root,
            write_image_folder,
        )
        root = write_image_folder(default_data_root(img_size, seed=0), DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL,
                                  size=img_size, seed=0, progress=False)
    else:
        from mixedae_fast.pipelines.offline import write_offline_folder
        root = write_offline_folder(dataset, size=img_size)
    return root / "train", root / "val", dataset


def split_indices(num: int, heldout: float, seed: int = 0, bank_max: int = 2000, heldout_max: int = 1000):
    """Disjoint ``(bank, heldout)`` index tensors into the training folder, the same for every run."""
    import torch

    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    n_held = min(max(1, int(num * heldout)), heldout_max)
    return order[n_held:][:bank_max].sort().values, order[:n_held].sort().values


def few_shot_accuracy(train_x, train_y, val_x, val_y, shots: int = 5, episodes: int = 20, seed: int = 0) -> float:
    """Nearest class mean (cosine) from ``shots`` labelled images per class, averaged over ``episodes``
    random draws; percent correct. Classes with fewer than ``shots`` images use what they have."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    tx, vx = F.normalize(train_x.float(), dim=1), F.normalize(val_x.float(), dim=1)
    classes = torch.unique(train_y)
    accs = []
    for _ in range(episodes):
        means = []
        for c in classes:
            idx = torch.nonzero(train_y == c).flatten()
            pick = idx[torch.randperm(len(idx), generator=g)[:shots]]
            means.append(F.normalize(tx[pick].mean(0), dim=0))
        pred = classes[(vx @ torch.stack(means).T).argmax(dim=1)]
        accs.append((pred == val_y).float().mean().item())
    return 100.0 * sum(accs) / len(accs)


def evaluate_run(model, train_dir, val_dir, img_size, device, heldout, shots, probe_epochs, amp_dtype=None) -> dict:
    """``{split: {knn, linear_probe, few_shot}}`` for the ``heldout`` and ``val`` splits; kNN, probe and
    few-shot fit on the labelled bank (training folder minus the held-out part)."""
    from mixedae_fast.downstream.evaluate import extract_pooled, image_loaders, knn_accuracy, linear_probe_accuracy

    train, val = image_loaders(str(train_dir), str(val_dir), img_size, device)
    tx, ty = extract_pooled(model, train, device, ("avg",), amp_dtype)
    vx, vy = extract_pooled(model, val, device, ("avg",), amp_dtype)
    tx, vx = tx["avg"], vx["avg"]
    bank, held = split_indices(len(tx), heldout)
    bank, held = bank.to(tx.device), held.to(tx.device)
    bx, by = tx[bank], ty[bank]
    out = {}
    for split, (x, y) in {"heldout": (tx[held], ty[held]), "val": (vx, vy)}.items():
        out[split] = {"knn": knn_accuracy(bx, by, x, y),
                      "linear_probe": linear_probe_accuracy(bx, by, x, y, epochs=probe_epochs),
                      "few_shot": few_shot_accuracy(bx, by, x, y, shots)}
    out["sizes"] = {"bank": len(bank), "heldout": len(held), "val": len(vx)}
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def fmt_ms(ms: tuple, digits: int = 1) -> str:
    m, s = ms
    if m is None:
        return "–"
    return f"{m:.{digits}f}" + ("" if s is None else f" ± {s:.{digits}f}")



# -- the curve -----------------------------------------------------------------------------------

def _logged_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def logged_near(rows: list[dict], step: int, window: int) -> dict:
    """Mean of each :data:`CURVE_STATS` column over the logged rows in ``(step - window, step]``."""
    out = {}
    near = [r for r in rows if step - window < int(r["step"]) <= step]
    for stat in CURVE_STATS:
        vals = [float(r[stat]) for r in near if r.get(stat) not in (None, "")]
        vals = [v for v in vals if math.isfinite(v)]
        out[stat] = sum(vals) / len(vals) if vals else None
    return out


def _load(path: Path, device):
    from mixedae_fast.downstream.evaluate import load_encoder

    model, cfg, _ = load_encoder(path, device=device)
    return model, cfg


def curve_points(out_dir: Path, names: list[str], train_dir, val_dir, args, device, say=print) -> dict:
    """``{run name: [{step, heldout_knn, val_knn, <logged stats>}, ...]}``: every kept checkpoint of every
    run evaluated with kNN (cached one file per checkpoint)."""
    from mixedae_fast.downstream.evaluate import extract_pooled, image_loaders, knn_accuracy
    from mixedae_fast.train.checkpoint import atomic_write_json, checkpoint_step, list_checkpoints

    cache = out_dir / "results" / "curve"
    cache.mkdir(parents=True, exist_ok=True)
    loaders = None
    points = {}
    for name in names:
        run_dir = out_dir / "runs" / name
        rows = _logged_rows(run_dir)
        every = int(rows[1]["step"]) - int(rows[0]["step"]) if len(rows) > 1 else 1
        points[name] = []
        for ckpt in list_checkpoints(run_dir / "checkpoints"):
            step = checkpoint_step(ckpt)
            done = cache / f"{name}-{step:08d}.json"
            if done.is_file():
                point = json.loads(done.read_text())
            else:
                model, cfg = _load(ckpt, device)
                if loaders is None:
                    loaders = image_loaders(str(train_dir), str(val_dir), cfg.model.img_size, device)
                (tx, ty), (vx, vy) = (extract_pooled(model, loader, device) for loader in loaders)
                tx, vx = tx["avg"], vx["avg"]
                bank, held = split_indices(len(tx), args.heldout)
                point = {"step": step, "checkpoint": str(ckpt),
                         "heldout_knn": knn_accuracy(tx[bank], ty[bank], tx[held], ty[held]),
                         "val_knn": knn_accuracy(tx[bank], ty[bank], vx, vy),
                         **logged_near(rows, step, max(every, 100))}
                atomic_write_json(point, done)
                say(f"curve {name} step {step}: held-out kNN {point['heldout_knn']:.1f}, val {point['val_knn']:.1f}")
            points[name].append(point)
    return points


def transfer_points(out_dir: Path, names: list[str], targets: list[str], img_size: int, args, device,
                    say=print) -> dict:
    """``{run name: {target: {knn, linear_probe, few_shot[, finetune_top1]}}}`` for each run's final encoder."""

    from mixedae_fast.train.checkpoint import atomic_write_json

    cache = out_dir / "results" / "transfer"
    cache.mkdir(parents=True, exist_ok=True)

    folders = {t: data_folders(t, None, img_size)[:2] for t in targets}  # written once, cached after
    points = {}
    for name in names:
        run_dir = out_dir / "runs" / name
        points[name] = {}
        model = None  # loaded once per run, and only when an evaluation is missing
        for target in targets:
            done = cache / f"{name}-{target}.json"
            point = json.loads(done.read_text()) if done.is_file() else None
            if point is None:
                if model is None:
                    model = _load(run_dir, device)[0]
                train_dir, val_dir = folders[target]
                ev = evaluate_run(model, train_dir, val_dir, img_size, device, args.heldout, args.shots,
                                  args.probe_epochs)
                point = {"target": target, "run": str(run_dir), **ev["val"], "heldout": ev["heldout"],
                         "sizes": ev["sizes"]}
                atomic_write_json(point, done)
                say(f"transfer {name} -> {target}: kNN {point['knn']:.1f}, probe {point['linear_probe']:.1f}, "
                    f"{args.shots}-shot {point['few_shot']:.1f}")
            if args.transfer_finetune_epochs and "finetune_top1" not in point:
                point["finetune_top1"] = finetune_top1(run_dir, folders[target][0].parent,
                                                       cache / "finetune" / f"{name}-{target}",
                                                       args.transfer_finetune_epochs)
                atomic_write_json(point, done)
                say(f"transfer {name} -> {target}: fine-tuned {args.transfer_finetune_epochs} epochs, top-1 "
                    f"{point['finetune_top1']:.1f}")
            points[name][target] = point
    return points


def finetune_top1(run_dir: Path, data_root: Path, folder: Path, epochs: int) -> float:
    """The val top-1 (last epoch) of ``mixedae-fast finetune`` of ``run_dir`` on ``data_root`` (train/ and
    val/) for ``epochs`` epochs, into ``folder`` (resumed there if a call was cut short)."""
    from mixedae_fast.downstream.finetune_folder import RESULTS

    results = folder / RESULTS
    if not results.is_file():
        command = [sys.executable, "-m", "mixedae_fast.cli", "finetune", str(run_dir), "--data-dir", str(data_root),
                   "--epochs", str(epochs), "--out", str(folder), "--no-progress", "--resume", "auto"]
        log = folder.parent / f"{folder.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            rc = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT)
        if rc != 0:
            raise RunFailure(f"fine-tuning {run_dir} on {data_root} failed (exit {rc}); its output is in {log}: read "
                             "its last error: line, fix that, and rerun the same command (finished parts are kept)")
    return json.loads(results.read_text())["results"]["pretrained"]["val_top1"]


def context_features(model, images: torch.Tensor, batch_groups: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mean-pooled encoder features of ``images [M, C, S, S]`` (``M`` a multiple of the model's r) in three
    contexts, the same visible positions in the last two: ``full`` (the whole image alone, global attention:
    what kNN and the probe use), ``alone`` (its visible 1 - m of patches alone, global attention: MAE's
    encoder input) and ``mixed`` (those patches inside a group of r images, the model's own homologous
    attention: the pretraining input). ``alone`` vs ``mixed`` isolates what mixing does to a source's
    tokens; ``full`` vs ``alone`` what masking does."""
    import torch


    with torch.no_grad():
        return _context_features(model, images, batch_groups, seed)


def _context_features(model, images, batch_groups: int, seed: int) -> dict:
    import torch

    from mixedae_fast.kernels.patch_mix import patchify

    was_training = model.training
    model.eval()
    r, n = model.group_size, model.n_visible
    out = {"full": [], "alone": [], "mixed": []}
    step = batch_groups * r
    for start in range(0, len(images), step):
        x = images[start:start + step]
        G = len(x) // r
        ids = model.assign(G, seed=seed, step=start // step, device=x.device)
        out["full"].append(model.forward_features(x)[:, 1:].mean(dim=1))
        mixed, _, _ = model.mix(x, ids)
        latent, _ = model.forward_encoder(mixed, ids, model.make_layout(hc=False))
        out["mixed"].append(latent[:, 1:].reshape(G * r, n, -1).mean(dim=1))
        pos = ids.long().view(G * r, n)  # image g * r + j shows positions ids[g, j*n:(j+1)*n]
        tokens = patchify(x, model.patch_size).gather(1, pos[..., None].expand(-1, -1, mixed.shape[-1]))
        t = model.patch_embed(tokens) + model.pos_embed[0, 1:][pos]
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(len(t), -1, -1)
        t = torch.cat([cls, t], dim=1)
        for blk in model.blocks:
            t = blk(t)
        out["alone"].append(model.norm(t)[:, 1:].mean(dim=1))
    model.train(was_training)
    return {k: torch.cat(v).float() for k, v in out.items()}


def _images(loader, limit: int | None = None):
    import torch

    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def context_points(out_dir: Path, names: list[str], train_dir, val_dir, args, device, say=print) -> dict:
    """``{run name: {context: {heldout_knn, val_knn}}}`` for each run's final encoder (cached per run)."""
    from mixedae_fast.downstream.evaluate import image_loaders, knn_accuracy
    from mixedae_fast.train.checkpoint import atomic_write_json

    cache = out_dir / "results" / "context"
    cache.mkdir(parents=True, exist_ok=True)
    data = None
    points = {}
    for name in names:
        done = cache / f"{name}.json"
        if not done.is_file():
            model, cfg = _load(out_dir / "runs" / name, device)
            if data is None:
                train, val = image_loaders(str(train_dir), str(val_dir), cfg.model.img_size, device)
                data = _images(train), _images(val)
            (tx, ty), (vx, vy) = data
            r = model.group_size
            tf = context_features(model, tx[: len(tx) // r * r].to(device))
            vf = context_features(model, vx[: len(vx) // r * r].to(device))
            ty, vy = ty[: len(tx) // r * r].to(device), vy[: len(vx) // r * r].to(device)
            bank, held = split_indices(len(tx), args.heldout)
            bank, held = bank[bank < len(ty)], held[held < len(ty)]
            point = {c: {"heldout_knn": knn_accuracy(tf[c][bank], ty[bank], tf[c][held], ty[held]),
                         "val_knn": knn_accuracy(tf[c][bank], ty[bank], vf[c], vy)} for c in tf}
            atomic_write_json(point, done)
            say(f"context {name}: " + ", ".join(f"{c} {p['heldout_knn']:.1f}" for c, p in point.items()))
        points[name] = json.loads(done.read_text())
    return points


# -- tables and plots --------------------------------------------------------------------------------

def _by_variant(points: dict, variants: list[str], seeds: list[int]) -> dict:
    return {v: [points[f"{v}-seed{s}"] for s in seeds if f"{v}-seed{s}" in points] for v in variants}


def curve_table(points: dict, variants: list[str], seeds: list[int]) -> list[dict]:
    """One row per (variant, step): mean ± std over seeds of both kNNs and of the logged stats."""
    rows = []
    for v, runs in _by_variant(points, variants, seeds).items():
        steps = sorted({p["step"] for run in runs for p in run})
        for step in steps:
            at = [p for run in runs for p in run if p["step"] == step]
            row = {"variant": v, "step": step, "seeds": len(at)}
            for key in ("heldout_knn", "val_knn", *CURVE_STATS):
                row[key] = mean_std([p.get(key) for p in at])
            rows.append(row)
    return rows


def transfer_table(points: dict, variants: list[str], seeds: list[int], targets: list[str]) -> list[dict]:
    rows = []
    for v, runs in _by_variant(points, variants, seeds).items():
        row = {"variant": v, "seeds": len(runs)}
        for t in targets:
            for metric in ("knn", "linear_probe", "few_shot", "finetune_top1"):
                row[f"{t}/{metric}"] = mean_std([run[t].get(metric) for run in runs if t in run])
        rows.append(row)
    return rows


def _write_table(out_dir: Path, name: str, lines: list[str], note: str, meta: dict, rows: list[dict]) -> list[Path]:
    """``<name>.md`` (the table, ``note`` and where it came from) and ``<name>.json`` in ``out_dir``."""
    from mixedae_fast.train.checkpoint import atomic_write_json

    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n\n" + note + f" Written by git {meta['git_sha']} on {meta['machine']}, "
                  f"{meta['date']}.\n\nCommand: {meta['command']}\n")
    return [atomic_write_json({"meta": meta, "rows": rows}, out_dir / f"{name}.json"), md]


def write_curve(out_dir: Path, rows: list[dict], meta: dict) -> list[Path]:
    lines = ["| variant | step | held-out kNN | val kNN | recognition | head Jaccard | w_same | w_other | w_cls |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['step']} | {fmt_ms(r['heldout_knn'])} | {fmt_ms(r['val_knn'])} | "
                     + " | ".join(fmt_ms(r[s], 2) for s in ("recognition", "jaccard", "w_same", "w_other", "w_cls"))
                     + " |")
    note = (f"kNN curve of the study {meta['study']} ({meta['dataset']}): every kept checkpoint, weighted kNN "
            f"(k 20, τ 0.07) of mean-pooled features on a bank of the training folder; mean ± std over seeds "
            f"{meta['seeds']}. The logged columns are the mean of the run's metrics.csv rows in the last "
            "logging interval before the step (w_*: the attention mass a query puts on keys of its own source, "
            "of other sources and on the class token, mean over homologous blocks; – where the variant has "
            "no such blocks).")
    return _write_table(out_dir, "curve", lines, note, meta, rows) + [plot_curve(rows, out_dir / "curve.png", meta)]


def plot_curve(rows: list[dict], out_png: Path, meta: dict) -> Path:
    from mixedae_fast.downstream.visualize import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, v in enumerate(variants):  # one colour a variant in every panel, with or without TopK values
        rs = [r for r in rows if r["variant"] == v]
        steps = [r["step"] for r in rs]
        for ax, key in ((axes[0], "heldout_knn"), (axes[1], "recognition"), (axes[2], "w_other")):
            ys = [math.nan if r[key][0] is None else r[key][0] for r in rs]
            if all(math.isnan(y) for y in ys):
                continue
            errs = [r[key][1] or 0.0 for r in rs]
            ax.errorbar(steps, ys, yerr=errs, marker="o", ms=3, capsize=2, label=v, color=colours[i % len(colours)])
    for ax, title in zip(axes, ("held-out kNN %", "recognition (TopK keys of the query's source)",
                                "attention mass on other sources' keys")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"{meta['dataset']}: seeds {meta['seeds']}", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def write_transfer(out_dir: Path, rows: list[dict], targets: list[str], meta: dict) -> list[Path]:
    metrics = [("knn", "kNN"), ("linear_probe", "probe"), ("few_shot", f"{meta['shots']}-shot")]
    if meta["finetune_epochs"]:
        metrics.append(("finetune_top1", f"fine-tune {meta['finetune_epochs']} ep."))
    head = "| variant | " + " | ".join(f"{t} {label}" for t in targets for _, label in metrics) + " |"
    lines = [head, "| --- |" + " ---: |" * (len(targets) * len(metrics))]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(fmt_ms(r[f"{t}/{m}"]) for t in targets for m, _ in metrics)
                     + " |")
    note = (f"Transfer from the study {meta['study']} (pretrained on {meta['dataset']}, the runs' final "
            f"checkpoints) to {', '.join(targets)}: frozen mean-pooled features, kNN (k 20, τ 0.07), linear "
            f"probe ({meta['probe_epochs']} epochs) and {meta['shots']}-shot nearest class mean fit on a bank of "
            "the target's training folder, scored on its val split"
            + (f"; fine-tune: `mixedae-fast finetune --epochs {meta['finetune_epochs']}` (the MAE recipe at its "
               "defaults), val top-1 of the last epoch" if meta["finetune_epochs"] else "")
            + f". Mean ± std over seeds {meta['seeds']}.")
    return _write_table(out_dir, "transfer", lines, note, meta, rows)


def context_table(points: dict, variants: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for v, runs in _by_variant(points, variants, seeds).items():
        row = {"variant": v, "seeds": len(runs)}
        for c in CONTEXTS:
            for split in ("heldout", "val"):
                row[f"{c}/{split}_knn"] = mean_std([run[c][f"{split}_knn"] for run in runs])
        rows.append(row)
    return rows


def write_context(out_dir: Path, rows: list[dict], meta: dict) -> list[Path]:
    lines = ["| variant | " + " | ".join(f"{c} ({split})" for split in ("held-out", "val") for c in CONTEXTS) + " |",
             "| --- |" + " ---: |" * (2 * len(CONTEXTS))]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(fmt_ms(r[f"{c}/{split}_knn"]) for split in ("heldout", "val")
                                                           for c in CONTEXTS) + " |")
    note = (f"Encoder features in context, the study {meta['study']} ({meta['dataset']}), each run's final "
            "checkpoint: weighted kNN (k 20, τ 0.07) of mean-pooled tokens with bank and queries taken the same "
            "way. full: the whole image alone, global attention (what the study's table uses); alone: only the "
            "patches a training step shows of it (1 - mask ratio), alone, global attention; mixed: those same "
            "patches inside a group of r images with the run's own attention (its pretraining input), the tokens "
            f"of the image pooled. Mean ± std over seeds {meta['seeds']}.")
    return _write_table(out_dir, "context", lines, note, meta, rows)


def run_followups(out_dir: Path, variants: list[str], seeds: list[int], train_dir, val_dir, dataset: str,
                  img_size: int, args, device, stamp: dict) -> list[Path]:
    """The follow-ups ``args`` asks for (``--curve``, ``--context``, ``--transfer``) on a finished study."""
    names = [f"{v}-seed{s}" for v in variants for s in seeds]
    meta = {"study": str(out_dir), "dataset": dataset, "seeds": seeds, **stamp}
    paths = []
    if args.curve:
        points = curve_points(out_dir, names, train_dir, val_dir, args, device)
        paths += write_curve(out_dir, curve_table(points, variants, seeds), meta)
    if args.context:
        points = context_points(out_dir, names, train_dir, val_dir, args, device)
        paths += write_context(out_dir, context_table(points, variants, seeds), meta)
    if args.transfer:
        targets = [t for t in args.transfer if t != dataset]
        points = transfer_points(out_dir, names, targets, img_size, args, device)
        meta = {**meta, "targets": targets, "shots": args.shots, "probe_epochs": args.probe_epochs,
                "finetune_epochs": args.transfer_finetune_epochs}
        paths += write_transfer(out_dir, transfer_table(points, variants, seeds, targets), targets, meta)
    return paths
