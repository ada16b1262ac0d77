"""Step stall of a checkpoint, synchronous DCP save vs async (host copy + background write).

    python benchmarks/bench_checkpoint.py [--ranks 2] [--rows 262144] [--repeats 3]

Each gloo rank builds the quickstart model with an item table of --rows x 64 (row-wise
Adagrad state beside it; sharded by the planner) and saves model + optimizer with
`trainer.checkpoint.save_checkpoint` into a temporary directory: synchronously (the step
waits for the whole write) and with async_group (the step waits for the staging copy; the
write finishes in DCP's thread, measured as the later `wait()`). Reported on rank 0: median
stall seconds of each, the async wait, and the checkpoint's size. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, work: str, out) -> None:
    from genrec.config import load_config
    from genrec.trainer import checkpoint as ckpt
    from genrec.trainer.assembly import assemble
    from genrec.trainer.distributed import checkpoint_group, init_distributed

    torch.set_num_threads(1)
    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            f"embeddings.tables=[{{name: item, num_embeddings: {args.rows}, dim: 64, "
            "features: [item_id]}]",
        ],
    )
    ctx = init_distributed(rank, world, "cpu", "gloo", master_port=port)
    parts = assemble(cfg, ctx)
    res: dict = {"sync_stall_s": [], "async_stall_s": [], "async_wait_s": []}
    for i in range(args.repeats):
        for mode in ("sync", "async"):
            app = {"model": parts.model.state_dict(), "optim": parts.optimizer.state_dict()}
            t0 = time.perf_counter()
            pending = ckpt.save_checkpoint(
                Path(work) / mode,
                i,
                app,
                {"step": i},
                {},
                keep_last=1,
                async_group=(checkpoint_group() or True) if mode == "async" else False,
            )
            res[f"{mode}_stall_s"].append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            path = pending.wait()
            if mode == "async":
                res["async_wait_s"].append(time.perf_counter() - t1)
    if rank == 0:
        out.update({k: round(statistics.median(v), 4) for k, v in res.items()})
        out["checkpoint_mb"] = round(sum(f.stat().st_size for f in path.iterdir()) / 2**20, 1)
    torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rows", type=int, default=262_144)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from genrec.trainer.distributed import free_port

    with tempfile.TemporaryDirectory() as work, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(args.ranks, free_port(), args, work, out), nprocs=args.ranks)
        result = dict(out)
    print(
        json.dumps(
            {
                "bench": "checkpoint_stall",
                "ranks": args.ranks,
                "table_rows": args.rows,
                **result,
                "load_avg": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
