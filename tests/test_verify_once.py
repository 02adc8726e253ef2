"""Several processes verifying one data set at once (the ranks of a job) decode it once: they take
turns on the cache's lock and the later ones find every file in the cache."""
import subprocess
import sys
import textwrap

from PIL import Image

SCRIPT = textwrap.dedent("""
    import sys, time
    from mixedae_fast.pipelines import files
    paths = sorted(str(p) for p in __import__("pathlib").Path(sys.argv[1]).glob("*.png"))
    _, cost = files.inspect_images(paths)
    print(cost.decoded, cost.cached)
""")


def test_concurrent_verifications_decode_once(tmp_path):
    for i in range(300):
        Image.new("RGB", (16, 16), (i % 256, 0, 0)).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "bad.png").write_bytes(b"no")
    env = {"MIXEDAE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    counts = sorted(tuple(map(int, p.communicate(timeout=120)[0].split())) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert counts == [(0, 301), (0, 301), (301, 0)]                  # one decoded everything, two read it
