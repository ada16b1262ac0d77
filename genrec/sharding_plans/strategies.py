"""Named sharding strategies -> explicit TorchRec ParameterShardings, per table.

    table_wise      whole table on one rank (the least loaded one, largest tables first)
    row_wise        rows split evenly over every rank (the big id tables)
    column_wise     embedding dim split over a few ranks
    table_row_wise  rows split over the ranks of one host
    data_parallel   replicated on every rank, gradients all-reduced (small tables)

data_parallel tables (the named strategy, or a per-table override, also under "auto") are
not planned here: `replicated_tables(cfg)` names them, SparseEmbeddings holds them as plain
replicated modules outside the EmbeddingCollection, DMP's DDP wrapper averages their
gradients and the trainer's dense optimizer updates them, the same on every device.
("auto" may still let TorchRec's planner pick its own DP sharding on CUDA.)

What TorchRec 1.8 / fbgemm-gpu 1.8 can run for an EmbeddingCollection (sequence, i.e.
unpooled embeddings), found by running them, and enforced here with a message:

- table_wise, row_wise, column_wise: the "fused" kernel (TBE with the optimizer fused
  into backward) works on CPU and CUDA; "dense" is not offered for them by the EC sharder.
- TorchRec's data_parallel: only the "dense" kernel, and on CPU fbgemm's dense lookup
  ignores PoolingMode.NONE and returns pooled rows [B, D]: the reason DP tables live
  outside the EC (a DP table found inside the EC is refused, naming the fix).
- table_row_wise: the EC sharder has no TWRW sequence sharding. With one host it is the
  same placement as row_wise, and is planned as row_wise shards; over several hosts it
  would need zero-row shards off the host, which the CPU TBE rejects: refused.
- managed-collision tables (MCH): row_wise only, and CUDA only: when the sharded MCH
  admits new ids it resets their rows with fbgemm::reset_weight_momentum, which has no CPU
  kernel (the first training step fails). Unsharded MCH works on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.sharding_plan import calculate_shard_sizes_and_offsets, placement
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingType

from genrec.config import Config

STRATEGIES: dict[str, str] = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
    "table_row_wise": ShardingType.TABLE_ROW_WISE.value,
    "data_parallel": ShardingType.DATA_PARALLEL.value,
}
KERNELS = ("fused", "fused_uvm", "fused_uvm_caching", "dense")
MIN_COLUMN_SHARD = 32  # narrowest column-wise shard we plan (FBGEMM wants multiples of 4)


@dataclass(frozen=True)
class TableShape:
    """What planning needs to know of one table."""

    name: str
    rows: int
    dim: int
    num_features: int  # collection features looking it up (k hashes each)
    managed: bool  # a managed-collision (MCH) table


def table_strategies(cfg: Config, tables: list[TableShape]) -> dict[str, str]:
    """Strategy per table: cfg.sharding.strategy, overridden by cfg.sharding.overrides."""
    names = {t.name for t in tables} | {t.name for t in cfg.embeddings.tables}
    for table, strategy in cfg.sharding.overrides.items():
        if table not in names:
            raise ValueError(
                f"sharding.overrides names table {table!r}, but the tables are {sorted(names)}"
            )
        if strategy not in STRATEGIES:
            raise ValueError(
                f"sharding.overrides.{table}: unknown strategy {strategy!r}; "
                f"use one of {sorted(STRATEGIES)}"
            )
    out = {}
    for t in tables:
        s = cfg.sharding.overrides.get(t.name, cfg.sharding.strategy)
        if t.managed and s != "auto" and t.name not in cfg.sharding.overrides:
            s = "row_wise"  # the only sharding TorchRec's MCH supports
        out[t.name] = s
    return out


def config_shapes(cfg: Config) -> list[TableShape]:
    """TableShapes of cfg.embeddings.tables (no module needed)."""
    return [
        TableShape(
            t.name,
            t.num_embeddings,
            t.dim,
            len(t.features) * (t.num_hashes if t.kind == "hashed" else 1),
            t.kind == "managed_collision",
        )
        for t in cfg.embeddings.tables
    ]


def replicated_tables(cfg: Config) -> list[str]:
    """Tables whose resolved strategy is data_parallel: SparseEmbeddings replicates them."""
    shapes = config_shapes(cfg)
    strategies = table_strategies(cfg, shapes)
    out = []
    for t in shapes:
        if strategies[t.name] != "data_parallel":
            continue
        if t.managed:
            raise ValueError(
                f"table {t.name!r}: sharding strategy 'data_parallel': managed_collision "
                "tables shard row_wise only"
            )
        out.append(t.name)
    return out


def check_supported(table: TableShape, strategy: str, device: str, local: int, world: int) -> None:
    """Fail early, naming the table, for what TorchRec/FBGEMM cannot run (module docstring)."""
    where = f"table {table.name!r}: sharding strategy {strategy!r}"
    if table.managed and strategy != "row_wise":
        raise ValueError(f"{where}: managed_collision tables shard row_wise only")
    if table.managed and device == "cpu":
        raise ValueError(
            f"table {table.name!r}: sharded managed_collision tables do not train on CPU "
            "(fbgemm::reset_weight_momentum has no CPU kernel); use kind: hashed on CPU"
        )
    if strategy == "data_parallel":
        raise ValueError(
            f"{where}, but the table is inside the EmbeddingCollection: genrec replicates "
            "data_parallel tables outside it (TorchRec's dense DP lookup pools sequence "
            "embeddings on CPU); build the module with SparseEmbeddings.from_config(cfg), "
            "i.e. replicated=replicated_tables(cfg)"
        )
    if strategy == "table_row_wise" and local != world:
        raise ValueError(
            f"{where}: TorchRec's EmbeddingCollection has no table-row-wise sequence sharding "
            f"and {world // local} hosts would need empty shards; use row_wise or table_wise"
        )


def compute_kernel(cfg: Config, strategy: str, device: str) -> str:
    kernel = cfg.sharding.compute_kernel
    if kernel not in KERNELS:
        raise ValueError(f"sharding.compute_kernel={kernel!r}: use one of {list(KERNELS)}")
    if strategy == "data_parallel":
        return EmbeddingComputeKernel.DENSE.value
    if kernel == "dense":
        raise ValueError(
            "sharding.compute_kernel=dense: TorchRec's EmbeddingCollection sharder offers only "
            "fused kernels for model-parallel tables; use fused"
        )
    if kernel.startswith("fused_uvm") and device != "cuda":
        raise ValueError(f"sharding.compute_kernel={kernel} needs CUDA (UVM); use fused on CPU")
    return kernel


def column_shards(dim: int, world: int) -> int:
    """Most column shards (<= world) of equal width, a multiple of 4 and >= MIN_COLUMN_SHARD."""
    best = 1
    for n in range(1, world + 1):
        width = dim / n
        if dim % n == 0 and width % 4 == 0 and (width >= MIN_COLUMN_SHARD or n <= 2):
            best = n
    return best


def _spec(shards: list[tuple[list[int], list[int], int]], device: str, local: int):
    return EnumerableShardingSpec(
        [
            ShardMetadata(
                shard_offsets=off, shard_sizes=size, placement=placement(device, r, local)
            )
            for size, off, r in shards
        ]
    )


def explicit_plan(
    cfg: Config, tables: list[TableShape], world: int, local: int, device: str, loads: list[float]
) -> EmbeddingModuleShardingPlan:
    """Shardings of one module's tables; `loads` (bytes per rank) is updated in place.

    Replicated (data_parallel) tables are outside the module and load every rank equally,
    so they do not change where the sharded tables go."""
    strategies = table_strategies(cfg, tables)
    plan = EmbeddingModuleShardingPlan()
    for t in sorted(tables, key=lambda t: -t.rows * t.dim):  # big tables placed first
        strategy = strategies[t.name]
        check_supported(t, strategy, device, local, world)
        kernel = compute_kernel(cfg, strategy, device)
        param = torch.empty(t.rows, t.dim, device="meta")
        if strategy == "table_wise":
            rank = min(range(world), key=lambda r: loads[r])
            shards = [([t.rows, t.dim], [0, 0], rank)]
            stype = ShardingType.TABLE_WISE.value
        elif strategy == "column_wise":
            n = column_shards(t.dim, world)
            ranks = sorted(range(world), key=lambda r: loads[r])[:n]
            sizes, offsets = calculate_shard_sizes_and_offsets(
                param, world, local, ShardingType.COLUMN_WISE.value, col_wise_shard_dim=t.dim // n
            )
            shards = [(s, o, r) for s, o, r in zip(sizes, offsets, ranks)]
            stype = ShardingType.COLUMN_WISE.value
        else:  # row_wise, and table_row_wise on one host (the same placement)
            sizes, offsets = calculate_shard_sizes_and_offsets(
                param, world, local, ShardingType.ROW_WISE.value
            )
            if any(s[0] == 0 for s in sizes):
                raise ValueError(
                    f"table {t.name!r}: {t.rows} rows cannot be row-sharded over {world} ranks "
                    "without empty shards; give it more rows or use table_wise"
                )
            shards = [(s, o, r) for r, (s, o) in enumerate(zip(sizes, offsets))]
            stype = ShardingType.ROW_WISE.value
        for size, _, r in shards:
            loads[r] += 4.0 * size[0] * size[1]
        plan[t.name] = ParameterSharding(
            sharding_type=stype,
            compute_kernel=kernel,
            ranks=[r for _, _, r in shards],
            sharding_spec=_spec(shards, device, local),
        )
    return plan
