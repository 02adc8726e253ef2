"""Fine-tuning on two ranks (gloo, CPU): DDP keeps the ranks' weights identical while they train on
different shards, and the lr follows the global batch; the CLI under torchrun (rank 0 writes the folder,
2 ranks = 1 rank accumulating, an exact resume)."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import sys, torch
    from mixedae_fast._compat import ensure_torchvision
    ensure_torchvision()
    from mixedae_fast.config import load_config
    from mixedae_fast.train.distributed import init_distributed
    from mixedae_fast.downstream.finetune import FinetuneConfig, finetune
    from mixedae_fast.model.mixedae import build_model
    from mixedae_fast.pipelines.torch_loader import TensorBatchLoader
    cfg = load_config("cpu_tiny", ["--model.img_size=16", "--model.patch_size=4", "--model.embed_dim=32",
                                   "--model.depth=2", "--model.num_heads=2", "--model.decoder_embed_dim=16",
                                   "--model.decoder_depth=1", "--model.decoder_num_heads=2"])
    dist = init_distributed(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(32, 16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
    labels = torch.randint(0, 2, (32,), generator=g).numpy()
    train = TensorBatchLoader(images, labels, batch_size=8, img_size=16, shard_id=dist.rank, num_shards=2)
    first = next(iter(train))[0]
    fcfg = FinetuneConfig(epochs=1, batch_size=8, blr=1e-2, warmup_epochs=0.5, recipe="mae", auto_augment="none")
    out = finetune(model, train, train, 2, dist.device, fcfg, progress=False, dist=dist)
    dist.close()
    torch.save({"state": model.state_dict(), "peak_lr": out["peak_lr"], "first": first,
                "loss": out["history"][-1]["train_loss"]}, sys.argv[1])
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_train_different_shards_into_the_same_weights(tmp_path):
    (tmp_path / "ft.py").write_text(SCRIPT)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "ft.py"), str(tmp_path / f"r{rank}.pt")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
    r0, r1 = (torch.load(tmp_path / f"r{k}.pt", weights_only=True) for k in range(2))
    assert not torch.equal(r0["first"], r1["first"])                    # each rank saw its own shard
    for name, value in r0["state"].items():
        torch.testing.assert_close(value, r1["state"][name], rtol=0, atol=0, msg=name)   # DDP kept them equal
    assert r0["peak_lr"] == 1e-2 * 8 * 2 / 256                           # blr x global batch / 256
    assert r0["loss"] == r1["loss"] and r0["loss"] == r0["loss"]         # averaged over ranks, finite


def _tiny_run(root, tiny):
    """A run folder as pretraining leaves it (config.yaml, checkpoints/ckpt-*.pt), from an untrained model."""
    from mixedae_fast.config import config_to_dict, save_config

    cfg = tiny.config()
    model = tiny.model()
    run = root / "run"
    save_config(cfg, run / "config.yaml")
    (run / "checkpoints").mkdir()
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "step": 0},
               run / "checkpoints" / "ckpt-00000000.pt")
    return run


def _image_folders(root):
    """train/ (32) and val/ (8) PNGs of two classes, 16 px: horizontal or vertical stripes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, num in (("train", 32), ("val", 8)):
        for i in range(num):
            label = i % 2
            wave = np.sin(np.arange(16) * np.pi / 2 + rng.uniform(0, 6.3)) > 0
            mask = np.broadcast_to(wave[:, None] if label == 0 else wave[None, :], (16, 16))[..., None]
            image = np.where(mask, rng.integers(0, 256, 3), rng.integers(0, 256, 3)).astype(np.uint8)
            (root / "data" / split / f"c{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "data" / split / f"c{label}" / f"{i}.png")
    return root / "data"


@pytest.mark.slow
def test_finetune_under_torchrun_matches_one_rank_accumulating_and_resumes_exactly(tmp_path, tiny, monkeypatch):
    """``torchrun --nproc-per-node=2 -m mixedae_fast.cli finetune``: rank 0 alone prints the line per epoch and
    writes checkpoints, export and results; 2 ranks x batch 4 train what one rank does with batch 4 x 2
    accumulated (the same images per step: the loaders deal consecutive batches); a resume on 2 ranks from
    the first epoch's checkpoint ends bitwise where the uninterrupted run did."""
    from mixedae_fast.cli import main
    from mixedae_fast.downstream.finetune_folder import load_finetune_checkpoint

    run, data = _tiny_run(tmp_path, tiny), _image_folders(tmp_path)
    common = ["finetune", str(run), "--data-dir", str(data), "--epochs", "2", "--recipe", "light", "--batch-size",
              "4", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "mixedae_fast.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MIXEDAE_CACHE=str(tmp_path / "cache"))
    two = tmp_path / "two"
    done = subprocess.run([*torchrun, *common, "--out", str(two)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("pretrained epoch")]
    assert [line.split(":")[0] for line in lines] == ["pretrained epoch 1/2", "pretrained epoch 2/2"], done.stdout
    report = json.loads((two / "results.json").read_text())
    assert report["ranks"] == 2 and report["results"]["pretrained"]["global_batch"] == 8
    assert (two / "export_timm" / "model.safetensors").is_file()

    monkeypatch.setenv("MIXEDAE_CACHE", str(tmp_path / "cache"))
    one = tmp_path / "one"
    assert main([*common, "--accum-steps", "2", "--out", str(one)]) == 0
    a, b = (load_finetune_checkpoint(d / "checkpoints" / "ckpt-00000002.pt") for d in (two, one))
    assert a["step"] == b["step"] == 2 * 4 and a["world_size"] == 2 and b["world_size"] == 1
    for name, value in a["classifier"].items():
        torch.testing.assert_close(b["classifier"][name], value, rtol=1e-4, atol=1e-5, msg=name)

    again = subprocess.run([*torchrun, *common, "--out", str(two), "--resume",
                            str(two / "checkpoints" / "ckpt-00000001.pt")], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("pretrained epoch 2/2") == 1 and "pretrained epoch 1/2" not in again.stdout
    old = load_finetune_checkpoint(two / "checkpoints" / "abandoned-00000001" / "ckpt-00000002.pt")
    new = load_finetune_checkpoint(two / "checkpoints" / "ckpt-00000002.pt")
    for name, value in old["classifier"].items():
        assert torch.equal(new["classifier"][name], value), name
