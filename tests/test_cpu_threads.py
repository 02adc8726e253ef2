"""The CPU thread count: from the CPUs this process may use (affinity, cgroup quota), overridable."""
import os
import subprocess
import sys

import pytest
import torch

from mixedae_fast.train.cpu_threads import (
    apply_threads,
    cgroup_quota_cpus,
    choose_threads,
    prefer_passive_wait,
    usable_cpus,
)


def _write(root, files: dict):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, cpus", [
    ({"cpu.max": "150000 100000\n"}, 1.5),           # v2 quota
    ({"cpu.max": "max 100000\n"}, None),             # v2, no quota
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),     # v1, no quota
    ({"cpu.max": "garbage\n"}, None),                # unreadable: no quota known
    ({}, None),                                      # no cgroup files at all
])
def test_cgroup_quota_read_from_v1_and_v2_files(tmp_path, files, cpus):
    assert cgroup_quota_cpus(_write(tmp_path, files)) == cpus


def test_the_smaller_of_affinity_and_quota_decides(tmp_path):
    quota_1 = _write(tmp_path / "q", {"cpu.max": "100000 100000\n"})
    assert usable_cpus(affinity=2, root=quota_1) == (1, "cgroup CPU quota 1")
    assert usable_cpus(affinity=1, root=_write(tmp_path / "n", {}))[0] == 1   # taskset -c 0 on a big machine
    assert usable_cpus(affinity=8, quota=2.5)[0] == 3     # a fractional quota rounds up
    assert usable_cpus(affinity=2, quota=16.0)[0] == 2    # a quota above the mask: the mask
    assert usable_cpus(affinity=2, root=_write(tmp_path / "m", {"cpu.max": "max 100000"}))[0] == 2


def test_runtime_threads_then_omp_num_threads_override():
    assert choose_threads(3, env={"OMP_NUM_THREADS": "1"}, affinity=2, quota=None) == (3, "runtime.threads")
    assert choose_threads(0, env={"OMP_NUM_THREADS": "1"}, affinity=8, quota=None) == (1, "OMP_NUM_THREADS")
    assert choose_threads(0, env={"OMP_NUM_THREADS": "x"}, affinity=2, quota=1.0)[0] == 1  # junk: auto


def test_passive_wait_only_when_the_user_chose_no_policy():
    env = {}
    assert prefer_passive_wait(env) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not prefer_passive_wait(env) and env["OMP_WAIT_POLICY"] == "ACTIVE"


def _cli_wait_policy(first: str, env_policy: str | None) -> tuple[str, str]:
    """The OMP_WAIT_POLICY after ``mixedae-fast pretrain --runtime.threads=-1`` in a fresh interpreter
    that ran ``first`` before, and the error line."""
    code = (f"import os, sys\n{first}\nfrom mixedae_fast.cli import main\n"
            "rc = main(['pretrain', '--config', 'cpu_tiny', '--runtime.threads=-1'])\n"
            "print(rc, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy:
        env["OMP_WAIT_POLICY"] = env_policy
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return done.stdout.strip(), done.stderr.strip()


def test_the_cli_sets_passive_wait_before_torch_loads_and_refuses_negative_threads():
    out, err = _cli_wait_policy("", None)
    assert out == "2 PASSIVE"
    assert err.splitlines() == ["error: runtime.threads = -1: must be >= 0"]
    assert _cli_wait_policy("", "ACTIVE")[0] == "2 ACTIVE"        # the user's choice stays
    assert _cli_wait_policy("import torch", None)[0] == "2 None"  # too late to take effect: not claimed


def test_apply_threads_sets_torch_and_says_why(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        assert apply_threads(2).startswith("2 CPU thread(s) (runtime.threads;")
        assert torch.get_num_threads() == 2
        assert apply_threads(0).startswith("1 CPU thread(s) (OMP_NUM_THREADS;")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
