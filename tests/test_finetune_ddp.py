"""Fine-tuning on two ranks (gloo, CPU): DDP keeps the ranks' weights identical while they train on
different shards, and the lr follows the global batch."""
import os
import socket
import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent("""
    import sys, torch
    from mixedae_fast._compat import ensure_torchvision
    ensure_torchvision()
    from mixedae_fast.config import load_config
    from mixedae_fast.distributed import init_distributed
    from mixedae_fast.finetune import FinetuneConfig, finetune
    from mixedae_fast.models import build_model
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
