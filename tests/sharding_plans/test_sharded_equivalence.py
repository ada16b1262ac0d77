"""Sharded == unsharded on 2 real gloo ranks, for every strategy (all five run on CPU).

One spawn checks them all (spawning is the expensive part): for each case a DMP-sharded
SparseEmbeddings gets the unsharded module's weights and must return the same embeddings on
each rank's KJT (exactly: < 1e-6). After one step it must hold what the same update
computes on the unsharded copy from both ranks' batches (< 1e-5):

- model-parallel tables (TorchRec, fused EXACT_ROWWISE_ADAGRAD in backward): the gradient
  is the SUM of both ranks' gradients;
- data_parallel tables (plain replicated modules outside the EC, DDP via DMP's wrapper as
  the trainer configures it): the gradient is the AVERAGE over ranks, and a dense SGD step
  (SGD, not the trainer's AdamW, because Adam's first step is ~lr * sign(grad) and could
  not tell an averaged gradient from a summed one) gives identical replicas on both ranks.

Tables: a 2-hash unified table, a 1-hash table, a direct one (raw id = row) and a vocab one
(rows from a vocabulary file; ids in and out of it). Cases:
every named strategy for all tables, plus row_wise with a data_parallel override
(both paths in one module). The count-min sketch's all_reduce_ is checked in the same spawn.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch

from tests.dist_utils import run_on_ranks

DIM = 16
LR = 0.1
TABLES = ["item", "user", "cat", "shop"]
CATEGORIES = 24  # rows of the direct table "cat": raw category ids are its rows
SHOPS = np.arange(100, 130)  # raw shop ids; the vocab table "shop" keeps those counted >= 3
CASES: dict[str, tuple[str, dict[str, str]]] = {  # label -> (strategy, overrides)
    "table_wise": ("table_wise", {}),
    "row_wise": ("row_wise", {}),
    "column_wise": ("column_wise", {}),
    "table_row_wise": ("table_row_wise", {}),
    "data_parallel": ("data_parallel", {}),
    "row_wise+user_dp": ("row_wise", {"user": "data_parallel"}),
}


def _cfg(strategy: str, overrides: dict[str, str]):
    from genrec.config import Config, EmbeddingsConfig, TableConfig

    cfg = Config()
    cfg.embeddings = EmbeddingsConfig(
        tables=[
            TableConfig(
                name="item", num_embeddings=64, dim=DIM, features=["item_id", "brand"], num_hashes=2
            ),
            TableConfig(name="user", num_embeddings=40, dim=DIM, features=["user_id"]),
            TableConfig(
                name="cat",
                num_embeddings=CATEGORIES,
                dim=DIM,
                features=["category"],
                kind="direct",
            ),
        ]
    )
    from genrec.data_pipeline.vocabulary import Vocabulary

    shops = Vocabulary.from_counts(SHOPS, SHOPS % 7, 3, 5, feature="shop")
    cfg.data.prepared_dir = tempfile.mkdtemp()
    shops.write(cfg.data.prepared_dir)
    cfg.embeddings.tables.append(
        TableConfig(
            name="shop", num_embeddings=shops.num_rows, dim=DIM, features=["shop"], kind="vocab"
        )
    )
    cfg.sharding.strategy = strategy
    cfg.sharding.overrides = dict(overrides)
    cfg.sharding.topology.world_size = 2
    cfg.trainer.sparse_lr = LR
    return cfg


def _kjt(rank: int):
    """Rank-dependent raw ids; keys carry different lengths; 'brand' absent on rank 1;
    'category' ids are rows of the direct table."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(100 + rank)
    keys = ["item_id", "user_id"] + (["brand"] if rank == 0 else [])
    lengths = torch.randint(0, 5, (len(keys) * 3,), generator=g)
    values = torch.randint(-(10**12), 10**12, (int(lengths.sum()),), generator=g)
    cat_lengths = torch.randint(1, 5, (3,), generator=g)
    cat_ids = torch.randint(0, CATEGORIES, (int(cat_lengths.sum()),), generator=g)
    shop_lengths = torch.randint(1, 6, (3,), generator=g)  # ids seen, rare and never seen
    shop_ids = torch.randint(95, 135, (int(shop_lengths.sum()),), generator=g)
    return KeyedJaggedTensor(
        keys=keys + ["category", "shop"],
        values=torch.cat([values, cat_ids, shop_ids]),
        lengths=torch.cat([lengths, cat_lengths, shop_lengths]),
    )


def _loss(out: dict, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 + rank)
    total = torch.zeros(())
    for f in sorted(out):
        v = out[f].values()
        total = total + (v * torch.randn(v.shape, generator=g)).sum()
    return total


class _WithLoss(torch.nn.Module):
    """SparseEmbeddings under `.sparse` returning (loss, embeddings), as the models do: DDP
    with find_unused_parameters must find the graph from a tensor output."""

    def __init__(self, sparse: torch.nn.Module) -> None:
        super().__init__()
        self.sparse = sparse

    def forward(self, kjt, rank: int):
        out = self.sparse(kjt)
        return _loss(out, rank), out


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def _rowwise_adagrad(w: torch.Tensor, grad: torch.Tensor, blocks: int) -> torch.Tensor:
    """One EXACT_ROWWISE_ADAGRAD step from zero state; state per row per column block."""
    out = w.clone()
    for cols in torch.arange(w.shape[1]).chunk(blocks):
        g = grad[:, cols]
        state = (g * g).mean(dim=1, keepdim=True)
        out[:, cols] = w[:, cols] - LR * g / (state.sqrt() + 1e-8)
    return out


def _check_case(rank: int, world: int, strategy: str, overrides: dict[str, str]) -> dict:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torchrec.distributed.model_parallel import (
        DefaultDataParallelWrapper,
        DistributedModelParallel,
    )

    from genrec.embeddings.tables import SparseEmbeddings, load_vocabularies
    from genrec.sharding_plans.planner import build_plan, sharders
    from genrec.sharding_plans.strategies import replicated_tables

    cfg = _cfg(strategy, overrides)
    replicated = replicated_tables(cfg)
    torch.manual_seed(0)
    vocabs = load_vocabularies(cfg.embeddings, cfg.data.prepared_dir)
    ref = SparseEmbeddings(cfg.embeddings, vocabularies=vocabs)  # unsharded: one plain EC
    full = {name: ref.table_weight(name).detach().clone() for name in TABLES}
    meta = torch.device("meta")
    plan = build_plan(
        cfg, _WithLoss(SparseEmbeddings.from_config(cfg, meta, vocabularies=vocabs)), world, "cpu"
    )
    dmp = DistributedModelParallel(
        _WithLoss(SparseEmbeddings.from_config(cfg, meta, vocabularies=vocabs)),
        device=torch.device("cpu"),
        plan=plan,
        sharders=sharders(cfg),
        data_parallel_wrapper=DefaultDataParallelWrapper(  # as genrec.trainer.assembly
            static_graph=False, find_unused_parameters=True
        ),
    )
    with torch.no_grad():
        for key, t in dmp.state_dict().items():
            if not key.endswith(".weight"):
                continue  # the vocab table's vocabulary digest (a buffer)
            w = full[key.split(".")[-2]]  # ec.embeddings.NAME.weight / replicated.NAME.weight
            if isinstance(t, ShardedTensor):
                for shard in t.local_shards():
                    (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(w[r0 : r0 + nr, c0 : c0 + nc])
            else:
                t.copy_(w)
    fused = set(dmp.fused_optimizer.params)
    dense = {n: p for n, p in dmp.named_parameters() if n not in fused and p.requires_grad}
    dense_opt = torch.optim.SGD(list(dense.values()), lr=LR) if dense else None

    loss, out = dmp(_kjt(rank), rank)
    ref_out = ref(_kjt(rank))
    max_fwd = 0.0
    assert sorted(out) == sorted(ref_out)
    for f in ref_out:
        assert torch.equal(out[f].lengths(), ref_out[f].lengths())
        max_fwd = max(max_fwd, _maxabs(out[f].values(), ref_out[f].values()))

    # one step: sharded tables update in backward (fused), replicated ones by SGD after DDP
    loss.backward()
    if dense_opt is not None:
        dense_opt.step()
    ref_loss = sum(_loss(ref(_kjt(r)), r) for r in range(world))  # grads: sum over ranks
    ref_loss.backward()
    blocks = {"column_wise": 2}.get(strategy, 1)
    expected = {}
    for name in TABLES:
        w, g = full[name], ref.table_weight(name).grad
        if name in replicated:
            expected[name] = w - LR * g / world  # DDP averages the ranks' gradients
        else:
            expected[name] = _rowwise_adagrad(w, g, blocks)
    max_step, touched, replicas = 0.0, 0, {}
    for key, t in dmp.state_dict().items():
        if not key.endswith(".weight"):
            continue
        name = key.split(".")[-2]
        shards = (
            [(s.metadata.shard_offsets, s.metadata.shard_sizes, s.tensor) for s in t.local_shards()]
            if isinstance(t, ShardedTensor)
            else [([0, 0], list(t.shape), t)]
        )
        if not isinstance(t, ShardedTensor):
            replicas[name] = t.detach().clone()
        for (r0, c0), (nr, nc), local in shards:
            want = expected[name][r0 : r0 + nr, c0 : c0 + nc]
            before = full[name][r0 : r0 + nr, c0 : c0 + nc]
            max_step = max(max_step, _maxabs(local, want))
            touched += int((local != before).any(dim=1).sum())
    return {
        "forward": max_fwd,
        "step": max_step,
        "rows_updated": touched,
        "replicated": replicated,
        "dense_params": sorted(dense),
        "replicas": replicas,
    }


def _check_all(rank: int, world: int) -> dict:
    from genrec.embeddings.frequency import CountMinSketch

    results = {
        label: _check_case(rank, world, strategy, overrides)
        for label, (strategy, overrides) in CASES.items()
    }
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
        for case, r in res.items():
            assert r["forward"] < 1e-6, (rank, case, r)
            assert r["step"] < 1e-5, (rank, case, r)
    # data_parallel tables are replicated modules, trained by the dense optimizer
    assert per_rank[0]["data_parallel"]["replicated"] == ["item", "user", "cat", "shop"]
    assert per_rank[0]["row_wise+user_dp"]["replicated"] == ["user"]
    assert per_rank[0]["row_wise"]["dense_params"] == []
    assert per_rank[0]["row_wise+user_dp"]["dense_params"] == ["sparse.replicated.user.weight"]
    for case in CASES:
        r0, r1 = per_rank[0][case], per_rank[1][case]
        assert sorted(r0["replicas"]) == sorted(r0["replicated"]), case
        for name, w in r0["replicas"].items():  # replicas identical on both ranks
            assert torch.equal(w, r1["replicas"][name]), (case, name)
        # the step really moved rows (somewhere): not a vacuous comparison
        assert r0["rows_updated"] + r1["rows_updated"] > 0, case
