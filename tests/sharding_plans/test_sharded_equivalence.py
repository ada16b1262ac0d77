"""Sharded == unsharded on 2 real gloo ranks, for every strategy that runs on CPU.

One spawn checks them all (spawning is the expensive part): for each strategy a DMP-sharded
SparseEmbeddings gets the unsharded module's weights, must return the same embeddings on
each rank's KJT, and after one fused EXACT_ROWWISE_ADAGRAD step must hold the rows that
the same update computes on the unsharded copy from both ranks' batches. The count-min
sketch's all_reduce_ is checked in the same spawn.
"""

from __future__ import annotations

import torch

from tests.dist_utils import run_on_ranks

DIM = 16
LR = 0.1
STRATEGIES = ["table_wise", "row_wise", "column_wise", "table_row_wise"]


def _cfg(strategy: str):
    from genrec.config import Config, EmbeddingsConfig, TableConfig

    cfg = Config()
    cfg.embeddings = EmbeddingsConfig(
        tables=[
            TableConfig(
                name="item", num_embeddings=64, dim=DIM, features=["item_id", "brand"], num_hashes=2
            ),
            TableConfig(name="user", num_embeddings=40, dim=DIM, features=["user_id"]),
        ]
    )
    cfg.sharding.strategy = strategy
    cfg.sharding.topology.world_size = 2
    cfg.trainer.sparse_lr = LR
    return cfg


def _kjt(rank: int):
    """Rank-dependent raw ids; keys carry different lengths; 'brand' absent on rank 1."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(100 + rank)
    keys = ["item_id", "user_id"] + (["brand"] if rank == 0 else [])
    lengths = torch.randint(0, 5, (len(keys) * 3,), generator=g)
    values = torch.randint(-(10**12), 10**12, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)


def _loss(out: dict, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 + rank)
    total = torch.zeros(())
    for f in sorted(out):
        v = out[f].values()
        total = total + (v * torch.randn(v.shape, generator=g)).sum()
    return total


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) if a.numel() else 0.0


def _rowwise_adagrad(w: torch.Tensor, grad: torch.Tensor, blocks: int) -> torch.Tensor:
    """One EXACT_ROWWISE_ADAGRAD step from zero state; state per row per column block."""
    out = w.clone()
    for cols in torch.arange(w.shape[1]).chunk(blocks):
        g = grad[:, cols]
        state = (g * g).mean(dim=1, keepdim=True)
        out[:, cols] = w[:, cols] - LR * g / (state.sqrt() + 1e-8)
    return out


def _check_strategy(rank: int, world: int, strategy: str) -> dict:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torchrec.distributed.model_parallel import DistributedModelParallel

    from genrec.embeddings.tables import SparseEmbeddings
    from genrec.sharding_plans.planner import build_plan, sharders

    cfg = _cfg(strategy)
    torch.manual_seed(0)
    ref = SparseEmbeddings(cfg.embeddings)
    full = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    plan = build_plan(
        cfg, SparseEmbeddings(cfg.embeddings, device=torch.device("meta")), world, "cpu"
    )
    dmp = DistributedModelParallel(
        SparseEmbeddings(cfg.embeddings, device=torch.device("meta")),
        device=torch.device("cpu"),
        plan=plan,
        sharders=sharders(cfg),
    )
    with torch.no_grad():
        for key, t in dmp.state_dict().items():
            if isinstance(t, ShardedTensor):
                for shard in t.local_shards():
                    (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(full[key][r0 : r0 + nr, c0 : c0 + nc])
            else:
                t.copy_(full[key])

    out = dmp(_kjt(rank))
    ref_out = ref(_kjt(rank))
    max_fwd = 0.0
    assert sorted(out) == sorted(ref_out)
    for f in ref_out:
        assert torch.equal(out[f].lengths(), ref_out[f].lengths())
        max_fwd = max(max_fwd, _maxabs(out[f].values(), ref_out[f].values()))

    # one step: sharded (fused optimizer in backward) vs the same update on the full table
    _loss(out, rank).backward()
    ref_loss = sum(_loss(ref(_kjt(r)), r) for r in range(world))  # sharded grads sum ranks
    ref_loss.backward()
    blocks = {"column_wise": 2}.get(strategy, 1)
    expected = {k: _rowwise_adagrad(p.detach(), p.grad, blocks) for k, p in ref.named_parameters()}
    max_step, touched = 0.0, 0
    for key, t in dmp.state_dict().items():
        for shard in t.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            want = expected[key][r0 : r0 + nr, c0 : c0 + nc]
            before = full[key][r0 : r0 + nr, c0 : c0 + nc]
            max_step = max(max_step, _maxabs(shard.tensor, want))
            touched += int((shard.tensor != before).any(dim=1).sum())
    return {"forward": max_fwd, "step": max_step, "rows_updated": touched}


def _check_all(rank: int, world: int) -> dict:
    from genrec.embeddings.frequency import CountMinSketch

    results = {s: _check_strategy(rank, world, s) for s in STRATEGIES}
    # count-min sketches all-reduced over ranks == one sketch over the union of streams
    streams = [
        torch.randint(0, 500, (2000,), generator=torch.Generator().manual_seed(r))
        for r in range(world)
    ]
    local = CountMinSketch(3, 128, conservative=False, seed=1)
    local.update(streams[rank])
    local.all_reduce_()
    union = CountMinSketch(3, 128, conservative=False, seed=1)
    union.update(torch.cat(streams))
    results["cms_equal"] = bool(torch.equal(local.counters, union.counters)) and int(
        local.total
    ) == int(union.total)
    return results


def test_sharded_equals_unsharded_all_strategies():
    per_rank = run_on_ranks(_check_all, world_size=2)
    for rank, res in enumerate(per_rank):
        assert res.pop("cms_equal"), f"rank {rank}: all-reduced sketch != union sketch"
        for strategy, r in res.items():
            assert r["forward"] < 1e-6, (rank, strategy, r)
            assert r["step"] < 1e-5, (rank, strategy, r)
    # the step really moved rows (somewhere): not a vacuous comparison
    for strategy in STRATEGIES:
        assert sum(res[strategy]["rows_updated"] for res in per_rank) > 0, strategy
