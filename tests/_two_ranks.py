"""One rank of test_units.py's 2-process gloo group (a module of its own, so that a spawned process
imports little). Writes what it saw to ``<out>/rank<r>.json``."""
import json
import os
from pathlib import Path

# rank 0's and rank 1's stop votes, call by call (None = no signal)
VOTES = [("SIGINT", "SIGTERM"), (None, None), ("SIGUSR1", "SIGINT"), (None, None), (None, "SIGINT"), (None, None)]


def run_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch

    from mixedae_fast.config import load_config
    from mixedae_fast.train.distributed import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    d = init_distributed(load_config("cpu_tiny", ["--runtime.device=cpu", "--dist.timeout_s=60"]), env)
    try:
        stops = [d.agree_stop(votes[rank]) for votes in VOTES]
        d.finish_votes()
        a, b = d.mean_over_ranks({"loss": torch.tensor(2.0 * rank)}, {"recognition": torch.tensor(10.0 + rank)})
        d.check_same(7, "the step")
        try:
            d.check_same(4 + rank, "step")
            differ = None
        except RuntimeError as e:
            differ = str(e).split(" (rank")[0]
        result = {"stops": stops, "means": [a["loss"].item(), b["recognition"].item()], "same_ok": True,
                  "differ": differ}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        d.close()
