"""How many threads torch's CPU ops use: the CPUs this process may really run on, not the machine's.

``os.cpu_count()`` counts the machine's cores; a process pinned to fewer (``taskset``, SLURM's
``--cpus-per-task``) or held to a CPU quota (a container's cgroup ``cpu.max``, v1 ``cfs_quota_us``)
that starts one thread per core makes its threads wait on each other, and OpenMP's spinning waits
then burn the quota another process needs: on a loaded 2-core machine a 20-step pretrain fell from
143 img/s (one thread) to 8 img/s (issue 29). So the count is the smaller of the affinity mask and the
quota, ``runtime.threads`` (or ``OMP_NUM_THREADS``) overrides it, and the CLI asks OpenMP to wait
passively (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose a policy; that must happen before the
OpenMP runtime loads, i.e. before torch is imported (:func:`prefer_passive_wait`).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all of the machine's where the OS has no such call)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_quota_cpus(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``cpu.max`` of v2, ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` of v1), or None when there is none or it cannot be read."""
    root = Path(root)
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = (v2.read_text().split() + ["100000"])[:2]
            return None if quota == "max" else int(quota) / int(period)
        for v1 in (root / "cpu", root / "cpu,cpuacct", root):
            if (v1 / "cpu.cfs_quota_us").is_file():
                quota = int((v1 / "cpu.cfs_quota_us").read_text())
                period = int((v1 / "cpu.cfs_period_us").read_text())
                return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):
        return None  # an unreadable or odd file: no quota known, the affinity mask decides
    return None


def usable_cpus(affinity: int | None = None, quota: float | None = None,
                root: str | os.PathLike = "/sys/fs/cgroup") -> tuple[int, str]:
    """``(cpus, why)``: the CPUs this process may use, and which limit set it."""
    affinity = affinity_cpus() if affinity is None else affinity
    quota = cgroup_quota_cpus(root) if quota is None else quota
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g}"
    return max(1, affinity), f"{affinity} CPUs in the affinity mask"


def choose_threads(configured: int = 0, env: dict | None = None, **usable) -> tuple[int, str]:
    """``(threads, why)``: ``runtime.threads`` when set (> 0), else ``OMP_NUM_THREADS`` when it is a
    positive integer, else :func:`usable_cpus`."""
    env = os.environ if env is None else env
    if configured > 0:
        return configured, "runtime.threads"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    return usable_cpus(**usable)


def prefer_passive_wait(env: dict | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy; True when it was set here. Call it
    before torch is imported: the OpenMP runtime reads it once, when it loads, so once torch is loaded
    nothing is set (the header line then says the policy really in force)."""
    env = os.environ if env is None else env
    if env.get("OMP_WAIT_POLICY") or (env is os.environ and "torch" in sys.modules):
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def apply_threads(configured: int = 0) -> str:
    """Set torch's intra-op threads by :func:`choose_threads`; the words for the run's header line."""
    import torch

    threads, why = choose_threads(configured)
    torch.set_num_threads(threads)
    wait = os.environ.get("OMP_WAIT_POLICY", "default").lower()
    return f"{threads} CPU thread(s) ({why}; OpenMP wait {wait})"
