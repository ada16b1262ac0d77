from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from genrec.config import Config, EmbeddingsConfig, TableConfig, load_config
from genrec.embeddings.tables import SparseEmbeddings
from genrec.sharding_plans.planner import (
    build_plan,
    describe_plan,
    load_plan,
    plan_command,
    plan_to_dict,
    rank_memory,
    save_plan,
    sharders,
)

ROOT = Path(__file__).resolve().parents[2]


def _cfg(strategy: str, world: int = 2, device: str = "cpu", hosts: int = 1) -> Config:
    cfg = Config()
    cfg.embeddings = EmbeddingsConfig(
        tables=[
            TableConfig(
                name="item", num_embeddings=1000, dim=64, features=["item_id"], num_hashes=2
            ),
            TableConfig(name="user", num_embeddings=501, dim=64, features=["user_id"]),
            TableConfig(name="tiny", num_embeddings=10, dim=64, features=["brand", "category"]),
        ]
    )
    cfg.sharding.strategy = strategy
    cfg.sharding.topology.world_size, cfg.sharding.topology.device = world, device
    cfg.sharding.topology.hosts = hosts
    return cfg


def _plan(cfg: Config):
    module = SparseEmbeddings.from_config(cfg, device=torch.device("meta"))
    return build_plan(cfg, module)


def _covered(ps) -> tuple[int, int]:
    """Rows x cols covered by a parameter's shards, checking they tile without overlap."""
    cells = sum(s.shard_sizes[0] * s.shard_sizes[1] for s in ps.sharding_spec.shards)
    rows = max(s.shard_offsets[0] + s.shard_sizes[0] for s in ps.sharding_spec.shards)
    cols = max(s.shard_offsets[1] + s.shard_sizes[1] for s in ps.sharding_spec.shards)
    assert cells == rows * cols
    return rows, cols


def test_named_strategies_tile_every_table():
    shapes = {"item": (1000, 64), "user": (501, 64), "tiny": (10, 64)}
    for strategy, want_type, n_shards in [
        ("row_wise", "row_wise", 2),
        ("table_wise", "table_wise", 1),
        ("column_wise", "column_wise", 2),
        ("table_row_wise", "row_wise", 2),  # one host: the same placement as row-wise
    ]:
        plan = _plan(_cfg(strategy)).plan["ec"]
        for name, ps in plan.items():
            assert ps.sharding_type == want_type and ps.compute_kernel == "fused", (strategy, name)
            assert len(ps.sharding_spec.shards) == n_shards
            assert _covered(ps) == shapes[name]
    tw = _plan(_cfg("table_wise")).plan["ec"]
    assert tw["item"].ranks != tw["user"].ranks  # big tables spread over ranks
    assert [
        s.shard_sizes for s in _plan(_cfg("row_wise")).plan["ec"]["user"].sharding_spec.shards
    ] == [[251, 64], [250, 64]]


def test_overrides_and_cpu_limits_fail_early():
    cfg = _cfg("row_wise")
    cfg.sharding.overrides = {"tiny": "table_wise"}
    plan = _plan(cfg).plan["ec"]
    assert plan["tiny"].sharding_type == "table_wise" and plan["item"].sharding_type == "row_wise"
    cfg.sharding.overrides = {"nosuch": "row_wise"}
    with pytest.raises(ValueError, match="nosuch"):
        _plan(cfg)
    # data_parallel tables are replicated outside the EC; one left inside is refused
    with pytest.raises(ValueError, match="replicated=replicated_tables"):
        dp_cfg = _cfg("data_parallel")
        build_plan(dp_cfg, SparseEmbeddings(dp_cfg.embeddings, device=torch.device("meta")))
    with pytest.raises(ValueError, match="no table-row-wise sequence sharding"):
        _plan(_cfg("table_row_wise", world=4, hosts=2))
    mc = _cfg("row_wise")
    mc.embeddings.tables.append(
        TableConfig(name="cat", num_embeddings=64, dim=64, features=["c"], kind="managed_collision")
    )
    with pytest.raises(ValueError, match="reset_weight_momentum has no CPU kernel"):
        _plan(mc)
    adam = _cfg("row_wise")
    adam.trainer.sparse_optimizer = "adam"
    with pytest.raises(ValueError, match=r"fused CPU kernels have no Adam.*'item', 'tiny', 'user'"):
        _plan(adam)
    adam.sharding.topology.device = "cuda"  # FBGEMM's GPU kernels have it
    assert _plan(adam).plan["ec"]["item"].sharding_type == "row_wise"
    mc.sharding.topology.device = "cuda"
    mc.sharding.strategy = "table_wise"  # MCH tables stay row-wise
    plan = _plan(mc).plan
    assert plan["mc_ec"]["cat"].sharding_type == "row_wise"
    assert plan["ec"]["item"].sharding_type == "table_wise"
    for device in ("cpu", "cuda"):  # the same on every device: nothing left to shard
        dp_cfg = _cfg("data_parallel", world=4, device=device)
        dp = _plan(dp_cfg)
        assert dp.plan == {}
        text = describe_plan(dp, dp_cfg, 4)
        assert (
            len(re.findall(r"^  \w+ +data_parallel +kernel=ddp +ranks=\[0, 1, 2, 3\]", text, re.M))
            == 3
        )
        # full replica + AdamW's two moments of every table on every rank
        assert rank_memory(dp, dp_cfg, 4) == [3 * 4.0 * (1000 + 501 + 10) * 64] * 4


def test_plan_file_roundtrip_and_validation(tmp_path):
    cfg = _cfg("column_wise", world=4, device="cuda")
    cfg.sharding.overrides = {"tiny": "data_parallel"}
    plan = _plan(cfg)
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    assert plan_to_dict(load_plan(path)) == plan_to_dict(plan)
    cfg.sharding.plan_file = str(path)
    cfg.sharding.strategy = "row_wise"  # ignored: the file wins
    assert plan_to_dict(_plan(cfg)) == plan_to_dict(plan)
    text = describe_plan(plan, cfg, 4)
    assert "column_wise" in text and "data_parallel" in text and "r3=" in text
    assert "tiny" not in plan.plan["ec"]  # replicated, not planned
    cfg.embeddings.tables = [cfg.embeddings.tables[0], cfg.embeddings.tables[2]]
    with pytest.raises(ValueError, match="re-run `genrec plan"):
        _plan(cfg)
    with pytest.raises(ValueError, match="rank 3 but the world size is 2"):
        cfg.embeddings = _cfg("x").embeddings
        build_plan(
            cfg, SparseEmbeddings.from_config(cfg, device=torch.device("meta")), world_size=2
        )


def test_sharders_carry_the_fused_optimizer():
    cfg = _cfg("row_wise")
    cfg.trainer.sparse_optimizer, cfg.trainer.sparse_lr = "adagrad", 0.3
    ec_sharder, mc_sharder = sharders(cfg)
    assert ec_sharder.fused_params["optimizer"] == EmbOptimType.EXACT_ADAGRAD
    assert ec_sharder.fused_params["learning_rate"] == 0.3
    assert mc_sharder.fused_params["optimizer"] == EmbOptimType.EXACT_ADAGRAD


def test_tecd_auto_plan_for_64_gpus_on_meta(capsys, tmp_path):
    cfg = load_config(ROOT / "genrec" / "configs" / "tecd.yaml")
    assert plan_command(cfg, save=str(tmp_path / "tecd.json")) == 0
    out = capsys.readouterr().out
    kinds = dict(re.findall(r"^  (\w+) +(\w+) +kernel=", out, flags=re.M))
    assert set(kinds) == {"item", "surface"}
    assert kinds["item"] == "row_wise"
    assert kinds["surface"] in ("data_parallel", "table_wise")
    # memory per rank: item 32M x 256 fp32 + rowwise state over 64 ranks, plus at most a
    # full replica of the small surface table (weights + AdamW moments)
    max_gib = float(re.search(r"max ([\d.]+) GiB", out).group(1))
    expected = 32e6 * (256 + 1) * 4 / 64 / 2**30
    replicas = 1024 * 256 * 4 * 3 / 2**30
    assert expected - 0.01 <= max_gib <= expected + replicas + 0.01, (max_gib, expected)
    assert len(load_plan(tmp_path / "tecd.json").plan["ec"]["item"].ranks) == 64
