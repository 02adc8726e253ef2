"""Frozen-encoder evaluation: kNN votes, the linear probe, feature pooling, and loading a trained run
(with the errors a wrong path or a broken run gives)."""
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_OVERRIDES

from mixedae_fast.config import ConfigError, config_to_dict, load_config, save_config
from mixedae_fast.downstream.evaluate import (
    eval_folders,
    evaluate_encoder,
    extract_pooled,
    image_loaders,
    knn_accuracy,
    linear_probe_accuracy,
    load_encoder,
)
from mixedae_fast.model.mixedae import build_model
from mixedae_fast.pipelines.torch_loader import TensorBatchLoader
from mixedae_fast.train.checkpoint import CheckpointError, load_pretrained, save_checkpoint

TINY = [*TINY_OVERRIDES]


def _run_dir(tmp_path, steps=(3, 7), overrides=()):
    """A run directory as `mixedae-fast pretrain` leaves it: config.yaml and checkpoints/."""
    cfg = load_config("cpu_tiny", [*TINY, *overrides])
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    models = {}
    for step in steps:
        torch.manual_seed(step)
        models[step] = build_model(cfg)
        save_checkpoint({"model": models[step].state_dict(), "config": config_to_dict(cfg), "step": step},
                        run / "checkpoints", step, keep_last=5)
    return run, cfg, models


# -- kNN and probe --------------------------------------------------------------------------------

def test_knn_on_a_trivially_separable_set_is_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(5, 16) * 10
    ty, vy = torch.arange(100) % 5, torch.arange(40) % 5
    tx = centres[ty] + 0.1 * torch.randn(100, 16, generator=g)
    vx = centres[vy] + 0.1 * torch.randn(40, 16, generator=g)
    assert knn_accuracy(tx, ty, vx, vy, k=20) == 100.0


def test_knn_votes_are_weighted_by_similarity():
    # one val point: two class-0 neighbours at cosine 0.6, one class-1 neighbour at cosine 0.99
    tx = torch.tensor([[0.6, 0.8], [0.6, -0.8], [0.99, 0.141]])
    ty = torch.tensor([0, 0, 1])
    vx, vy = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert knn_accuracy(tx, ty, vx, vy, k=3, temperature=0.07) == 100.0   # exp(0.99/T) outweighs 2 exp(0.6/T)
    assert knn_accuracy(tx, ty, vx, vy, k=3, temperature=100.0) == 0.0    # nearly a plain majority vote
    assert knn_accuracy(tx, ty, vx, vy, k=1) == 100.0
    with pytest.raises(ValueError, match="k >= 1"):
        knn_accuracy(tx, ty, vx, vy, k=0)


def knn_loop(tx, ty, vx, vy, k, temperature):
    """Cosine kNN, one val point at a time: the k most similar train points vote exp(sim / T) each."""
    correct, tx = 0, tx.double()
    for x, y in zip(vx.double(), vy.tolist()):
        cosines = (tx @ x) / (tx.norm(dim=1) * x.norm())
        sims = sorted(zip(cosines.tolist(), ty.tolist()), reverse=True)
        votes = {}
        for sim, c in sims[:k]:
            votes[c] = votes.get(c, 0.0) + np.exp(sim / temperature)
        correct += max(votes, key=votes.get) == y
    return 100.0 * correct / len(vy)


def test_knn_matches_a_loop_and_is_at_chance_on_shuffled_labels():
    """Overlapping classes (kNN gets some, not all), against a loop written here; the same features
    with the training labels shuffled score near chance (4 classes: 25)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g)
    ty, vy = torch.arange(400) % 4, torch.arange(200) % 4
    tx = centres[ty] + 1.0 * torch.randn(400, 8, generator=g)
    vx = centres[vy] + 1.0 * torch.randn(200, 8, generator=g)
    acc = knn_accuracy(tx, ty, vx, vy, k=10, temperature=0.1)
    assert acc == knn_loop(tx, ty, vx, vy, k=10, temperature=0.1)
    assert 50 < acc < 100
    shuffled = knn_accuracy(tx, ty[torch.randperm(400, generator=g)], vx, vy, k=10, temperature=0.1)
    assert abs(shuffled - 25) < 10        # chance; a 200-point binomial sd of ~3 points


def test_linear_probe_learns_what_knn_cannot():
    # the class is the sign of one coordinate, buried under 31 noisy ones: cosine neighbours are close
    # to chance, a linear classifier finds the coordinate
    g = torch.Generator().manual_seed(0)

    def draw(num):
        y = torch.randint(0, 2, (num,), generator=g)
        x = 3 * torch.randn(num, 32, generator=g)
        x[:, 0] = (2 * y - 1) + 0.1 * torch.randn(num, generator=g)
        return x, y

    (tx, ty), (vx, vy) = draw(1000), draw(300)
    assert knn_accuracy(tx, ty, vx, vy) < 70
    assert linear_probe_accuracy(tx, ty, vx, vy, epochs=30) >= 97   # 100 on seeds 0-2


# -- features -------------------------------------------------------------------------------------

def test_pooled_features_match_the_model_and_keep_the_labels():
    model = build_model(load_config("cpu_tiny", TINY)).eval()
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8), np.arange(10) % 3
    loader = TensorBatchLoader(images, labels, 4, 16, augment=False, shuffle=False, drop_last=False)
    feats, y = extract_pooled(model, loader, torch.device("cpu"), ("avg", "cls"))
    assert feats["avg"].shape == feats["cls"].shape == (10, 32)
    assert y.tolist() == labels.tolist()
    x = torch.cat([im for im, _ in loader])
    with torch.no_grad():
        torch.testing.assert_close(feats["avg"], model.extract_features(x, "avg"))
        torch.testing.assert_close(feats["cls"], model.extract_features(x, "cls"))
    assert not torch.allclose(feats["avg"], feats["cls"])
    both = evaluate_encoder(model, loader, loader, torch.device("cpu"), pool=["avg", "cls"], probe_epochs=2)
    assert set(both) == {"avg", "cls"} and set(both["avg"]) == {"knn", "linear_probe"}
    assert set(evaluate_encoder(model, loader, loader, torch.device("cpu"), probe=False)) == {"knn"}
    with pytest.raises(ValueError, match="pool 'max'"):
        extract_pooled(model, loader, torch.device("cpu"), ("max",))


# -- loading a run --------------------------------------------------------------------------------

def test_load_encoder_takes_the_newest_checkpoint_of_a_run_or_a_given_file(tmp_path):
    run, cfg, models = _run_dir(tmp_path)
    model, loaded_cfg, pre = load_encoder(run, device="cpu")
    assert pre.checkpoint.name == "ckpt-00000007.pt" and pre.step == 7 and pre.run_dir == run
    assert loaded_cfg.model.depth == 2 and not model.training
    torch.testing.assert_close(model.state_dict(), models[7].state_dict())
    model, _, pre = load_encoder(run / "checkpoints" / "ckpt-00000003.pt", device="cpu")
    torch.testing.assert_close(model.state_dict(), models[3].state_dict())
    assert pre.run_dir == run
    _, cfg2, _ = load_encoder(run, device="cpu", overrides=["--runtime.attention_backend=eager"])
    assert cfg2.runtime.attention_backend == "eager"
    with pytest.raises(ConfigError, match="only runtime"):
        load_encoder(run, overrides=["--model.depth=3"])


def test_a_checkpoint_alone_brings_its_config(tmp_path):
    run, _, models = _run_dir(tmp_path)
    (run / "config.yaml").unlink()
    model, _, _ = load_encoder(run, device="cpu")
    torch.testing.assert_close(model.state_dict(), models[7].state_dict())


def test_missing_or_broken_runs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory or checkpoint"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_pretrained(tmp_path / "empty")
    run, cfg, _ = _run_dir(tmp_path, steps=())
    with pytest.raises(CheckpointError, match="config.yaml but no checkpoint"):
        load_pretrained(run)

    run, cfg, models = _run_dir(tmp_path / "b")
    truncated = run / "checkpoints" / "ckpt-00000009.pt"
    truncated.write_bytes((run / "checkpoints" / "ckpt-00000007.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_pretrained(run)
    truncated.unlink()

    no_model = run / "checkpoints" / "ckpt-00000008.pt"
    torch.save({"step": 8}, no_model)
    with pytest.raises(CheckpointError, match="holds no model weights"):
        load_pretrained(no_model)
    no_model.unlink()

    other = yaml.safe_load((run / "config.yaml").read_text())
    other["model"]["depth"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(CheckpointError, match="different models: model.depth: 2 -> 3"):
        load_pretrained(run)


def test_weights_that_do_not_fit_the_config(tmp_path):
    run, cfg, models = _run_dir(tmp_path)
    bare = tmp_path / "bare" / "weights.pt"
    bare.parent.mkdir()
    torch.save(models[7].state_dict(), bare)          # a bare state dict: no config inside
    with pytest.raises(CheckpointError, match="no config for"):
        load_pretrained(bare)
    other = load_config("cpu_tiny", [*TINY, "--model.depth=3"])
    save_config(other, bare.parent / "config.yaml")
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_encoder(bare)


# -- labelled folders -----------------------------------------------------------------------------

def test_eval_folders_need_train_and_val_with_the_same_classes(tmp_path):
    from PIL import Image

    cfg = load_config("cpu_tiny", TINY)
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        eval_folders(cfg=cfg, data_dir=tmp_path / "d")
    for split, classes in (("train", "abc"), ("val", "ab")):
        for c in classes:
            (tmp_path / "d" / split / c).mkdir(parents=True)
            Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "d" / split / c / "0.jpg")
    train, val, name = eval_folders(cfg=cfg, data_dir=tmp_path / "d")
    assert name == "d"
    with pytest.raises(ValueError, match="different class folders"):
        image_loaders(train, val, 16, torch.device("cpu"))
    with pytest.raises(ValueError, match="dataset 'cifar'"):
        eval_folders("cifar", cfg)
    trained_on_files = load_config("cpu_tiny", [*TINY, f"--data.path={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="without data.val_path"):
        eval_folders("run", trained_on_files)
    on_shards = load_config("cpu_tiny", [*TINY, "--data.format=webdataset", f"--data.path={tmp_path}/t-{{0..1}}.tar",
                                         f"--data.val_path={tmp_path}/v-{{0..1}}.tar"])
    with pytest.raises(ValueError, match="data.format=webdataset .* reads ImageFolders.*--data-dir"):
        eval_folders("run", on_shards)


def test_offline_digits_as_an_eval_set(cache):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (the [dev] extra)")
    train, val, name = eval_folders("digits", load_config("cpu_tiny", TINY))
    tl, vl = image_loaders(train, val, 16, torch.device("cpu"), max_train=100)
    assert name == "digits" and len(tl.classes) == 10 and len(tl.dataset) == 100
    images, labels = next(iter(vl))
    assert images.shape[1:] == (3, 16, 16) and labels.max() <= 9
