"""Real sequences (ml-100k via the RecBole reader) and checkpoints written by sharded ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from genrec.config import Config, TableConfig, from_dict, to_dict
from genrec.data_pipeline.batch import Batch, make_batch

ML100K_MAX_ITEM = 1682  # ml-100k's item ids are 1..1682: a direct table needs 1683 rows


def tiny_config(prepared_dir: str, task: str = "retrieval", direct: bool = False) -> Config:
    """A small model over ml-100k; `direct`: the item table has one row per raw id."""
    cfg = Config()
    cfg.data.prepared_dir = prepared_dir
    cfg.embeddings.tables = [
        TableConfig(
            name="item",
            num_embeddings=ML100K_MAX_ITEM + 1,
            dim=32,
            features=["item_id"],
            kind="direct",
        )
        if direct
        else TableConfig(
            name="item", num_embeddings=4096, dim=32, features=["item_id"], num_hashes=2
        )
    ]
    m = cfg.model
    m.task = task
    m.dim, m.num_layers, m.num_heads, m.attn_dim, m.linear_dim = 32, 2, 2, 16, 16
    m.dropout, m.max_len, m.num_time_buckets = 0.0, 32, 32
    m.retrieval.num_negatives = 32
    m.ranking.tasks = ["click", "like"]
    cfg.deploy.max_history = 64
    cfg.deploy.max_k = 50
    cfg.deploy.max_body_bytes = 4096
    return cfg


def read_ml100k(path: Path) -> dict[str, np.ndarray]:
    """Events of ml-100k.inter through genrec's RecBole reader, sorted by (user, time)."""
    from genrec.data_pipeline.sources.recbole import RecBoleSource
    from genrec.data_pipeline.validation import BadRows

    src, bad = RecBoleSource(), BadRows("error")
    batches = [b for frag in src.plan(str(path), bad) for b in src.read(frag, bad)]
    t = pa.Table.from_batches(batches)
    cols = {c: t.column(c).to_numpy() for c in ("user_id", "item_id", "timestamp", "action")}
    order = np.lexsort((cols["timestamp"], cols["user_id"]))
    return {c: v[order] for c, v in cols.items()}


def user_sequences(events: dict, n_users: int, max_events: int, seed: int = 0) -> list[dict]:
    """Last `max_events` events of `n_users` users (a fixed random pick), oldest first."""
    users, starts = np.unique(events["user_id"], return_index=True)
    ends = np.append(starts[1:], events["user_id"].size)
    pick = np.random.default_rng(seed).choice(users.size, n_users, replace=False)
    out = []
    for u in pick:
        s = max(starts[u], ends[u] - max_events)
        sl = slice(s, ends[u])
        out.append({k: events[k][sl].astype(np.int64) for k in ("item_id", "timestamp", "action")})
    return out


def write_prepared(events: dict, prepared_dir: Path) -> np.ndarray:
    """The catalog (items.parquet, as `genrec prepare` writes it) of the events' items."""
    prepared_dir.mkdir(parents=True, exist_ok=True)
    items = np.unique(events["item_id"])
    pq.write_table(
        pa.table({"item_id": pa.array(items, pa.int64())}), prepared_dir / "items.parquet"
    )
    return items


def query_batch(seqs: list[dict], with_dummy_target: bool) -> Batch:
    """Histories as one Batch; with a dummy target event, top_k ranks after the history."""
    items, acts, ts, lengths = [], [], [], []
    for s in seqs:
        extra = 1 if with_dummy_target else 0
        items.append(np.append(s["item_id"], np.zeros(extra, np.int64)))
        acts.append(np.append(s["action"], np.zeros(extra, np.int64)))
        ts.append(np.append(s["timestamp"], s["timestamp"][-1:][:extra]))
        lengths.append(len(s["item_id"]) + extra)
    n = len(seqs)
    return make_batch(
        item_ids=np.concatenate(items),
        actions=np.concatenate(acts),
        timestamps=np.concatenate(ts).astype(np.int64),
        lengths=np.array(lengths),
        num_targets=np.full(n, 1 if with_dummy_target else 0),
        user_ids=np.arange(n),
        windows=np.zeros(n, np.int64),
    )


def train_batch(seqs: list[dict]) -> Batch:
    """Every event after the first is a target (a training batch over real histories)."""
    n = len(seqs)
    return make_batch(
        item_ids=np.concatenate([s["item_id"] for s in seqs]),
        actions=np.concatenate([s["action"] for s in seqs]),
        timestamps=np.concatenate([s["timestamp"] for s in seqs]),
        lengths=np.array([len(s["item_id"]) for s in seqs]),
        num_targets=np.array([len(s["item_id"]) - 1 for s in seqs]),
        user_ids=np.arange(n),
        windows=np.zeros(n, np.int64),
    )


def sharded_train_and_save(
    rank: int, world_size: int, cfg_dict: dict, run_dir: str, seqs: list[dict], catalog: np.ndarray
) -> dict:
    """On each gloo rank: DMP (item table row-wise), 2 SGD steps, save_checkpoint, top_k.

    Returns the sharded model's top-10 over the catalog for the last position of `seqs`
    (rank 0), which the unsharded model loaded from the checkpoint must reproduce.
    """
    import torch.distributed as dist
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import (
        DefaultDataParallelWrapper,
        DistributedModelParallel,
    )
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from genrec.models.build import build_model
    from genrec.trainer.checkpoint import save_checkpoint

    cfg = from_dict(cfg_dict)
    torch.manual_seed(0)
    model = build_model(cfg)
    sharder = EmbeddingCollectionSharder(fused_params={"learning_rate": 0.5})
    plan = ShardingPlan(
        {
            "sparse.ec": construct_module_sharding_plan(
                model.sparse.ec,
                per_param_sharding={"item": row_wise(compute_kernel="fused")},
                local_size=world_size,
                world_size=world_size,
                device_type="cpu",
                sharder=sharder,
            )
        }
    )
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=[sharder],
        # DMP's default wrapper (static_graph=True) left dense grads unsynchronized here
        data_parallel_wrapper=DefaultDataParallelWrapper(
            static_graph=False, find_unused_parameters=True
        ),
    )
    fused = {id(p) for g in dmp.fused_optimizer.param_groups for p in g["params"]}
    dense = [p for p in dmp.parameters() if id(p) not in fused]
    opt = torch.optim.SGD(dense, lr=0.1)
    half = len(seqs) // world_size
    mine = seqs[rank * half : (rank + 1) * half]
    cat = torch.from_numpy(catalog)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        negatives = cat[torch.randint(0, cat.numel(), (32,), generator=g)]
        out = dmp(train_batch(mine), negatives, torch.full((32,), -float(np.log(cat.numel()))))
        out.loss.backward()
        opt.step()
        dmp.fused_optimizer.step()
        opt.zero_grad()
    state = {"step": 2, "world_size": world_size, "config": to_dict(cfg), "position": None}
    save_checkpoint(run_dir, 2, {"model": dmp.state_dict()}, state, {"x": torch.zeros(1)})
    dmp.eval()
    ids, scores, _ = dmp.module.top_k(query_batch(seqs[:8], True), cat, 10)
    return {"ids": ids.numpy(), "scores": scores.numpy(), "keys": sorted(dmp.state_dict())}
