"""data.verify: full checks every image, sample a seeded 1% (at least 1,000), off none; the cost of a
verification is reported as a rate so the ImageNet-scale cost is known before it is paid."""
import pytest
from PIL import Image

from mixedae_fast.config import ConfigError, load_config
from mixedae_fast.pipelines import files
from mixedae_fast.pipelines.torch_loader import FileImageLoader


def test_subsets():
    assert files.verify_subset(50, "full") == list(range(50)) and files.verify_subset(50, "off") == []
    assert files.verify_subset(50, "sample") == list(range(50))                  # fewer than 1,000: all
    big = files.verify_subset(200_000, "sample", seed=3)
    assert len(big) == 2000 and big == sorted(set(big)) and big == files.verify_subset(200_000, "sample", seed=3)
    assert big != files.verify_subset(200_000, "sample", seed=4)
    with pytest.raises(ValueError, match="data.verify = 'some'"):
        files.verify_subset(5, "some")
    with pytest.raises(ConfigError, match="data.verify = 'all'"):
        load_config("cpu_tiny", ["--data.verify=all"])


def test_modes_in_the_loader_and_the_rate_line(tmp_path, cache, monkeypatch):
    (tmp_path / "a").mkdir()
    for i in range(7):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "a" / f"{i}.png")
    (tmp_path / "a" / "7.png").write_bytes(b"not an image")
    full = FileImageLoader(tmp_path, batch_size=2, img_size=8, verify="full", cache=False)
    assert [b[0] for b in full.bad] and len(full.dataset) == 7
    assert full.verify_rate.startswith(f"verified {tmp_path}: 8 images decoded in")
    assert "images/s" in full.verify_rate and "1.28 M would take" in full.verify_rate
    off = FileImageLoader(tmp_path, batch_size=2, img_size=8, verify="off")
    assert off.bad == [] and len(off.dataset) == 8 and off.verify_rate is None
    monkeypatch.setattr(files, "SAMPLE_MIN", 3)                                    # a sample of 3 of the 8
    sample = FileImageLoader(tmp_path, batch_size=2, img_size=8, verify="sample", cache=False, seed=1)
    checked = files.verify_subset(8, "sample", seed=1)
    assert len(checked) == 3 and len(sample.dataset) == 8 - (7 in checked)
