"""CPU threads under load: a short ``pretrain`` (cpu_tiny) with the machine free and with one core kept
busy by a spinning process, torch's default threading against the policy of mixedae_fast/train/cpu_threads.py.

    python benchmarks/bench_threads.py --steps 20 --out benchmarks/results/<date>_cpu-2cores-threads

Rows: ``default`` (torch imported before the CLI, so OpenMP keeps its spinning waits, as before issue 29),
``policy`` (the CLI as shipped: threads from affinity/quota, ``OMP_WAIT_POLICY=PASSIVE``) and
``one-thread`` (``OMP_NUM_THREADS=1``, the override). Each row is a fresh process; the figure is the
img/s of the log line at the last step (the run's own timing, the first steps' warm-up included) and
the process's wall time. Other jobs may share the machine: the result file says so, it does not hide it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "default": ("import torch", {}),
    "policy": ("", {}),
    "one-thread": ("", {"OMP_NUM_THREADS": "1"}),
}


def one_run(variant: str, steps: int, out_dir: str) -> dict:
    first, extra = VARIANTS[variant]
    argv = ["pretrain", "--config", "cpu_tiny", f"--max-steps={steps}", f"--run.log_every={steps}",
            f"--run.out_dir={out_dir}", f"--run.name={variant}", "--run.eval=false", f"--run.ckpt_every={10**6}"]
    code = f"import sys\n{first}\nfrom mixedae_fast.cli import main\nsys.exit(main({argv!r}))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(extra, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    header = next((line for line in done.stdout.splitlines() if line.startswith("run ")), "")
    chosen = re.search(r"on cpu, (\d+ CPU thread\(s\) \([^)]*\))", header)
    last = re.search(rf"step {steps}/\d+ .* (\d+) img/s", done.stdout)
    return {"variant": variant, "rc": done.returncode, "img_per_s": int(last.group(1)) if last else None,
            "wall_s": round(wall, 2), "threads": chosen.group(1) if chosen else None,
            "stderr_tail": done.stderr.strip().splitlines()[-1:] if done.returncode else []}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from mixedae_fast.provenance import provenance

    result = {"benchmark": "bench_threads", **provenance(None, ["python", "benchmarks/bench_threads.py",
                                                                *(argv or sys.argv[1:])]),
              "affinity_cpus": len(os.sched_getaffinity(0)), "loadavg_before": os.getloadavg(),
              "note": "a shared machine: other engineers' jobs ran beside this benchmark", "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for load in ("free", "one-core-busy"):
            spinner = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "one-core-busy"
                       else None)
            try:
                for variant in VARIANTS:
                    row = {"load": load, "loadavg": os.getloadavg()[0], **one_run(variant, args.steps,
                                                                                  f"{tmp}/{load}")}
                    print(json.dumps(row), flush=True)
                    result["rows"].append(row)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_threads.json").write_text(json.dumps(result, indent=2))
    lines = [f"# bench_threads: {args.steps}-step cpu_tiny pretrain, default threading vs the thread policy", "",
             f"Command: `{result['command']}`"
             f", date {result.get('date')}, git {result.get('git_sha')}, {result['affinity_cpus']} CPUs in the "
             f"affinity mask. {result['note']} (load average per row below), so the figures carry their noise.", "",
             "| load | variant | threads | img/s at the last step | wall s |", "|---|---|---|---|---|"]
    lines += [f"| {r['load']} (loadavg {r['loadavg']:.1f}) | {r['variant']} | {r['threads']} | {r['img_per_s']} | "
              f"{r['wall_s']} |" for r in result["rows"]]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
