"""Image folders as users really have them: symbolic-link loops, and images that are not 8-bit RGB."""
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from mixedae_fast.pipelines.files import scan_image_folder, to_rgb


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def test_symlink_loops_are_walked_once(tmp_path):
    root = tmp_path / "data"
    _png(root / "a" / "0.png")
    _png(root / "a" / "sub" / "1.png")
    (root / "a" / "sub" / "up").symlink_to(root / "a")            # one loop
    _png(root / "b" / "2.png")
    (root / "b" / "self1").symlink_to(root / "b")                 # two loops in one class: 2^depth paths
    (root / "b" / "self2").symlink_to(root / "b")
    result = []
    worker = threading.Thread(target=lambda: result.append(scan_image_folder(root)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the scan does not end on two symlink loops"
    paths, labels, classes = result[0]
    assert classes == ["a", "b"]
    assert sorted(p.replace(str(root) + "/", "") for p in paths) == ["a/0.png", "a/sub/1.png", "b/2.png"]
    assert labels == [0, 0, 1]


def test_a_link_to_an_ancestor_or_another_class_lists_nothing_twice(tmp_path):
    """``a/root -> data`` walked every class again under label a (b's image twice, once mislabelled);
    a link into another class's folder did the same. A link elsewhere is still followed."""
    root = tmp_path / "data"
    _png(root / "a" / "0.png")
    _png(root / "b" / "1.png")
    _png(tmp_path / "extra" / "2.png")
    (root / "a" / "root").symlink_to(root)
    (root / "a" / "top").symlink_to(tmp_path)
    (root / "a" / "b_too").symlink_to(root / "b")
    (root / "b" / "more").symlink_to(tmp_path / "extra")
    paths, labels, classes = scan_image_folder(root)
    listed = sorted(zip((p.replace(str(root) + "/", "") for p in paths), labels))
    assert listed == [("a/0.png", 0), ("b/1.png", 1), ("b/more/2.png", 1)]


def test_hidden_folders_are_not_entered(tmp_path):
    root = tmp_path / "data"
    _png(root / "a" / "0.png")
    _png(root / "a" / ".thumbs" / "1.png")
    assert [p.rsplit("/", 1)[1] for p in scan_image_folder(root)[0]] == ["0.png"]


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(tmp_path / "g16.png")  # 32896 / 257 = 128
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (4, 4, 3) and (rgb == 128).all()
    wide = Image.fromarray(np.full((2, 2), 65535, np.int32), "I")
    assert (np.asarray(to_rgb(wide)) == 255).all()
    narrow = Image.fromarray(np.full((2, 2), 200, np.int32), "I")  # an 8-bit image held as I
    assert (np.asarray(to_rgb(narrow)) == 200).all()


def test_the_file_loader_reads_16_bit_images_scaled(tmp_path):
    from mixedae_fast.pipelines.torch_loader import IMAGENET_MEAN, IMAGENET_STD, FileImageLoader

    (tmp_path / "a").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "a" / f"{i}.png")   # grey 128
    images, _ = next(iter(FileImageLoader(tmp_path, batch_size=2, img_size=8, augment=False, verify=False)))
    pixels = images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, torch.full_like(pixels, 128 / 255), atol=1e-6, rtol=0)


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.new("L", (2, 2), 77), (77, 77, 77)),
    (lambda: Image.new("LA", (2, 2), (90, 10)), (90, 90, 90)),
    (lambda: Image.new("RGBA", (2, 2), (1, 2, 3, 0)), (1, 2, 3)),
    (lambda: Image.new("CMYK", (2, 2), (0, 0, 0, 0)), (255, 255, 255)),
    (lambda: Image.new("1", (2, 2), 1), (255, 255, 255)),
], ids=["L", "LA", "RGBA", "CMYK", "1"])
def test_other_modes_convert_to_rgb(make, expected):
    rgb = to_rgb(make())
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == expected


def test_palette_with_transparency_converts_without_a_warning(tmp_path):
    im = Image.new("P", (2, 2), 1)
    im.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    im.save(tmp_path / "p.png", transparency=bytes([0, 128] + [255] * 254))
    with Image.open(tmp_path / "p.png") as p:
        assert p.mode == "P" and isinstance(p.info.get("transparency"), bytes)
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("error")
            rgb = to_rgb(p)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (200, 10, 20)
