"""Embedding lookups/s (forward + backward with the fused optimizer) per sharding strategy.

Spawns `--world` gloo ranks on 127.0.0.1; each rank shards one table (hashed, or with
`--kind direct` one row per id, the ids drawn in [0, rows)) with each strategy (DMP +
genrec's plan) and times forward+backward on random raw ids. data_parallel replicates the
table (DDP all-reduces its dense [rows, dim] gradient every step) and steps
AdamW on it, as the trainer does: only cheap for small tables. Rank 0 also
times an unsharded torch.nn.EmbeddingBag (one id per bag, sum) on the same ids as a floor.
Prints one JSON line: lookups/s summed over ranks per strategy, and the baseline.

    python benchmarks/bench_embeddings.py --rows 1000000 --dim 64 --batch 256 --seq-len 50
    python benchmarks/bench_embeddings.py --world 1 --rows 262144 --num-hashes 2 --seq-len 10 \
        --strategies data_parallel     # the SASRec recipes' replicated item table
    python benchmarks/bench_embeddings.py --world 1 --rows 18358 --seq-len 10 --kind direct \
        --strategies data_parallel     # the same, one row per item (Sports)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STRATEGIES = ["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _batch(args, step: int, rank: int):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.full((args.batch,), args.seq_len, dtype=torch.int64)
    high = args.rows if args.kind == "direct" else 1 << 40  # raw ids: a direct table's rows
    values = torch.randint(0, high, (args.batch * args.seq_len,), generator=g)
    return KeyedJaggedTensor(keys=["item_id"], values=values, lengths=lengths)


def _time_strategy(args, strategy: str, rank: int, world: int) -> float | str:
    from torchrec.distributed.model_parallel import DistributedModelParallel

    from genrec.config import Config, EmbeddingsConfig, TableConfig
    from genrec.embeddings.tables import SparseEmbeddings
    from genrec.sharding_plans.planner import build_plan, sharders

    cfg = Config()
    cfg.embeddings = EmbeddingsConfig(
        tables=[
            TableConfig(
                name="item",
                num_embeddings=args.rows,
                dim=args.dim,
                features=["item_id"],
                num_hashes=args.num_hashes,
                kind=args.kind,
            )
        ]
    )
    cfg.sharding.strategy = strategy
    cfg.sharding.topology.world_size = world
    meta = torch.device("meta")
    try:
        plan = build_plan(cfg, SparseEmbeddings.from_config(cfg, meta), world, "cpu")
    except ValueError as e:  # strategies that cannot run on CPU say why
        return f"unsupported on cpu: {e}"
    model = DistributedModelParallel(
        SparseEmbeddings.from_config(cfg, meta),
        device=torch.device("cpu"),
        plan=plan,
        sharders=sharders(cfg),
    )
    fused = set(model.fused_optimizer.params)
    dense = [p for n, p in model.named_parameters() if n not in fused and p.numel()]
    dense_opt = torch.optim.AdamW(dense, lr=1e-3, weight_decay=0.0) if dense else None
    batches = [_batch(args, s, rank) for s in range(args.warmup + args.steps)]
    for i, kjt in enumerate(batches):
        if i == args.warmup:
            dist.barrier()
            t0 = time.perf_counter()
        model(kjt)["item_id"].values().sum().backward()
        if dense_opt is not None:  # replicated (data_parallel) tables
            dense_opt.step()
            dense_opt.zero_grad(set_to_none=True)
    dist.barrier()
    elapsed = time.perf_counter() - t0
    return args.steps * args.batch * args.seq_len * world / elapsed


def _time_embedding_bag(args) -> float:
    bag = torch.nn.EmbeddingBag(args.rows, args.dim, mode="sum")
    opt = torch.optim.SGD(bag.parameters(), lr=0.01)
    n = args.batch * args.seq_len
    offsets = torch.arange(n)
    ids = [_batch(args, s, 0).values() % args.rows for s in range(args.warmup + args.steps)]
    for i, x in enumerate(ids):
        if i == args.warmup:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        bag(x, offsets).sum().backward()
        opt.step()
    return args.steps * n / (time.perf_counter() - t0)


def _worker(rank: int, args, world: int, port: int, out_dir: str) -> None:
    from genrec.trainer.host_memory import reuse_freed_host_memory

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    if args.host_allocator == "reuse":  # as the trainer's workers do by default
        reuse_freed_host_memory()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result = {}
        for strategy in args.strategies:
            if rank == 0:
                _log(f"timing {strategy} on {world} ranks")
            result[strategy] = _time_strategy(args, strategy, rank, world)
        if rank == 0:
            _log("timing unsharded torch.nn.EmbeddingBag")
            result["embedding_bag_unsharded_1rank"] = _time_embedding_bag(args)
            Path(out_dir, "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=256, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--num-hashes", type=int, default=1, help="k hashed rows summed per id")
    p.add_argument(
        "--kind",
        choices=["hashed", "direct"],
        default="hashed",
        help="direct: the raw id is the row (embeddings.tables[].kind; takes --num-hashes 1)",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument(
        "--host-allocator",
        choices=["reuse", "default"],
        default="reuse",
        help="reuse: keep freed large blocks mapped as the trainer does "
        "(trainer.reuse_freed_host_memory); default: glibc as it comes",
    )
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    args = p.parse_args()
    if args.kind == "direct" and args.num_hashes != 1:
        p.error("--kind direct takes --num-hashes 1: a direct table does not hash")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(args, args.world, port, out_dir), nprocs=args.world, join=True)
        result = json.loads(Path(out_dir, "result.json").read_text())
    lookups = {k: (round(v) if isinstance(v, float) else v) for k, v in result.items()}
    print(
        json.dumps(
            {
                "bench": "embeddings",
                "device": "cpu",
                "backend": "gloo",
                "world": args.world,
                "rows": args.rows,
                "dim": args.dim,
                "num_hashes": args.num_hashes,
                "kind": args.kind,
                "host_allocator": args.host_allocator,
                "lookups_per_step_per_rank": args.batch * args.seq_len,
                "threads_per_rank": args.threads,
                "lookups_per_s": lookups,
                "note": "fwd+bwd incl. fused EXACT_ROWWISE_ADAGRAD (data_parallel: DDP "
                "all-reduce of the dense grad + AdamW); strategies summed over ranks; baseline "
                "1 process nn.EmbeddingBag(sum, 1 id/bag) + SGD",
            }
        )
    )


if __name__ == "__main__":
    main()
