"""Sharding plans for the model's embedding collections: build, save, load, describe.

    plan = build_plan(cfg, model)                    # named strategy or TorchRec's planner
    DistributedModelParallel(model, plan=plan, sharders=sharders(cfg), ...)

Named strategies are placed explicitly (strategies.py); "auto" runs TorchRec's
EmbeddingShardingPlanner on the configured topology with per-table ParameterConstraints
(allowed sharding types and kernels; overrides pin a table's type). Planning reads only
shapes, so a model on the meta device plans a cluster that is not here. data_parallel
tables are not in the plan: SparseEmbeddings replicates them (DDP), and `describe_plan`
and `rank_memory` list them from the config. A model whose tables are all data_parallel
gets an empty plan (DMP then only wraps it in DDP). `genrec plan` sizes kind: vocab tables
from their vocabulary files beside the prepared shards (`sized_by_vocabularies`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    ModuleSharder,
    ParameterSharding,
    ShardingPlan,
)
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection

from genrec.config import Config
from genrec.sharding_plans import estimates as est
from genrec.sharding_plans.strategies import (
    STRATEGIES,
    TableShape,
    check_supported,
    compute_kernel,
    explicit_plan,
    replicated_tables,
)
from genrec.sharding_plans.topology import GIB, local_world_size, topology_from_config

PLAN_FORMAT = 1
OPTIMIZERS = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
    "adam": EmbOptimType.ADAM,
}
SPARSE_EPS = 1e-8
# fp32 optimizer state per row of `dim` columns, as a multiple of the weights (memory estimate)
_STATE_PER_WEIGHT = {"rowwise_adagrad": None, "adagrad": 1.0, "sgd": 0.0, "adam": 2.0}


def fused_params(cfg: Config) -> dict:
    """FBGEMM fused optimizer of model-parallel tables (trainer.sparse_optimizer/lr)."""
    return {
        "optimizer": OPTIMIZERS[cfg.trainer.sparse_optimizer],
        "learning_rate": cfg.trainer.sparse_lr,
        "eps": SPARSE_EPS,
    }


def sharders(cfg: Config) -> list[ModuleSharder]:
    """EC and managed-collision EC sharders with the fused sparse optimizer."""
    fp = fused_params(cfg)
    return [
        EmbeddingCollectionSharder(fused_params=fp),
        ManagedCollisionEmbeddingCollectionSharder(
            ec_sharder=EmbeddingCollectionSharder(fused_params=fp)
        ),
    ]


def embedding_modules(module: torch.nn.Module) -> dict[str, list[TableShape]]:
    """Module path -> tables, for each (MC-)EmbeddingCollection DMP will shard."""
    found: dict[str, list[TableShape]] = {}
    for path, m in module.named_modules():
        if any(path.startswith(p + ".") or p == "" for p in found):
            continue  # the EC inside an MC-EC is sharded with it
        managed = isinstance(m, ManagedCollisionEmbeddingCollection)
        if managed:
            configs = m._embedding_module.embedding_configs()
        elif isinstance(m, EmbeddingCollection):
            configs = m.embedding_configs()
        else:
            continue
        found[path] = [
            TableShape(c.name, c.num_embeddings, c.embedding_dim, len(c.feature_names), managed)
            for c in configs
        ]
    from genrec.embeddings.tables import SparseEmbeddings

    if not found and not any(isinstance(m, SparseEmbeddings) for m in module.modules()):
        raise ValueError("the module holds no EmbeddingCollection to shard (no SparseEmbeddings)")
    return found


def _constraints(
    cfg: Config, modules: dict[str, list[TableShape]], device: str, local: int, world: int
):
    constraints: dict[str, ParameterConstraints] = {}
    for tables in modules.values():
        for t in tables:
            override = cfg.sharding.overrides.get(t.name)
            if override is not None:
                if override not in STRATEGIES:
                    raise ValueError(f"sharding.overrides.{t.name}: unknown strategy {override!r}")
                check_supported(t, override, device, local, world)
                allowed = [override]
            elif t.managed:
                allowed = ["row_wise"]
            else:
                allowed = ["table_wise", "row_wise", "column_wise"]
                allowed += ["data_parallel"] if device == "cuda" else []
            constraints[t.name] = ParameterConstraints(
                sharding_types=[STRATEGIES[s] for s in allowed],
                compute_kernels=sorted({compute_kernel(cfg, s, device) for s in allowed}),
                pooling_factors=[float(cfg.model.max_len)] * t.num_features,
            )
    return constraints


def build_plan(
    cfg: Config,
    module: torch.nn.Module,
    world_size: int | None = None,
    device_type: str | None = None,
    pg=None,
) -> ShardingPlan:
    """Plan for every embedding collection in `module` (cfg.sharding.plan_file if set)."""
    if world_size is None:
        world_size = pg.size() if pg is not None else cfg.sharding.topology.world_size
    device = device_type or cfg.sharding.topology.device
    modules = embedding_modules(module)
    if cfg.sharding.plan_file:
        plan = load_plan(cfg.sharding.plan_file)
        _check_loaded(plan, modules, world_size, cfg.sharding.plan_file)
        return plan
    local = local_world_size(world_size, cfg.sharding.topology.hosts)
    if not modules:  # every table is replicated (data_parallel): nothing to shard
        return ShardingPlan({})
    if device == "cpu" and cfg.trainer.sparse_optimizer == "adam":
        tables = sorted(t.name for ts in modules.values() for t in ts)
        raise ValueError(
            f"trainer.sparse_optimizer=adam: FBGEMM's fused CPU kernels have no Adam, and "
            f"tables {tables} are sharded; on CPU use rowwise_adagrad, adagrad or sgd, or "
            "sharding.strategy=data_parallel so the dense optimizer (AdamW) trains them"
        )
    if cfg.sharding.strategy == "auto":
        planner = EmbeddingShardingPlanner(
            topology=topology_from_config(cfg, world_size, device),
            batch_size=cfg.trainer.batch_size,
            constraints=_constraints(cfg, modules, device, local, world_size),
            debug=False,
        )
        if pg is not None:
            return planner.collective_plan(module, sharders(cfg), pg)
        return planner.plan(module, sharders(cfg))
    loads = [0.0] * world_size
    return ShardingPlan(
        {
            path: explicit_plan(cfg, tables, world_size, local, device, loads)
            for path, tables in modules.items()
        }
    )


def _check_loaded(plan: ShardingPlan, modules: dict, world: int, path: str) -> None:
    for mod, tables in modules.items():
        have = set(plan.plan.get(mod, {}))
        want = {t.name for t in tables}
        if have != want:
            raise ValueError(
                f"plan file {path}: module {mod!r} has tables {sorted(have)}, the model "
                f"{sorted(want)}; re-run `genrec plan CONFIG --save {path}`"
            )
        for name, ps in plan.plan[mod].items():
            if max(ps.ranks or [0]) >= world:
                raise ValueError(
                    f"plan file {path}: table {name!r} uses rank {max(ps.ranks)} but the "
                    f"world size is {world}; re-plan for this world size"
                )


# --------------------------------------------------------------------------- plan files


def plan_to_dict(plan: ShardingPlan) -> dict:
    modules = {}
    for mod, tables in plan.plan.items():
        modules[mod] = {}
        for name, ps in tables.items():
            spec = ps.sharding_spec
            shards = (
                [
                    {
                        "offsets": s.shard_offsets,
                        "sizes": s.shard_sizes,
                        "placement": str(s.placement),
                    }
                    for s in spec.shards
                ]
                if spec is not None
                else None
            )
            modules[mod][name] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": ps.ranks,
                "shards": shards,
            }
    return {"format": PLAN_FORMAT, "modules": modules}


def plan_from_dict(data: dict) -> ShardingPlan:
    if data.get("format") != PLAN_FORMAT:
        raise ValueError(f"plan format {data.get('format')!r}; this genrec reads {PLAN_FORMAT}")
    plan = {}
    for mod, tables in data["modules"].items():
        mplan = EmbeddingModuleShardingPlan()
        for name, p in tables.items():
            spec = None
            if p["shards"] is not None:
                spec = EnumerableShardingSpec(
                    [
                        ShardMetadata(
                            shard_offsets=list(s["offsets"]),
                            shard_sizes=list(s["sizes"]),
                            placement=s["placement"],
                        )
                        for s in p["shards"]
                    ]
                )
            mplan[name] = ParameterSharding(
                sharding_type=p["sharding_type"],
                compute_kernel=p["compute_kernel"],
                ranks=p["ranks"],
                sharding_spec=spec,
            )
        plan[mod] = mplan
    return ShardingPlan(plan)


def save_plan(plan: ShardingPlan, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(plan_to_dict(plan), indent=1))


def load_plan(path: str | Path) -> ShardingPlan:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"sharding.plan_file {str(p)!r} does not exist; write it with "
            "`genrec plan CONFIG --save PATH`"
        )
    try:
        return plan_from_dict(json.loads(p.read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a genrec plan file ({e})") from e


# --------------------------------------------------------------------------- describing


def rank_memory(plan: ShardingPlan, cfg: Config, world_size: int) -> list[float]:
    """Bytes per rank: fp32 weights + sparse optimizer state (DP tables: dense AdamW state)."""
    dims = {t.name: (t.num_embeddings, t.dim) for t in cfg.embeddings.tables}
    mem = [0.0] * world_size
    factor = _STATE_PER_WEIGHT[cfg.trainer.sparse_optimizer]
    for name in replicated_tables(cfg):  # a full replica + AdamW's 2 moments on every rank
        rows, dim = dims[name]
        for r in range(world_size):
            mem[r] += 3 * 4.0 * rows * dim
    for tables in plan.plan.values():
        for name, ps in tables.items():
            if ps.sharding_spec is None:  # data parallel: a full replica + AdamW's 2 moments
                rows, dim = dims.get(name, (0, 0))
                for r in ps.ranks or range(world_size):
                    mem[r] += 3 * 4.0 * rows * dim
                continue
            for s in ps.sharding_spec.shards:
                rows, cols = s.shard_sizes
                state = rows if factor is None else factor * rows * cols
                mem[s.placement.rank()] += 4.0 * (rows * cols + state)
    return mem


def describe_plan(
    plan: ShardingPlan, cfg: Config | None = None, world_size: int | None = None
) -> str:
    """Per table: sharding type, kernel, ranks, shard offsets/sizes; then memory per rank."""
    lines = []
    for mod, tables in plan.plan.items():
        lines.append(f"module {mod or '<root>'}")
        for name, ps in tables.items():
            ranks = ps.ranks or []
            rank_txt = f"{ranks[0]}..{ranks[-1]}" if len(ranks) > 4 else str(ranks)
            lines.append(
                f"  {name:<16} {ps.sharding_type:<14} kernel={ps.compute_kernel:<10} "
                f"ranks={rank_txt} ({len(ranks)})"
            )
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
            for s in shards[:4]:
                lines.append(
                    f"      shard @{s.placement}: offsets={s.shard_offsets} sizes={s.shard_sizes}"
                )
            if len(shards) > 4:
                lines.append(f"      ... {len(shards) - 4} more shards of the same form")
    if cfg is not None:
        world = world_size or cfg.sharding.topology.world_size
        replicated = replicated_tables(cfg)
        if replicated:
            lines.append("replicated tables (plain modules; DDP averages grads; dense AdamW)")
            rank_txt = f"0..{world - 1}" if world > 4 else str(list(range(world)))
            for name in replicated:
                lines.append(
                    f"  {name:<16} {'data_parallel':<14} kernel={'ddp':<10} "
                    f"ranks={rank_txt} ({world})"
                )
        mem = rank_memory(plan, cfg, world)
        cap = cfg.sharding.topology.hbm_gb
        lines.append(
            f"memory per rank: fp32 weights + {cfg.trainer.sparse_optimizer} state only "
            f"(activations below), GiB of {cap:g}:"
        )
        for r0 in range(0, world, 8):
            row = "  ".join(f"r{r}={mem[r] / GIB:7.2f}" for r in range(r0, min(world, r0 + 8)))
            lines.append(f"  {row}")
        lines.append(f"  max {max(mem) / GIB:.2f} GiB, total {sum(mem) / GIB:.2f} GiB")
    return "\n".join(lines)


def sized_by_vocabularies(cfg: Config) -> tuple[Config, dict, list[str]]:
    """(a copy of cfg whose kind: vocab tables have their vocabulary's row count as
    num_embeddings, {feature: Vocabulary}, a note per table whose config said otherwise).
    The files are read from data.prepared_dir; a missing one fails naming it."""
    from genrec.embeddings.tables import read_vocabulary

    cfg = copy.deepcopy(cfg)
    vocabularies, notes = {}, []
    for t in cfg.embeddings.tables:
        for f in t.features if t.kind == "vocab" else ():
            vocab = read_vocabulary(cfg.data.prepared_dir, t, f)
            vocabularies[f] = vocab
            if vocab.num_rows != t.num_embeddings:
                notes.append(
                    f"table {t.name!r}: {vocab.num_rows} rows from {vocab.source} (config says "
                    f"{t.num_embeddings}; set num_embeddings: {vocab.num_rows} to train it)"
                )
                t.num_embeddings = vocab.num_rows
    return cfg, vocabularies, notes


def table_sharding(plan: ShardingPlan) -> dict[str, tuple[str, int]]:
    """Table -> (sharding type, column shards) of the model-parallel tables of a plan."""
    out = {}
    for tables in plan.plan.values():
        for name, ps in tables.items():
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
            cols = len({s.shard_offsets[1] for s in shards}) or 1
            out[name] = (ps.sharding_type, cols)
    return out


def dense_parameters(cfg: Config) -> int:
    """Parameters of the HSTU encoder (built on the meta device); 0 for other kinds."""
    if cfg.model.kind != "hstu":
        return 0
    from genrec.models.hstu import HSTUEncoder

    with torch.device("meta"):
        return sum(p.numel() for p in HSTUEncoder(cfg.model).parameters())


def size(nbytes: float) -> str:
    """Bytes in the largest binary unit they fill: '1.50 GiB', '12.00 KiB', '80 B'."""
    for unit, name in ((GIB, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if nbytes >= unit:
            return f"{nbytes / unit:.2f} {name}"
    return f"{nbytes:.0f} B"


def describe_time(
    cfg: Config, plan: ShardingPlan, world: int, events: int = 0, tokens_per_s: float = 0.0
) -> str:
    """The time model (estimates.py): activations, communication, hours for one pass."""
    data = est.pass_data(cfg, events)
    act = est.activation_bytes(cfg, data)
    params = dense_parameters(cfg)
    comm = est.comm_bytes(cfg, table_sharding(plan), world, params)
    b, mt = cfg.trainer.batch_size, est.max_tokens(cfg)
    pos = est.positions(cfg, data)
    how = "mean targets per row of the data" if data.rows else "every event a target"
    enc, logits, rows = act["encoder"], act["loss_logits"], act["embedding_rows"]
    lines = [
        f"time model (estimates per rank and step at batch {b}, see sharding_plans/estimates.py)",
        f"  activations: encoder {size(enc)} ({b} x {mt} tokens), loss logits {size(logits)} "
        f"({pos} positions: {how}), looked-up rows {size(rows)}; total "
        f"{size(enc + logits + rows)}",
        f"  (the PyTorch reference attention adds {size(act['reference_attention_scores'])} "
        "of scores; the Triton kernel keeps none)",
        f"  sent per step: all-to-all {size(comm['all_to_all'])} (sharded tables), all-reduce "
        f"{size(comm['all_reduce'])} (replicated tables + {params:,} dense parameters)",
    ]
    speed = tokens_per_s or est.default_tokens_per_s(cfg)
    cite = (
        "--tokens-per-s"
        if tokens_per_s
        else est.SOURCE_OF_SPEED.format(layers=cfg.model.num_layers)
    )
    hours = est.pass_hours(cfg, data, speed, world)
    if hours is None:
        lines.append(
            f"  hours per pass: unknown events (no {cfg.data.prepared_dir}/_meta.json); "
            "pass --events N"
        )
    else:
        lo, hi = hours
        span = f"{lo:,.2f}" if lo == hi else f"{lo:,.2f} to {hi:,.2f}"
        history = "" if data.rows else "; history re-encoding not counted: rows unknown"
        lines.append(
            f"  one pass over {data.events:,} events ({data.where}): {span} hours on {world} "
            f"GPUs at {speed:,.0f} tokens/s per GPU (an estimate{history}; {cite})"
        )
    return "\n".join(lines)


def plan_command(cfg: Config, save: str = "", events: int = 0, tokens_per_s: float = 0.0) -> int:
    """`genrec plan CONFIG`: plan on the meta device for the configured topology; print
    memory per rank and the time model; vocab tables are sized from their vocabulary files."""
    from genrec.embeddings.tables import SparseEmbeddings

    cfg, vocabularies, notes = sized_by_vocabularies(cfg)
    topo = cfg.sharding.topology
    module = SparseEmbeddings(
        cfg.embeddings,
        device=torch.device("meta"),
        mc_buckets=topo.world_size,
        replicated=replicated_tables(cfg),
        vocabularies=vocabularies,
    )
    plan = build_plan(cfg, module, world_size=topo.world_size, device_type=topo.device)
    print(
        f"plan for {topo.world_size} ranks ({topo.hosts} hosts x "
        f"{topo.world_size // topo.hosts} {topo.device}, {topo.hbm_gb:g} GiB each), "
        f"strategy {cfg.sharding.strategy}"
    )
    for note in notes:
        print(f"vocab {note}")
    print(describe_plan(plan, cfg, topo.world_size))
    print(describe_time(cfg, plan, topo.world_size, events, tokens_per_s))
    if save:
        save_plan(plan, save)
        print(f"plan written to {save}")
    return 0
