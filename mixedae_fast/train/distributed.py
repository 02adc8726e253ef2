"""Training on several processes: the launch environment (torchrun, SLURM), the process group, DDP,
and what the ranks must agree on (when to stop, the logged metrics).

    torchrun --nproc-per-node=8 -m mixedae_fast.cli pretrain --config vit_base      # one node
    mixedae-fast launch slurm --nodes 4 --gpus-per-node 8 --config vit_base          # many: sbatch

torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are read first; inside an
``srun`` step without torchrun (one task per GPU) SLURM's are (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
SLURM_LOCALID, the first host of SLURM_STEP_NODELIST). One process makes no process group and takes
none of the paths below: a single-process run is what it was.

Each rank trains on its shard of every epoch (the loaders deal global batches round-robin) and draws
the assignment of its groups by their *global* index in the optimizer step, ``(a * W + rank) * G + g``
for micro-step ``a`` (docs/method.md §1), so W ranks and one rank with ``accum_steps = W`` compute the same
step. DDP all-reduces the gradients bucket by bucket while backward runs (on the last micro-step of an
accumulation only), in bf16 with ``dist.grad_comm=bf16``. Rank 0 alone writes the run folder; logged
losses are averaged over the ranks.

Failure and preemption. Every collective has the timeout ``dist.timeout_s``: a rank that dies or
stalls makes the others fail with :func:`failure_message` instead of waiting forever. A signal (SIGTERM,
SIGINT, SIGUSR1) reaches the ranks at different steps, so they vote on stopping every step, on a CPU
(gloo) group and one step late, which never waits on the GPU; all stop after the same step, rank 0
saves, and after SIGUSR1 under SLURM rank 0 requeues the job (:func:`requeue_slurm_job`).
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from mixedae_fast.config import ConfigError
from mixedae_fast.errors import RunFailure
from mixedae_fast.train.launch import expand_nodelist

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as its launcher says."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "none"  # none | torchrun | slurm
    slurm_job_id: str | None = None


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by the launcher: "
                         "torchrun or srun)") from None


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's place in the job, from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, inside a SLURM job as well: its variables win
        found = DistEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0),
                        env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", DEFAULT_PORT), "torchrun", job)
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        # An srun step. The batch script and an salloc shell carry SLURM_NTASKS too, but no step: a
        # plain `python ...` there is one process, not rank 0 of a group that would never gather.
        world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS", 1)
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if world > 1 and not nodes and "MASTER_ADDR" not in env:
            raise ValueError("an srun step of several tasks without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST: "
                             "set MASTER_ADDR to the first node")
        addr = env.get("MASTER_ADDR") or (expand_nodelist(nodes)[0] if nodes else "127.0.0.1")
        # one port per job, so that two jobs sharing a first node do not collide
        port = DEFAULT_PORT + int(job) % 1000 if job and job.isdigit() else DEFAULT_PORT
        found = DistEnv(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0), addr,
                        _int(env, "MASTER_PORT", port), "slurm", job)
    else:
        return DistEnv(slurm_job_id=job)
    if found.world_size < 1 or not 0 <= found.rank < found.world_size:
        raise ValueError(f"rank {found.rank} is not in [0, world size {found.world_size}) (from "
                         f"{'RANK, WORLD_SIZE' if found.launcher == 'torchrun' else 'SLURM_PROCID, SLURM_NTASKS'}); "
                         "start the job through torchrun or srun, which set them, or fix the ones set by hand")
    return found


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of a rank of several: ``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` (``auto`` without CUDA -> cpu)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ConfigError(f"runtime.device = {name!r} with several ranks: each rank takes cuda:LOCAL_RANK; "
                          "set runtime.device=cuda (or auto)")
    if not torch.cuda.is_available():
        raise ConfigError("runtime.device = 'cuda', but CUDA is not available on this machine; use "
                          "runtime.device=cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise RunFailure(f"local rank {local_rank}, but this node shows {torch.cuda.device_count()} GPUs: start "
                           "at most one rank per GPU (torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


def init_distributed(cfg, environ: Mapping[str, str] | None = None) -> Dist:
    """Join the job's process group (none for one process) and pick this rank's device."""
    from mixedae_fast.train.device import resolve_device

    env = dist_env(environ)
    if env.world_size == 1:
        return Dist(env, resolve_device(cfg.runtime.device))
    device = rank_device(cfg.runtime.device, env.local_rank)
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend = 'nccl' needs CUDA devices; use dist.backend=gloo (or auto) on CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.launcher == "slurm":  # torchrun sets these itself (and shares its own store)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.master_addr, str(env.master_port)
    timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
    try:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout, device_id=device if backend == "nccl" else None)
        # stop votes and checks: their own group on the CPU, never waiting for the GPU stream nor
        # interleaving with DDP's all-reduces
        control = dist.new_group(backend="gloo", timeout=timeout)
    except Exception as e:
        raise RunFailure(f"rank {env.rank} of {env.world_size} could not join the process group at "
                         f"{env.master_addr}:{env.master_port} ({type(e).__name__}: {_first_line(e)}); start all "
                         "ranks, check that the address is reachable from every node (MASTER_ADDR, MASTER_PORT), or "
                         f"raise dist.timeout_s (now {cfg.dist.timeout_s:g})") from e
    return Dist(env, device, cfg.dist, backend, control)


class Dist:
    """A run's process group and what the trainer asks of it. With one process (``world_size == 1``)
    there is no group and every method is the identity."""

    def __init__(self, env: DistEnv, device: torch.device, cfg=None, backend: str | None = None, control=None):
        self.env, self.device, self.cfg, self.backend, self._control = env, device, cfg, backend, control
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        self.is_main = self.rank == 0
        self._vote = None  # the stop vote in flight: (work, tensor)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DDP (several ranks), its gradients averaged in buckets of ``dist.bucket_mb``
        while backward runs, in bf16 with ``dist.grad_comm=bf16``; else ``model`` itself."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        kwargs = dict(device_ids=[self.device.index] if self.device.type == "cuda" else None,
                      bucket_cap_mb=self.cfg.bucket_mb)
        # The buffers (fixed sin-cos embeddings) are equal on every rank: no broadcast each forward.
        # torch 2.13 renamed the switch; 2.11 (the GPU image) has only the old name.
        params = inspect.signature(DDP).parameters
        kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
        ddp = DDP(model, **kwargs)
        if self.cfg.grad_comm == "bf16":
            ddp.register_comm_hook(None, _bf16_hook(self.backend))
        return ddp

    def no_sync(self, model: torch.nn.Module, skip: bool):
        """DDP's ``no_sync`` on the micro-steps before the last of an accumulation: gradients add up
        locally and are all-reduced once per optimizer step."""
        return model.no_sync() if skip and self.active else contextlib.nullcontext()

    def mean_over_ranks(self, *parts: dict) -> tuple[dict, ...]:
        """Each dict of scalar tensors averaged over the ranks (one all-reduce; at log steps only)."""
        if not self.active:
            return parts
        keys = [(i, k) for i, part in enumerate(parts) for k in part]
        flat = torch.stack([parts[i][k].detach().float().to(self.device) for i, k in keys])
        dist.all_reduce(flat)
        flat /= self.world_size
        out: tuple[dict, ...] = tuple({} for _ in parts)
        for (i, k), v in zip(keys, flat):
            out[i][k] = v
        return out

    def agree_stop(self, local: str | None) -> str | None:
        """The signal every rank stops on (a name like ``SIGTERM``), or None. One process: ``local``.
        Several: each call posts this rank's signal in an asynchronous MAX all-reduce on the CPU group
        and returns the previous call's result: one step late, the same answer on every rank. SIGTERM
        outranks SIGUSR1 (a cancelled job must not requeue), which outranks SIGINT."""
        if not self.active:
            return local
        previous = self._vote
        mine = torch.tensor([signal.Signals[local].value if local else 0], dtype=torch.int64)
        self._vote = (dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self._control, async_op=True), mine)
        if previous is None:
            return None
        work, result = previous
        work.wait()
        return signal.Signals(int(result)).name if int(result) else None

    def finish_votes(self) -> None:
        """Wait for the stop vote in flight (every rank posted the same number)."""
        if self._vote is not None:
            self._vote[0].wait()
            self._vote = None

    def check_same(self, value: int, what: str, hint: str = "") -> None:
        """Fail on every rank unless all ranks hold the same ``value``."""
        if not self.active:
            return
        t = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        if int(t[0]) != -int(t[1]):
            raise RunFailure(f"ranks disagree on {what}: from {-int(t[1])} to {int(t[0])} (rank {self.rank}: "
                               f"{value}). {hint}")

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self._control)

    def close(self) -> None:
        """Leave the process group (after the last collective)."""
        if self.active and dist.is_initialized():
            self.finish_votes()
            dist.destroy_process_group()

    def abandon(self, code: int) -> NoReturn:
        """Exit at once after a collective failed: a broken process group cannot be shut down (its
        destruction waits on the lost rank, and leaving it to the interpreter aborts in C++, which
        torchrun then blames on this rank). Nothing but the standard streams is flushed."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _bf16_hook(backend: str):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if backend == "nccl":
        return default_hooks.bf16_compress_hook
    compress = getattr(default_hooks, "_compress_hook", None)
    if compress is None:
        raise ConfigError(f"dist.grad_comm = 'bf16' with dist.backend = {backend!r} needs a torch whose DDP hooks "
                          "include _compress_hook; use dist.grad_comm=fp32, or NCCL")

    def bf16_allreduce_hook(process_group, bucket):
        # torch's bf16_compress_hook (cast, divide by the world size, all-reduce, cast back) refuses
        # groups other than NCCL by its name; gloo reduces bf16 too, which the CPU tests use.
        return compress(torch.bfloat16, process_group, bucket)

    return bf16_allreduce_hook


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP (checkpoints hold its state, without the ``module.`` prefix)."""
    return getattr(model, "module", model)


_COMM_ERROR = re.compile(r"gloo|nccl|timed out|timeout|connection|broken pipe|peer|process ?group", re.I)


def failure_message(exc: BaseException, d: Dist, ckpt_dir) -> str | None:
    """A message naming the cause and the way on when ``exc`` is a collective that failed because
    another rank died or stalled; None for any other error (or one process)."""
    if not d.active or not (isinstance(exc, dist.DistError) or _COMM_ERROR.search(f"{type(exc).__name__} {exc}")):
        return None
    return (f"rank {d.rank} of {d.world_size}: communication with the other ranks failed ({_first_line(exc)}). "
            f"Another rank died or stalled: look at its log (torchrun names the first rank that failed); a "
            f"stalled rank fails the job after dist.timeout_s = {d.cfg.timeout_s:g} s. This rank stops too. "
            f"Continue from the newest checkpoint with --run.resume=auto ({ckpt_dir})")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", lines[0]) if lines else type(exc).__name__  # C++ source
    return line[:300]


def requeue_slurm_job(job_id: str) -> None:
    """``scontrol requeue JOB``: the job goes back to the queue; started again, it continues from the
    newest checkpoint when it runs with ``--run.resume=auto`` (the generated sbatch script does)."""
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise RunFailure(f"scontrol not found: cannot requeue SLURM job {job_id}; resubmit it yourself "
                           "(the checkpoint is saved)") from None
    except subprocess.CalledProcessError as e:
        raise RunFailure(f"scontrol requeue {job_id} failed: {e.stderr.strip() or e}; resubmit the job "
                           "yourself (the checkpoint is saved)") from None
