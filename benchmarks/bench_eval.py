"""Cost of one progressive-evaluation step at W = 1, 2, 4 gloo ranks: whole catalog per rank
(`model.top_k`, before) vs each rank 1/W of it (`trainer.sharded_eval.sharded_top_k`).

    python benchmarks/bench_eval.py [--ranks 1,2,4] [--items 100000] [--repeats 3]

Each rank builds the quickstart model (TorchRec DMP, the item table sized to the catalog)
and scores a batch of its own sequences (--batch sequences x 20 events, 5 targets each)
against a catalog of --items ids, in blocks of model.retrieval.top_k_block. Reported per
W: median seconds per eval step on rank 0 for both paths and the item lookups per rank.
On the shared 2-core box W = 4 runs 4 processes on 2 cores: wall time there measures the
box, the lookups per rank are the figure that carries to a cluster. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    from genrec.config import load_config
    from genrec.data_pipeline.batch import make_batch
    from genrec.trainer.assembly import assemble
    from genrec.trainer.distributed import init_distributed
    from genrec.trainer.sharded_eval import sharded_top_k

    torch.set_num_threads(1)
    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            f"embeddings.tables=[{{name: item, num_embeddings: {args.items}, dim: 64, "
            "features: [item_id]}]",
            "model.max_len=20",
        ],
    )
    ctx = init_distributed(rank, world, "cpu", "gloo", master_port=port)
    model = assemble(cfg, ctx).model
    model.eval()
    g = torch.Generator().manual_seed(rank)
    catalog = torch.arange(args.items, dtype=torch.int64)
    B, L = args.batch, 20
    batch = make_batch(
        item_ids=torch.randint(args.items, (B * L,), generator=g),
        actions=torch.zeros(B * L, dtype=torch.int64),
        timestamps=torch.arange(B * L, dtype=torch.int64),
        lengths=torch.full((B,), L),
        num_targets=torch.full((B,), 5),
        user_ids=torch.arange(B),
        windows=torch.zeros(B, dtype=torch.int64),
    )
    module = model.module
    result = {}
    for name, fn in (
        ("full_catalog_s", lambda: module.top_k(batch, catalog, 10)),
        ("sharded_s", lambda: sharded_top_k(module, batch, catalog, 10)),
    ):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = round(statistics.median(times), 4)
    result["lookups_per_rank_full"] = args.items
    result["lookups_per_rank_sharded"] = -(-args.items // world)
    if rank == 0:
        out[world] = result
    torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from genrec.trainer.distributed import free_port

    results = {}
    with mp.Manager() as manager:
        for w in (int(x) for x in args.ranks.split(",")):
            out = manager.dict()
            mp.spawn(_rank, args=(w, free_port(), args, out), nprocs=w, join=True)
            results[f"W={w}"] = dict(out[w])
    print(
        json.dumps(
            {
                "bench": "eval_step",
                "items": args.items,
                "batch_per_rank": args.batch,
                "results": results,
                "load_avg": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
