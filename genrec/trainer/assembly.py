"""Model assembly: embeddings + HSTU wrapped in DistributedModelParallel with genrec's plan.

Sparse tables train with a fused optimizer inside TorchRec's kernels (row-wise Adagrad by
default, set by the sharders from `trainer.sparse_optimizer`); every other parameter trains
with AdamW. Both sit in one `CombinedOptimizer`, whose state dict DCP checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from genrec.config import Config
from genrec.models.build import build_model
from genrec.sharding_plans.planner import build_plan, sharders
from genrec.trainer.distributed import DistContext


@dataclass
class Assembled:
    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    dense_params: list[torch.nn.Parameter]


def _fused_param_ids(dmp: DistributedModelParallel) -> set[int]:
    ids = set()
    for group in dmp.fused_optimizer.param_groups:
        for p in group["params"]:
            ids.add(id(p))
    return ids


def assemble(cfg: Config, ctx: DistContext) -> Assembled:
    torch.manual_seed(cfg.trainer.seed)  # identical dense init on every rank
    model = build_model(cfg)
    plan = build_plan(cfg, model, world_size=ctx.world_size, device_type=ctx.device.type)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=ctx.device,
        plan=plan,
        sharders=sharders(cfg),
    )
    fused = _fused_param_ids(dmp)
    dense = {n: p for n, p in dmp.named_parameters() if id(p) not in fused and p.requires_grad}
    dense_opt = KeyedOptimizerWrapper(
        dense,
        lambda params: torch.optim.AdamW(
            params, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay
        ),
    )
    optimizer = CombinedOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense_opt)])
    return Assembled(dmp, optimizer, list(dense.values()))
