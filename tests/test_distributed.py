"""Several processes on the CPU (gloo): the launch environment, sharding, the sbatch script, and real
2-rank runs — the same loss trajectory as 1 rank with the same global batch, a 2-rank checkpoint
resumed on 1 rank, a signal on one rank stopping all of them at one step, and a dead or stalled rank
failing the job with a message instead of a hang. Every process is started with a time limit."""
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES

from mixedae_fast.cli import main
from mixedae_fast.config import ConfigError, load_config
from mixedae_fast.pipelines.torch_loader import EpochBatchSampler, TensorBatchLoader, shard_batches
from mixedae_fast.train.distributed import DistEnv, dist_env, failure_message
from mixedae_fast.train.launch import SlurmJob, expand_nodelist, sbatch_script

# 40 images, batch 8 a rank: 2 ranks x 2 batches = 2 steps an epoch, 4 epochs = 8 steps
TINY = [*TINY_OVERRIDES, "--optim.epochs=4", "--optim.warmup_epochs=1", "--run.log_every=1",
        "--run.ckpt_every=4", "--run.keep_last=10", "--run.eval=false"]
DATA = ["--no-progress", "--num-train", "40", "--num-val", "20"]
LIMIT = 120  # seconds any one process may take before the test fails (they take a few)
# DDP sums the ranks' gradients in the backend's order while one rank adds its micro-batches up in
# sequence, and fp32 addition is not associative: the trajectories may differ in the last bits and
# drift apart slowly. With 2 ranks and exact power-of-two scaling they agree bitwise here, which this
# bound does not rely on.
RTOL = 1e-5


# -- the launch environment ---------------------------------------------------------------------

def test_expand_nodelist():
    assert expand_nodelist("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert expand_nodelist("a1,b[8-11]") == ["a1", "b8", "b9", "b10", "b11"]
    assert expand_nodelist("rack[1-2]-n[01-02],login") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02",
                                                              "login"]
    assert expand_nodelist("gpu-001") == ["gpu-001"]
    for bad in ("node[01-04", "node]1[", "node[4-1]", "node[a-b]", ""):
        with pytest.raises(ValueError, match="host list"):
            expand_nodelist(bad)


def test_dist_env_reads_torchrun_then_slurm():
    assert dist_env({}) == DistEnv()
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    assert dist_env(torchrun) == DistEnv(3, 8, 1, "h0", 1234, "torchrun")
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
             "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "99", "SLURM_STEP_NODELIST": "gpu[07-10]"}
    assert dist_env(slurm) == DistEnv(5, 8, 1, "gpu07", 29500 + 4242 % 1000, "slurm", "4242")
    assert dist_env({**slurm, "MASTER_ADDR": "x", "MASTER_PORT": "7"}).master_port == 7
    # torchrun started by srun (one task per node): torchrun's variables name the rank
    assert dist_env({**slurm, **torchrun}).launcher == "torchrun"
    # the batch script or an salloc shell: SLURM_NTASKS but no step, so one process
    shell = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert dist_env(shell) == DistEnv(slurm_job_id="4242")
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        dist_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world size 2\)"):
        dist_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_dist_config_section():
    cfg = load_config("cpu_tiny", ["--dist.grad_comm=bf16", "--dist.timeout_s=30"])
    assert cfg.dist.grad_comm == "bf16" and cfg.dist.timeout_s == 30.0 and cfg.dist.backend == "auto"
    with pytest.raises(ConfigError, match=r"dist.backend = 'mpi': must be one of auto, nccl, gloo"):
        load_config("cpu_tiny", ["--dist.backend=mpi"])
    with pytest.raises(ConfigError, match=r"dist.timeout_s = 0.0: must be > 0"):
        load_config("cpu_tiny", ["--dist.timeout_s=0"])
    assert cfg.derive(world_size=4).global_batch == 4 * 32 and cfg.derive(4).lr == pytest.approx(1.2e-2 / 2)


# -- sharding: a step's samples do not depend on how the global batch is split ------------------

def test_shards_deal_global_batches():
    n, B = 70, 4
    for W, A in ((1, 4), (2, 2), (4, 1)):  # global batch 16 split three ways
        shards = [shard_batches(n, B, k, W) for k in range(W)]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == n // (B * W)
        steps = [sorted(i for k in range(W) for a in range(A) for i in range(70)[shards[k][s * A + a][1]])
                 for s in range(len(shards[0]) // A)]
        assert steps == [list(range(16 * s, 16 * s + 16)) for s in range(n // 16)]
    tails = [shard_batches(n, B, k, 4, drop_last=False)[-1] for k in range(4)]  # 70 - 64 = 6: 1 sample each
    assert [range(70)[s] for _, s in tails] == [range(64, 65), range(65, 66), range(66, 67), range(67, 68)]
    sampler = EpochBatchSampler(n, B, seed=1, shard_id=1, num_shards=2)
    assert [j for b in sampler for _, j in b] == sampler.indices(0).tolist()[:len(sampler) * B]


def test_sharded_tensor_loader_draws_what_one_loader_draws():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, 40)
    one = [im for im, _ in TensorBatchLoader(x, y, 4, 16, seed=3)]
    two = [[im for im, _ in TensorBatchLoader(x, y, 4, 16, seed=3, shard_id=k, num_shards=2)] for k in range(2)]
    for i in range(5):  # the i-th batch of shard k is global batch 2i + k, crops included
        assert torch.equal(two[0][i], one[2 * i]) and torch.equal(two[1][i], one[2 * i + 1])


# -- the SLURM script ------------------------------------------------------------------------------

def test_sbatch_script(tmp_path, capsys):
    args = ["launch", "slurm", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "2:00:00",
            "--signal-lead", "240", "--sbatch=--constraint=h100", "--setup=module load cuda", "--config", "vit_base",
            "--max-steps", "100", f"--run.out_dir={tmp_path}", "--run.name=my run", "--optim.accum_steps=2"]
    assert main(args) == 0
    script = tmp_path / "my run" / "slurm" / "pretrain.sbatch"
    text = script.read_text()
    out = capsys.readouterr().out
    assert "Global batch 4096 = data.batch_size 256 x 8 ranks x optim.accum_steps 2" in out and str(script) in out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --time=2:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=B:USR1@240", "#SBATCH --requeue", "#SBATCH --constraint=h100",
                 f'#SBATCH --output="{tmp_path}/my run/slurm/%x-%j.out"', f"#SBATCH --chdir={Path.cwd()}",
                 "module load cuda", "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=210"):
        assert line in text.splitlines() or line in text, line
    command = " ".join(text.split("\\\n"))
    for part in ("--nproc-per-node=4", '--rdzv-endpoint="$head_node:29500"', "--rdzv-backend=c10d",
                 '--rdzv-id="$SLURM_JOB_ID"', "-m mixedae_fast.cli pretrain --no-progress --config vit_base "
                 "--max-steps 100", "'--run.name=my run'", "--run.resume=auto"):
        assert part in command, part
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert main(["launch", "slurm", "--signal-lead", "10"]) == 2
    assert "too little time" in capsys.readouterr().err


FAKE_SRUN = """#!/bin/bash
echo "$@" > "$FAKE_LOG/srun.args"
trap 'echo TERM > "$FAKE_LOG/srun.signal"; exit 130' TERM
echo started > "$FAKE_LOG/srun.started"
while true; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/bin/bash
if [[ $1 == show ]]; then echo node01; echo node02; else echo "$@" >> "$FAKE_LOG/scontrol.log"; fi
"""


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_sbatch_script_passes_signals_on_and_requeues(tmp_path, sig, requeued):
    """The script under bash with a fake srun and scontrol: SIGUSR1 -> SIGTERM to the step, then
    `scontrol requeue`; SIGTERM -> passed on, no requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(SlurmJob(nodes=2), ["--config", "vit_base"], tmp_path, tmp_path))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path),
           "SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_NUM_NODES": "2"}
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        _wait_for(lambda: (tmp_path / "srun.started").exists(), job, "the fake srun to start")
        job.send_signal(sig)
        out, _ = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 130, out
    assert (tmp_path / "srun.signal").read_text().strip() == "TERM"
    assert "--rdzv-endpoint=node01:29500" in (tmp_path / "srun.args").read_text()
    log = tmp_path / "scontrol.log"
    assert (log.read_text().split() == ["requeue", "777"]) if requeued else not log.exists(), out


# -- runs on 2 processes -----------------------------------------------------------------------

def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                         "MASTER_ADDR", "MASTER_PORT")}
    # one thread a process, as torchrun sets it: the 1-rank runs then split the work the same way
    return {**env, "MIXEDAE_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra}


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mixedae_fast.cli", *args], env=env, capture_output=True,
                          text=True, timeout=LIMIT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _losses(run_dir: Path) -> dict[int, list[float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): [float(r[k]) for k in ("loss", "loss_rec", "loss_hc")] for r in csv.DictReader(f)}


def _rows(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    return max(sum(1 for _ in open(path)) - 1, 0) if path.exists() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(ready, *procs, what="the ranks to train", limit=LIMIT):
    t0 = time.monotonic()
    while not ready():
        for p in procs:
            if not isinstance(p, str) and p.poll() is not None:
                raise AssertionError(f"a process ended (rc {p.returncode}) before {what}")
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _spawn_ranks(args: list[str], env: dict, launcher: str, world: int = 2) -> list[subprocess.Popen]:
    """``world`` ranks started directly (no torchrun), with torchrun's or an srun step's variables."""
    port, procs = _free_port(), []
    for rank in range(world):
        if launcher == "torchrun":
            v = dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        else:
            v = dict(SLURM_JOB_ID=4242, SLURM_STEP_ID=0, SLURM_PROCID=rank, SLURM_LOCALID=rank,
                     SLURM_STEP_NUM_TASKS=world, SLURM_STEP_NODELIST="localhost", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "mixedae_fast.cli", "pretrain", *args],
                                      env={**env, **{k: str(x) for k, x in v.items()}}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, limit=LIMIT):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=limit))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank hung") from None
    return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of 8 steps, global batch 16: one process with 2 accumulation steps, and 2 ranks
    through `mixedae-fast launch local` (torchrun), which also profiles steps 2..3."""
    root = tmp_path_factory.mktemp("dist")
    env = _env(root / "cache")
    _cli(["pretrain", *DATA, *TINY, f"--run.out_dir={root}", "--run.name=one", "--optim.accum_steps=2"], env)
    two = _cli(["launch", "local", "--nproc", "2", *DATA, *TINY, f"--run.out_dir={root}", "--run.name=two",
                "--run.profile_steps=2:3"], env)
    return root, env, two.stdout


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_the_same_global_batch(runs):
    root, _, stdout = runs
    one, two = _losses(root / "one"), _losses(root / "two")
    assert sorted(two) == list(range(1, 9)) and sorted(one) == sorted(two)  # rank 0 alone wrote the metrics
    for step in one:
        np.testing.assert_allclose(two[step], one[step], rtol=RTOL, err_msg=f"step {step}")
    assert "x 2 ranks (gloo), global batch 16" in stdout
    state = torch.load(root / "two" / "checkpoints" / "ckpt-00000008.pt", weights_only=True)
    assert state["world_size"] == 2 and not any(k.startswith("module.") for k in state["model"])


@pytest.mark.slow
def test_each_rank_writes_its_own_profile_trace(runs):
    root, _, _ = runs
    traces = sorted((root / "two" / "profile").glob("*.pt.trace.json"))
    assert [t.name for t in traces] == ["steps-2-3.rank0.pt.trace.json", "steps-2-3.rank1.pt.trace.json"]
    for trace in traces:
        names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
        assert {"ProfilerStep#2", "ProfilerStep#3", "forward", "backward"} <= names


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank(runs, tmp_path, monkeypatch, capsys):
    root, env, _ = runs
    (tmp_path / "one" / "checkpoints").mkdir(parents=True)
    shutil.copy(root / "two" / "checkpoints" / "ckpt-00000004.pt", tmp_path / "one" / "checkpoints")
    # the global batch of 16 on 1 rank needs 2 accumulation steps: another split is refused
    monkeypatch.setenv("MIXEDAE_CACHE", env["MIXEDAE_CACHE"])
    assert main(["pretrain", *DATA, *TINY, f"--run.out_dir={tmp_path}", "--run.name=one", "--run.resume=auto"]) == 2
    assert re.search(r"error: .*global batch of 16 \(data.batch_size 8 x 2 ranks x optim.accum_steps 1\); "
                     r"this run has 8 .* --optim.accum_steps=2", capsys.readouterr().err)
    _cli(["pretrain", *DATA, *TINY, f"--run.out_dir={tmp_path}", "--run.name=one", "--optim.accum_steps=2",
          "--run.resume=auto"], env)
    resumed, straight = _losses(tmp_path / "one"), _losses(root / "one")
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        np.testing.assert_allclose(resumed[step], straight[step], rtol=RTOL, err_msg=f"step {step}")


@pytest.mark.slow
def test_bf16_gradient_communication(runs, tmp_path):
    """dist.grad_comm=bf16 goes through the comm hook: close to fp32 all-reduce, not equal to it."""
    root, env, _ = runs
    procs = _spawn_ranks([*DATA, *TINY, f"--run.out_dir={tmp_path}", "--run.name=bf16", "--dist.grad_comm=bf16",
                          "--max-steps", "4"], env, "slurm")
    for p, (_, err) in zip(procs, _finish(procs)):
        assert p.returncode == 0, err[-3000:]
    bf16, fp32 = _losses(tmp_path / "bf16"), _losses(root / "two")
    assert bf16[1] == fp32[1]  # before the first update
    for step in (2, 3, 4):
        np.testing.assert_allclose(bf16[step], fp32[step], rtol=1e-2)
    assert any(bf16[s] != fp32[s] for s in (3, 4))


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_one_step_and_requeues(tmp_path):
    """SIGUSR1 to rank 1 only (an srun step): the ranks vote, stop after the same step, rank 0 saves
    and runs `scontrol requeue` (a fake one here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    env = _env(tmp_path / "cache", PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path))
    run = tmp_path / "stop"
    procs = _spawn_ranks([*DATA, *TINY, f"--run.out_dir={tmp_path}", "--run.name=stop", "--optim.epochs=1000",
                          "--run.ckpt_every=100000"], env, "slurm")
    try:
        _wait_for(lambda: _rows(run) >= 3, *procs)
        procs[1].send_signal(signal.SIGUSR1)
        outs = _finish(procs)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [130, 130], outs[0][1][-2000:] + outs[1][1][-2000:]
    step = max(_losses(run))
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"ckpt-{step:08d}.pt"]
    assert f"SIGUSR1: saved {run}/checkpoints/ckpt-{step:08d}.pt" in outs[0][0] + outs[0][1]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_a_dead_or_stalled_rank_fails_the_job_with_a_message(tmp_path, how):
    timeout = 4
    env = _env(tmp_path / "cache")
    run = tmp_path / "dead"
    procs = _spawn_ranks([*DATA, *TINY, f"--run.out_dir={tmp_path}", "--run.name=dead", "--optim.epochs=1000",
                          "--run.ckpt_every=100000", f"--dist.timeout_s={timeout}"], env, "torchrun")
    try:
        _wait_for(lambda: _rows(run) >= 3, *procs)
        t0 = time.monotonic()
        procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        out, err = procs[0].communicate(timeout=timeout + 60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    assert "error: rank 0 of 2: communication with the other ranks failed" in err
    assert f"dist.timeout_s = {timeout} s" in err and "--run.resume=auto" in err and "Traceback" not in err
    if how == "stalled":  # nothing told rank 0: the timeout did
        assert waited >= timeout - 0.5


def test_failure_message_is_only_for_communication_errors():
    from mixedae_fast.config import DistConfig
    from mixedae_fast.train.distributed import Dist

    two = Dist(DistEnv(0, 2), torch.device("cpu"), DistConfig(timeout_s=7))
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: Connection reset by peer")
    assert failure_message(gloo, two, "ckpts").startswith("rank 0 of 2: communication with the other ranks failed "
                                                           "(Read error [127.0.0.1]:1: Connection reset by peer)")
    assert failure_message(ValueError("bad value"), two, "ckpts") is None
    assert failure_message(gloo, Dist(DistEnv(), torch.device("cpu")), "ckpts") is None


def test_launch_local_prints_the_torchrun_command(capsys):
    assert main(["launch", "local", "--nproc", "3", "--dry-run", "--max-steps", "5", "--mixing.group_size=2"]) == 0
    out = capsys.readouterr().out
    assert "Global batch 96 = data.batch_size 32 x 3 ranks" in out
    assert ("-m torch.distributed.run --standalone --nproc-per-node=3 -m mixedae_fast.cli pretrain --config cpu_tiny "
            "--max-steps 5 --mixing.group_size=2") in out


def test_scaling_model_arithmetic():
    from mixedae_fast.benchmarks.scaling_model import allreduce_ms, efficiency

    assert allreduce_ms(1e9, 2, 1.0, 0.0) == pytest.approx(1000.0)  # 2(W-1)/W = 1: 1 GB at 1 GB/s
    assert allreduce_ms(0, 8, 1.0, 1.0, buckets=3) == pytest.approx(3 * 14 * 1e-3)  # latency: 2(W-1) a bucket
    assert efficiency(100.0, 10.0, 1.0) == pytest.approx((100 / 110, 100 / 101))  # 10 ms hide in 66.7 ms
    assert efficiency(30.0, 30.0, 1.0)[1] == pytest.approx(30 / (30 + 1 + 10))  # only 20 ms of backward to hide in
