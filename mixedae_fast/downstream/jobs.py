"""The commands that read a trained run, one function each: ``mixedae-fast eval RUN ...`` is
:func:`run_eval`, ``finetune`` :func:`run_finetune`, ``export`` :func:`run_export`, ``visualize``
:func:`run_visualize`.

Each refuses bad input before the work (``ValueError`` or ``FileNotFoundError``, naming the option
and the fix), loads the run (a run directory: its newest checkpoint; or a checkpoint file; only
``--runtime.key=value`` overrides), prints the lines a long job owes as it goes (the run and the data
it read, the fine-tune's epochs), writes its files and returns a report, which the command line
prints. ``command`` (the command line as typed) goes into the result files' provenance.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mixedae_fast.choices import EMBEDDED
from mixedae_fast.config import config_to_dict
from mixedae_fast.downstream import finetune_folder as folder
from mixedae_fast.downstream.evaluate import (
    eval_folders,
    evaluate_encoder,
    image_loaders,
    load_encoder,
    random_init_model,
)
from mixedae_fast.downstream.export import CODE_LICENSE, PARITY_LIMIT, export_run, push_to_hub
from mixedae_fast.downstream.finetune import (
    FinetuneConfig,
    RandAugmentPIL,
    ViTClassifier,
    evaluate_classifier,
    finetune,
)
from mixedae_fast.downstream.visualize import (
    homologous_figure,
    pick_group,
    plot_loss_curve,
    reconstruction_figure,
)
from mixedae_fast.pipelines.shards import SkipLog
from mixedae_fast.pipelines.torch_loader import FileImageLoader
from mixedae_fast.provenance import provenance
from mixedae_fast.train.checkpoint import atomic_write_json, load_pretrained
from mixedae_fast.train.data import EVAL_BANK, eval_loaders
from mixedae_fast.train.device import resolve_precision
from mixedae_fast.train.distributed import init_distributed


def run_eval(run: str, overrides: Sequence[str] = (), *, dataset: str = "run", data_dir: str | None = None,
             max_train: int | None = None, out: str | None = None, pool: str = "avg", k: int = 20,
             temperature: float = 0.07, probe_epochs: int = 100, probe: bool = True,
             command: list[str] | None = None) -> dict:
    """kNN and linear probe on the frozen features of ``run`` beside the same architecture at random init;
    written to ``out`` (default ``RUN/eval_<dataset>.json``). ``pool``: avg, cls or both. Returns what
    was written, with ``path`` (where) added."""
    _check_out_file(out)
    if k < 1 or temperature <= 0 or probe_epochs < 1:
        raise ValueError(f"--k {k}, --temperature {temperature}, --probe-epochs {probe_epochs}: "
                         "need k >= 1, temperature > 0, probe epochs >= 1")
    model, cfg, pre, device, amp = _load_run(run, overrides)
    train, val, name = _labelled_data(cfg, pre, device, dataset, data_dir, max_train, amp)
    pools = ["avg", "cls"] if pool == "both" else [pool]
    t0 = time.perf_counter()
    kw = dict(pool=pools, amp_dtype=amp, probe=probe, k=k, temperature=temperature, probe_epochs=probe_epochs)
    results = {"pretrained": evaluate_encoder(model, train, val, device, **kw),
               "random_init": evaluate_encoder(random_init_model(cfg, device), train, val, device, **kw)}
    num_train, num_val, num_classes = _sizes(train, val)
    report = {"run": str(run), "checkpoint": str(pre.checkpoint), "step": pre.step, "dataset": name,
              "num_train": num_train, "num_val": num_val, "num_classes": num_classes, "k": k,
              "temperature": temperature, "probe_epochs": probe_epochs if probe else None,
              "results": results, "seconds": time.perf_counter() - t0, **provenance(device, command)}
    if isinstance(train, _Tally) and train.skips.samples:
        report["skipped_samples"] = len(train.skips.samples)  # as pretrain's report.json counts them
        print(f"data: {len(train.skips.samples)} unreadable shard samples skipped", flush=True)
    path = atomic_write_json(report, out or pre.run_dir / f"eval_{name}.json")
    return {**report, "path": path}


def run_finetune(run: str, overrides: Sequence[str] = (), settings: dict | None = None, *, dataset: str = "run",
                 data_dir: str | None = None, max_train: int | None = None, out: str | None = None,
                 baseline: bool = False, resume: str | None = None, eval_only: bool = False, progress: bool = True,
                 command: list[str] | None = None) -> dict | None:
    """Fine-tune ``run``'s encoder into ``out`` (default ``RUN/finetune_<dataset>``; finetune_folder.py says
    what it holds) with ``settings`` (:class:`FinetuneConfig`'s fields; the others keep its defaults), and
    with ``baseline`` the random-init encoder too, into ``out/baseline``. ``resume``: ``auto`` or a
    checkpoint (default none; auto with ``eval_only``). Returns what ``results.json`` holds, with ``path``
    (where) added; with ``eval_only``, ``{"eval_only": [...]}``: each fine-tuned classifier scored on val,
    nothing written.

    Under torchrun (``torchrun --nproc-per-node=N -m mixedae_fast.cli finetune RUN``) every rank trains its
    shard in DDP; rank 0 prints, holds the folder's lock, writes the checkpoints, export and results and
    returns the report; the other ranks return None."""
    fcfg = FinetuneConfig(**(settings or {}))
    resume = resume or ("auto" if eval_only else "none")
    if baseline and resume not in ("none", "auto"):
        raise ValueError(f"--resume {resume} names one checkpoint, and --baseline fine-tunes two classifiers; use "
                         "--resume auto (each continues from the newest checkpoint in its folder)")
    if max_train is not None and max_train < 1:
        raise ValueError(f"--max-train {max_train}: must be >= 1 (training images to use); leave it out to use "
                         "them all")
    _check_out_folder(out)
    model, cfg, pre, device, amp = _load_run(run, overrides)
    dist = init_distributed(cfg)
    if dist.active:
        device = dist.device
        model = model.to(device)
    train_dir, val_dir, name = eval_folders(dataset, cfg, data_dir, run_dir=pre.run_dir)
    out_dir = Path(out) if out else pre.run_dir / f"finetune_{name}"
    folders = {"pretrained": out_dir, **({"random_init": out_dir / folder.BASELINE} if baseline else {})}
    if eval_only:
        return _score_finetuned(run, cfg, model, device, amp, val_dir, name, folders, resume, dist)
    folder.check_out_dir(out_dir, resume)  # before the data is read; again under the lock
    spec = fcfg.regularisation(cfg.model.depth)["auto_augment"]
    train, val = image_loaders(train_dir, val_dir, cfg.model.img_size, device, batch_size=fcfg.batch_size,
                               max_train=max_train, augment_train=True, crop_scale=fcfg.crop_scale, seed=fcfg.seed,
                               num_workers=cfg.data.num_workers, shard_id=dist.rank, num_shards=dist.world_size,
                               pil_transform=RandAugmentPIL(spec, cfg.model.img_size, fcfg.seed) if spec else None)
    say = print if dist.is_main else (lambda *a, **k: None)
    say(f"data {name}: {len(train.dataset)} train / {len(val.dataset)} val images, {len(train.classes)} classes "
        f"({train_dir}); fine-tune folder {out_dir}", flush=True)
    record = {"model_config": config_to_dict(cfg)["model"], "classes": list(train.classes), "dataset": name,
              "source": {"run": str(run), "checkpoint": str(pre.checkpoint), "step": pre.step}}
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    with folder.FinetuneLock(out_dir) if dist.is_main else contextlib.nullcontext():
        folder.check_out_dir(out_dir, resume)
        for label, where in folders.items():
            m = model if label == "pretrained" else random_init_model(cfg, device)
            state = _resume_state(where, resume, fcfg, record, label, dist, device, say)
            try:
                results[label] = finetune(m, train, val, len(train.classes), device, fcfg, amp,
                                          progress and dist.is_main, desc=label.replace("_", " "),
                                          dist=dist if dist.active else None, out_dir=where, resume=state,
                                          record=record)
            except KeyboardInterrupt:
                say(f"fine-tune stopped: the same command with --resume auto continues it after the newest "
                    f"checkpoint in {where / 'checkpoints'}", file=sys.stderr, flush=True)
                raise
        dist.close()
        if not dist.is_main:
            return None
        report = {"run": str(run), "checkpoint": str(pre.checkpoint), "step": pre.step, "dataset": name,
                  "num_train": len(train.dataset), "num_val": len(val.dataset), "num_classes": len(train.classes),
                  "classes": list(train.classes), "ranks": dist.world_size, "out_dir": str(out_dir),
                  "results": results, **provenance(device, command)}
        path = atomic_write_json(report, out_dir / folder.RESULTS)
    return {**report, "path": path}


def _resume_state(where: Path, resume: str, fcfg: FinetuneConfig, record: dict, label: str, dist, device, say):
    """The checkpoint ``resume`` names for the classifier fine-tuned in ``where`` (None: a fresh start),
    checked against this fine-tune; on rank 0 the later checkpoints of an abandoned branch move aside."""
    path = folder.find_checkpoint(where, resume)
    state = folder.load_finetune_checkpoint(path, device) if path is not None else None
    if state is not None:
        meta = dict(record, label=label.replace("_", " "), settings=dataclasses.asdict(fcfg),
                    global_batch=fcfg.global_batch(dist.world_size), world_size=dist.world_size)
        for note in folder.check_resume(state, meta):
            say(f"resume note: {note}", flush=True)
        say(f"{label.replace('_', ' ')}: resuming after epoch {state['epoch']} of {fcfg.epochs} from {path}",
            flush=True)
    epoch = int(state["epoch"]) if state is not None else 0
    dist.check_same(epoch, "the epoch to resume after", "every rank must see the same fine-tune folder")
    if state is not None and dist.is_main:
        aside = folder.set_aside_later(where, epoch)
        if aside is not None:
            say(f"resume: the later checkpoints, export and results of the abandoned branch moved to {aside}",
                flush=True)
    return state


def _score_finetuned(run, cfg, model, device, amp, val_dir, name, folders, resume, dist) -> dict | None:
    """``finetune --eval-only``: each fine-tuned classifier (its newest checkpoint, or ``resume``'s) scored
    on val; nothing is written."""
    val = FileImageLoader(val_dir, batch_size=250, img_size=cfg.model.img_size, device=device, augment=False,
                          shuffle=False, drop_last=False, num_workers=cfg.data.num_workers)
    scores = []
    for label, where in folders.items():
        path = folder.find_checkpoint(where, resume if label == "pretrained" else "auto")
        if path is None:
            raise ValueError(f"--eval-only: no fine-tune checkpoint in {where / 'checkpoints'}; fine-tune first (the "
                             "same command without --eval-only), or pass --resume PATH")
        state = folder.load_finetune_checkpoint(path, device)
        if state.get("model_config") != config_to_dict(cfg)["model"]:
            raise ValueError(f"{path} fine-tunes another architecture than {run}; pass the run it came from "
                             f"({(state.get('source') or {}).get('run')})")
        if list(state.get("classes") or []) != list(val.classes):
            raise ValueError(f"{path} was fine-tuned on other classes than {val_dir} holds ({len(state['classes'])} "
                             f"vs {len(val.classes)}); evaluate it on its own data set "
                             f"({state.get('dataset')})")
        m = model if label == "pretrained" else random_init_model(cfg, device)
        clf = ViTClassifier(m, len(val.classes)).to(device)
        clf.load_state_dict(state["classifier"])
        scores.append({"label": label, "checkpoint": str(path), "epoch": state["epoch"], "dataset": name,
                       **evaluate_classifier(clf, val, device, amp)})
    dist.close()
    return {"eval_only": scores} if dist.is_main else None


def run_export(run: str, overrides: Sequence[str] = (), *, out: str | None = None, pool: str = "avg",
               check: bool = True, license: str = CODE_LICENSE, datasets: list[str] | None = None,
               hub_repo: str | None = None, private: bool = False) -> dict:
    """``run``'s encoder as a timm model in the Hub layout at ``out`` (default ``RUN/export_timm``;
    export.py: :func:`~mixedae_fast.downstream.export.export_run`), then with ``hub_repo`` uploaded there.
    Returns ``{"dir", "parity", "parity_limit", "pool", "hub"}`` (``hub``: the upload's URL or None)."""
    if overrides:
        raise ValueError(f"export takes no config overrides (got {' '.join(overrides)}): the export is the run's "
                         "model as trained; drop them (mixedae-fast export --help lists its options)")
    _check_out_folder(out)
    pre = load_pretrained(run)
    done = export_run(pre, Path(out) if out else pre.run_dir / "export_timm", pool, check=check, license=license,
                      datasets=datasets)
    hub = push_to_hub(done["dir"], hub_repo, private) if hub_repo else None
    return {**done, "parity_limit": PARITY_LIMIT, "pool": pool, "hub": hub}


def run_visualize(run: str, overrides: Sequence[str] = (), *, dataset: str = "run", data_dir: str | None = None,
                  max_train: int | None = None, out: str | None = None, query: int | None = None,
                  block: int | None = None, seed: int = 0, step: int = 0) -> dict:
    """The pictures of one group of val images into ``out`` (default ``RUN/pictures``): the reconstruction,
    with a group of several sources the homologous attention of one query token (``query``, ``block``),
    and the loss curve when the run has a ``metrics.csv``. Returns ``{"reconstruction", "homologous",
    "selection", "loss_curve"}``: the pictures' paths (None: not drawn) and the attention figures."""
    _check_out_folder(out)
    model, cfg, pre, device, _ = _load_run(run, overrides)
    _, val, _ = _labelled_data(cfg, pre, device, dataset, data_dir, max_train)
    images, labels = next(iter(val))
    group = pick_group(images, labels, model.group_size)
    out_dir = Path(out) if out else pre.run_dir / "pictures"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"reconstruction": reconstruction_figure(model, group, out_dir / "reconstruction.png", seed, step),
              "homologous": None, "selection": None, "loss_curve": None}
    if model.group_size > 1:
        report["homologous"], report["selection"] = homologous_figure(model, group, out_dir / "homologous.png",
                                                                      query, block, seed, step)
    if (pre.run_dir / "metrics.csv").is_file():
        report["loss_curve"] = plot_loss_curve(pre.run_dir / "metrics.csv", out_dir / "loss_curve.png")
    return report


# -- the reports as the command line prints them ------------------------------------------------------

def eval_summary(report: dict) -> str:
    """:func:`run_eval`'s report: accuracy per pool and evaluation, pretrained beside random init."""
    ours, random_init = report["results"]["pretrained"], report["results"]["random_init"]
    lines = [f"\n{'val accuracy %':<26}{'pretrained':>12}{'random init':>14}"]
    for pool in ours:
        for metric, label in (("knn", f"kNN k={report['k']}"), ("linear_probe", "linear probe")):
            if metric in ours[pool]:
                lines.append(f"{label + f' ({pool})':<26}{ours[pool][metric]:>12.1f}{random_init[pool][metric]:>14.1f}")
    return "\n".join([*lines, f"\nresults: {report['path']}"])


def finetune_summary(report: dict) -> str:
    """:func:`run_finetune`'s report: the figures per classifier, the recipe, the checkpoints and exports
    (or with ``eval_only`` the scores)."""
    if "eval_only" in report:
        return "\n".join(f"{s['label'].replace('_', ' ')} (eval only) {s['checkpoint']}, after epoch {s['epoch']}: "
                         f"val top-1 {s['top1']:.1f} top-5 {s['top5']:.1f}, loss {s['loss']:.4f} ({s['images']} "
                         f"{s['dataset']} images)" for s in report["eval_only"])
    results = report["results"]
    lines = [f"\n{'fine-tune, val %':<26}" + "".join(f"{k.replace('_', ' '):>14}" for k in results)]
    for key, label in (("val_top1", "top-1, last epoch"), ("val_top5", "top-5, last epoch"),
                       ("best_val_top1", "top-1, best epoch"), ("seconds", "time, s")):
        lines.append(f"{label:<26}" + "".join(f"{r[key]:>14.1f}" for r in results.values()))
    first = results["pretrained"]
    reg, settings = first["regularisation"], first["settings"]
    lines.append(f"({settings['epochs']} epochs, global batch {first['global_batch']} = {settings['batch_size']} x "
                 f"{settings['accum_steps']} accumulated x {report['ranks']} rank(s), peak lr {first['peak_lr']:.3g}, "
                 f"layer decay {first['layer_decay']}, recipe {reg['recipe']}: "
                 + ", ".join(f"{k} {v}" for k, v in reg.items() if k != "recipe") + ")")
    for label, r in results.items():
        export = r["export"]
        check = ("kept as it was" if export["parity"] is None else
                 f"loaded back through timm, logits within {export['parity']:.1e} of ours")
        lines.append(f"{label.replace('_', ' ')}: checkpoint {r['checkpoint']}\n  timm export {export['dir']} "
                     f"({check}); load: timm.create_model('local-dir:{export['dir']}', pretrained=True)")
    return "\n".join([*lines, f"results: {report['path']}"])


def export_summary(out: dict) -> str:
    """:func:`run_export`'s report: where, how to load it, the check, the upload."""
    lines = [f"{out['dir']}: config.json, model.safetensors, README.md (timm's hub layout)",
             f"load: timm.create_model({'local-dir:' + str(out['dir'])!r}, pretrained=True)"]
    if out["parity"] is not None:
        lines.append(f"check: timm loaded it strictly; features ({out['pool']}) of 4 random images differ by "
                     f"{out['parity']:.2e} (max |ours - timm| / max |ours|, limit {out['parity_limit']:g})")
    if out["hub"] is not None:
        lines.append(f"pushed to the Hugging Face Hub: {out['hub']}")
    return "\n".join(lines)


def visualize_summary(pictures: dict) -> str:
    """:func:`run_visualize`'s report: the pictures' paths and what the attention picture shows."""
    lines = [str(pictures["reconstruction"])]
    sel = pictures["selection"]
    if sel is not None:
        lines.append(f"{pictures['homologous']}\nblock {sel['block']}, query token {sel['query']}: of its "
                     f"top-{sel['topk']} keys (itself excluded) {sel['query_recognition']:.3f} come from its own "
                     f"source, per head {', '.join(f'{v:.2f}' for v in sel['query_recognition_per_head'])}; this "
                     f"block's recognition accuracy over the group {sel['block_recognition']:.3f} (chance "
                     f"{sel['chance']:.3f})")
    if pictures["loss_curve"] is not None:
        lines.append(str(pictures["loss_curve"]))
    return "\n".join(lines)


# -- what the four share ---------------------------------------------------------------------------

def _load_run(run: str, overrides: Sequence[str]):
    """``(model, cfg, pretrained, device, amp dtype)`` of ``run``, said in one line."""
    model, cfg, pre = load_encoder(run, overrides=overrides)
    device = next(model.parameters()).device
    print(f"{run}: {pre.checkpoint.name} (step {pre.step}), ViT {cfg.model.embed_dim} wide x "
          f"{cfg.model.depth} deep, patch {cfg.model.patch_size}, {cfg.model.img_size} px, on {device}", flush=True)
    return model, cfg, pre, device, resolve_precision(cfg.runtime.precision, device)


def _labelled_data(cfg, pre, device, dataset: str, data_dir: str | None, max_train: int | None, amp=None):
    """``(train, val, name)``: the loaders of the labelled data ``dataset`` / ``data_dir`` names, said in one line."""
    if max_train is not None and max_train < 1:
        raise ValueError(f"--max-train {max_train}: must be >= 1 (training images to use); leave it out to use "
                         "them all")
    if dataset == "run" and data_dir is None and _on_shards(cfg):
        return _run_shards(cfg, device, amp, max_train)
    train_dir, val_dir, name = eval_folders(dataset, cfg, data_dir, run_dir=pre.run_dir)
    train, val = image_loaders(train_dir, val_dir, cfg.model.img_size, device, max_train=max_train,
                               num_workers=cfg.data.num_workers)
    print(f"data {name}: {len(train.dataset)} train / {len(val.dataset)} val images, {len(train.classes)} classes "
          f"({train_dir})", flush=True)
    return train, val, name


def _on_shards(cfg) -> bool:
    """The run read webdataset shards with labelled val data: pretrain's evaluation read them, and so can eval."""
    d = cfg.data
    return d.format == "webdataset" and d.path is not None and d.val_path is not None and d.backend not in EMBEDDED


def _run_shards(cfg, device, amp, max_train: int | None):
    """``(bank, val, "run")`` of a run on webdataset shards: the loaders pretrain's final evaluation reads
    (train/data.py :func:`eval_loaders`: the first ``max_train`` training samples, default 2,000, and val, in shard
    order), so the figures are the run's ``report.json``'s for the same checkpoint. Their sizes are known once read."""
    limit = max_train or EVAL_BANK
    skips = SkipLog()
    bank, val = eval_loaders(cfg, device, amp or torch.float32, cfg.data.path, cfg.data.val_path, "webdataset",
                             skips=skips, limit=limit)
    print(f"data run: webdataset shards, the kNN bank the first {limit} samples of {cfg.data.path}, val "
          f"{cfg.data.val_path}, as the run's own evaluation reads them", flush=True)
    return _Tally(bank, skips), _Tally(val, skips), "run"


class _Tally:
    """A loader passed through as it is, counting the samples and classes of its last pass (a stream of shards
    has no size to read before)."""

    def __init__(self, loader, skips):
        self.loader, self.skips = loader, skips
        self.count, self.labels = 0, set()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.count, self.labels = 0, set()
        for images, labels in self.loader:
            self.count += len(labels)
            self.labels.update(labels.tolist())
            yield images, labels


def _sizes(train, val) -> tuple[int, int, int]:
    """``(train images, val images, classes)`` of the loaders an evaluation read."""
    if isinstance(train, _Tally):
        return train.count, val.count, len(train.labels | val.labels)
    return len(train.dataset), len(val.dataset), len(train.classes)


def _check_out_file(out: str | None) -> None:
    """``--out`` of eval is a file: refuse a folder, or a path under a file, before the work."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; --out takes the result file, e.g. --out {path / 'results.json'}")
    _check_out_parent(path.parent, f"--out {out}")


def _check_out_folder(out: str | None) -> None:
    """``--out`` of finetune / export / visualize is a folder: refuse a file, or a path under a file, before
    the work."""
    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file; --out takes a folder (it is created if missing)")
    _check_out_parent(path, f"--out {out}")


def _check_out_parent(start: Path, what: str) -> None:
    for p in (start, *start.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{what}: {p} is a file, not a folder; choose a path under a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"{what}: {p} is not writable; choose a folder you can write")
            return
