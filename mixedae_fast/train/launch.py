"""Launch commands for several processes: torchrun on one node, an sbatch script for SLURM.

``mixedae-fast launch local`` is :func:`launch_local`, ``launch slurm`` is :func:`launch_slurm`
(:func:`write_sbatch`, then :func:`submit_sbatch` with ``--submit``). No torch import: the command line
runs these without paying for torch. The training itself is ``mixedae-fast pretrain`` in every rank
(distributed.py reads the environment torchrun sets).

The SLURM script runs one torchrun per node (``srun --ntasks-per-node=1``); the torchruns meet at a
c10d rendezvous on the job's first node and start one rank per GPU. Preemption: SLURM sends SIGUSR1
to the batch shell ``signal_lead_s`` before the time limit (``--signal=B:USR1@...``); the shell passes
SIGTERM to the step (srun hands it to torchrun, torchrun to the ranks, which agree on a step, save
and exit), then runs ``scontrol requeue``: the job goes back to the queue and continues from the
newest complete checkpoint, since the command carries ``--run.resume=auto``. A SIGTERM to the shell
(``scancel``, or preemption, where SLURM requeues by itself) is passed on the same way, without the
requeue. SIGTERM rather than SIGUSR1 goes to the ranks because torchrun stops its workers on SIGTERM
whatever its version; ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` gives them time to save before it kills them.
"""
from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mixedae_fast.config import Config, derive

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SBATCH_SPECIAL = re.compile(r"[\s\"'\\#]")


def check_line_safe(what: str, value: str) -> str:
    """``value`` unless it holds a newline or another control character: written into a script, a newline
    starts a new command (even after ``#SBATCH``, which is a comment to the shell)."""
    if _CONTROL.search(value):
        raise ValueError(f"{what} = {value!r} contains a newline or another control character, which would "
                         "start a new line of the sbatch script; remove it")
    return value


def sbatch_value(value: str) -> str:
    """A value for an ``#SBATCH --key=value`` line. sbatch, not the shell, reads these lines: it splits on
    whitespace, groups with quotes, takes ``\\`` as an escape and ``#`` as the start of a comment; so a
    value with any of those goes in double quotes with ``"`` and ``\\`` escaped."""
    if not _SBATCH_SPECIAL.search(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
PRETRAIN = ["-m", "mixedae_fast.cli", "pretrain"]


def with_resume_auto(args: list[str]) -> list[str]:
    """``args`` with ``--run.resume=auto`` unless they choose a resume already."""
    if any(a.lstrip("-").startswith("run.resume=") for a in args):
        return list(args)
    return [*args, "--run.resume=auto"]


def local_command(nproc: int, pretrain_args: list[str]) -> list[str]:
    """torchrun on this node: ``nproc`` ranks, a rendezvous on a free local port."""
    if nproc < 1:
        raise ValueError(f"--nproc = {nproc}: must be >= 1; pass the number of ranks for this node (one per GPU)")
    return [*TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", *PRETRAIN, *pretrain_args]


@dataclass
class SlurmJob:
    """What the sbatch script asks of SLURM."""

    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_gpu: int = 8
    time: str = "24:00:00"
    job_name: str = "mixedae"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None  # --mem per node (e.g. 0 = all of it); None = the cluster's default
    signal_lead_s: int = 300  # SIGUSR1 this long before the time limit: save and requeue
    port: int = 29500  # the rendezvous port on the first node
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH" options, e.g. --constraint=h100
    setup: list[str] = field(default_factory=list)  # shell lines before training, e.g. module load ...

    def check(self) -> None:
        for name in ("time", "job_name", "partition", "account", "qos", "mem"):
            value = getattr(self, name)
            if value is not None:
                check_line_safe(f"--{name.replace('_', '-')}", str(value))
        for option in self.extra_sbatch:
            check_line_safe("--sbatch", option)
        for line in self.setup:
            check_line_safe("--setup", line)
        for name in ("nodes", "gpus_per_node", "cpus_per_gpu", "signal_lead_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)}: must be >= 1; pass a positive "
                                 "whole number, or leave it out for its default")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port = {self.port}: must be in [1, 65535]")
        if self.signal_lead_s < 60:
            raise ValueError(f"--signal-lead = {self.signal_lead_s} s leaves too little time to save a checkpoint; "
                             "use >= 60")


def sbatch_script(job: SlurmJob, pretrain_args: list[str], log_dir: Path, workdir: Path, summary: str = "") -> str:
    """The sbatch script: one torchrun per node, ranks save on SIGUSR1/SIGTERM, requeue on SIGUSR1."""
    job.check()
    for what, path in (("the log folder (run.out_dir/run.name/slurm)", str(log_dir)),
                       ("the work folder", str(workdir))):
        check_line_safe(what, path)
        if "%" in path:  # sbatch would read %j, %x... in --output as its filename patterns
            raise ValueError(f"{what} {path!r} contains '%', which sbatch reads as a filename pattern; choose "
                             "a run.out_dir without '%'")
    for arg in pretrain_args:
        check_line_safe("a pretrain option", arg)
    world = job.nodes * job.gpus_per_node
    sbatch = [f"--job-name={sbatch_value(job.job_name)}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
              f"--gpus-per-node={job.gpus_per_node}", f"--cpus-per-task={job.cpus_per_gpu * job.gpus_per_node}",
              f"--time={sbatch_value(job.time)}", f"--output={sbatch_value(f'{log_dir}/%x-%j.out')}",
              "--open-mode=append", "--requeue", f"--signal=B:USR1@{job.signal_lead_s}",
              f"--chdir={sbatch_value(str(workdir))}"]
    sbatch += [f"--{k}={sbatch_value(v)}" for k, v in (("partition", job.partition), ("account", job.account),
                                                         ("qos", job.qos), ("mem", job.mem)) if v is not None]
    # an extra option is passed as the user wrote it (it may be "--constraint=a&b" or "-C h100"), one line each
    sbatch += [s if s.startswith("-") else f"--{s}" for s in job.extra_sbatch]
    q = shlex.quote  # the script's own "$VARS" stay as written; everything else is quoted
    command = " \\\n    ".join(" ".join(words) for words in (
        ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"],
        [*map(q, TORCHRUN), '--nnodes="$SLURM_JOB_NUM_NODES"', f"--nproc-per-node={job.gpus_per_node}"],
        ["--rdzv-backend=c10d", f'--rdzv-endpoint="$head_node:{job.port}"', '--rdzv-id="$SLURM_JOB_ID"',
         "--max-restarts=0"],
        [*PRETRAIN, "--no-progress", *map(q, with_resume_auto(pretrain_args))]))
    grace = max(job.signal_lead_s - 30, 30)
    lines = [
        "#!/bin/bash",
        "# MixedAE pretraining on SLURM, written by `mixedae-fast launch slurm`. Submit: sbatch <this file>",
        f"# {_count(job.nodes, 'node')} x {_count(job.gpus_per_node, 'GPU')} = {world} ranks. {summary}".rstrip(),
        "# One torchrun per node starts one rank per GPU; the ranks meet at a c10d rendezvous on the first",
        f"# node. SIGUSR1 {job.signal_lead_s} s before the time limit: the ranks save a checkpoint at a step they",
        "# agree on, then the job requeues itself and resumes from it (--run.resume=auto). SIGTERM",
        "# (scancel, preemption): they save and stop, no requeue.",
        *[f"#SBATCH {s}" for s in sbatch],
        "",
        "set -u",
        *job.setup,
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={grace}  # torchrun's wait for the ranks to save after SIGTERM",
        "requeue=0",
        'on_usr1() { echo "[mixedae] SIGUSR1: time limit near; the ranks save, then the job requeues"; requeue=1;'
        ' kill -TERM "$step" 2>/dev/null; }',
        'on_term() { echo "[mixedae] SIGTERM: the ranks save and stop"; kill -TERM "$step" 2>/dev/null; }',
        "trap on_usr1 USR1",
        "trap on_term TERM",
        f"{command} &",
        "step=$!",
        "# a trapped signal interrupts `wait`: wait again until the step has ended, for its exit status",
        'wait "$step"; rc=$?',
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; rc=$?; done',
        'if [[ $requeue == 1 && $rc != 0 ]]; then',
        '  echo "[mixedae] requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("s" if n != 1 else "")


# -- the two launches -------------------------------------------------------------------------------

def launch_summary(cfg: Config, world: int) -> str:
    """One line on what ``world`` ranks of ``cfg`` train with: the global batch and the lr."""
    d = derive(cfg, world)
    return (f"Global batch {d.global_batch} = data.batch_size {cfg.data.batch_size} x {world} ranks x "
            f"optim.accum_steps {cfg.optim.accum_steps}; lr {d.lr:.3g}.")


def launch_local(cfg: Config, nproc: int, pretrain_args: list[str], dry_run: bool = False) -> int:
    """Print the summary and the torchrun command of ``nproc`` ranks on this node, then run it (unless
    ``dry_run``); its exit status. ``pretrain_args``: the ``pretrain`` options every rank gets, ``cfg``
    what they resolve to (checked here once, not in every rank)."""
    summary = launch_summary(cfg, nproc)
    command = local_command(nproc, pretrain_args)
    print(f"{summary}\n+ {shlex.join(command)}", flush=True)
    return 0 if dry_run else subprocess.call(command)


def _our_sbatch(path: Path) -> bool:
    """Whether ``path`` is a script ``launch slurm`` wrote (its second line says so): rewriting it is safe."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "written by `mixedae-fast launch slurm`" in f.readline(200) + f.readline(200)
    except OSError:
        return False


def write_sbatch(cfg: Config, job: SlurmJob, pretrain_args: list[str], script: str | Path | None = None,
                 force: bool = False, summary: str | None = None) -> Path:
    """Write the sbatch script of ``job`` training ``cfg`` (:func:`sbatch_script`; its log folder
    ``<run dir>/slurm`` created, as SLURM does not) to ``script``, default ``<run dir>/slurm/pretrain.sbatch``,
    and return its path. A file there that this did not write is refused unless ``force``."""
    summary = launch_summary(cfg, job.nodes * job.gpus_per_node) if summary is None else summary
    run_dir = (Path(cfg.run.out_dir) / cfg.run.name).resolve()
    text = sbatch_script(job, pretrain_args, run_dir / "slurm", Path.cwd(), summary)
    script = Path(script) if script else run_dir / "slurm" / "pretrain.sbatch"
    if script.is_dir():
        raise ValueError(f"--script {script}: is a folder; pass a file path")
    if script.exists() and not force and not _our_sbatch(script):
        raise ValueError(f"--script {script}: exists and was not written by `mixedae-fast launch slurm`; pass "
                         "another path, or --force to replace it")
    script.parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    script.chmod(0o755)
    return script


def submit_sbatch(script: str | Path) -> tuple[int, str]:
    """``sbatch script``: its exit status and what it said (the job id, or why not)."""
    try:
        done = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise FileNotFoundError("sbatch not found: run this on a SLURM login node, or submit the script "
                                "there") from None
    return done.returncode, (done.stdout + done.stderr).strip()


def launch_slurm(cfg: Config, job: SlurmJob, pretrain_args: list[str], script: str | Path | None = None,
                 force: bool = False, submit: bool = False) -> int:
    """Write the sbatch script (:func:`write_sbatch`), say where, and submit it with ``submit``; the exit
    status (sbatch's when submitted)."""
    summary = launch_summary(cfg, job.nodes * job.gpus_per_node)
    path = write_sbatch(cfg, job, pretrain_args, script, force, summary)
    print(f"{summary}\nwrote {path}", flush=True)
    if not submit:
        print(f"submit with: sbatch {shlex.quote(str(path))}")
        return 0
    code, said = submit_sbatch(path)
    print(said)
    return code


# -- SLURM host lists (read by distributed.dist_env for the rendezvous address) ---------------------

# the host list comes from SLURM (SLURM_STEP_NODELIST, SLURM_JOB_NODELIST); only its first host is needed
_NODELIST_FIX = "set MASTER_ADDR to the job's first host, which is then used instead"


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list -> host names, in order: ``node[01-04,07]`` -> node01, node02, node03,
    node04, node07; ``a1,b[1-2]``; ``rack[1-2]-n[1-2]`` (every combination). Zero padding is kept."""
    hosts = []
    for item in _split_top_level(nodelist):
        parts = re.split(r"(\[[^\[\]]*\])", item)  # text, [ranges], text, ...
        if any(c in p for p in parts[::2] for c in "[]"):
            raise ValueError(f"host list {nodelist!r}: unbalanced brackets in {item!r}; {_NODELIST_FIX}")
        choices = [[p] if i % 2 == 0 else _expand_ranges(p[1:-1], nodelist) for i, p in enumerate(parts)]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    if not hosts:
        raise ValueError(f"host list {nodelist!r} names no host; {_NODELIST_FIX}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "[") - (c == "]")
        if depth not in (0, 1):
            raise ValueError(f"host list {text!r}: unbalanced brackets; {_NODELIST_FIX}")
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"host list {text!r}: unbalanced brackets; {_NODELIST_FIX}")
    items.append(text[start:])
    return [s.strip() for s in items if s.strip()]


def _expand_ranges(spec: str, nodelist: str) -> list[str]:
    out = []
    for piece in spec.split(","):
        lo, _, hi = piece.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"host list {nodelist!r}: [{spec}] is not a list of numbers and ranges like 01-04; "
                             f"{_NODELIST_FIX}")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
    return out
