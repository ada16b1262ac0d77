"""The time model of `genrec plan` equals a hand computation on a small config."""

from __future__ import annotations

import json
import re

import pytest

from genrec.config import Config, TableConfig
from genrec.sharding_plans import estimates as est
from genrec.sharding_plans.planner import dense_parameters, plan_command, size


def _cfg(tmp_path) -> Config:
    cfg = Config()
    m = cfg.model
    m.dim, m.num_layers, m.num_heads, m.attn_dim, m.linear_dim, m.max_len = 8, 3, 2, 4, 4, 10
    m.retrieval.num_negatives = 5
    cfg.trainer.batch_size = 4
    cfg.embeddings.tables = [
        TableConfig(name="item", num_embeddings=100, dim=8, features=["item_id"], num_hashes=2),
        TableConfig(name="surface", num_embeddings=16, dim=8, features=["surface"]),
    ]
    cfg.data.prepared_dir = str(tmp_path / "prepared")
    return cfg


def test_activations_and_communication_by_hand(tmp_path):
    cfg = _cfg(tmp_path)
    act = est.activation_bytes(cfg)
    # per token and layer 2*8 + 2*2*(2*4 + 2*4) + 3*2*4 = 104 floats; 4 x 10 tokens, 3 layers
    assert act["encoder"] == 3 * 40 * 104 * 4
    # 40 positions (every event a target) x (1 + 40 in-batch + 5 negatives), fp32
    assert act["loss_logits"] == 40 * 46 * 4
    # item: (40 events + 5 negatives) x 2 hashes x 8 dims; surface: 40 x 8; fp32
    assert act["embedding_rows"] == (45 * 2 * 8 + 40 * 8) * 4
    assert act["reference_attention_scores"] == 3 * 4 * 2 * 10**2 * 4
    cfg.trainer.bf16, cfg.sharding.topology.device = True, "cuda"
    assert est.activation_bytes(cfg)["encoder"] == 3 * 40 * 104 * 2  # bf16 autocast
    comm = est.comm_bytes(cfg, {"item": ("row_wise", 1)}, world=4, dense_params=10)
    # item ids 90 leave the rank 3/4 of the time: 8 bytes id + 8 x 4 row fwd + 8 x 4 grad bwd
    assert comm["all_to_all"] == pytest.approx(0.75 * 90 * (8 + 64))
    # ring all-reduce of the replicated surface table (16 x 8) and 10 dense parameters
    assert comm["all_reduce"] == pytest.approx(2 * 0.75 * (16 * 8 + 10) * 4)
    col = est.comm_bytes(cfg, {"item": ("column_wise", 2), "surface": ("table_wise", 1)}, 4)
    assert col["all_to_all"] == pytest.approx(0.75 * (90 * (16 + 64) + 40 * (8 + 64)))
    assert col["all_reduce"] == 0


def test_hours_and_positions_from_prepared_meta(tmp_path):
    cfg = _cfg(tmp_path)
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "_meta.json").write_text(
        json.dumps({"num_events": 7200, "num_rows": 100})
    )
    data = est.pass_data(cfg)
    assert (data.events, data.rows) == (7200, 100)
    # 7,200 targets, and up to 100 rows x 10 history events, at 2 tokens/s on 4 GPUs
    assert est.pass_hours(cfg, data, tokens_per_s=2, world=4) == pytest.approx(
        (7200 / 28800, 8200 / 28800)
    )
    assert est.positions(cfg, data) == 40  # 72 targets per row, capped at max_len 10
    assert est.positions(cfg, est.PassData(300, 100)) == 12  # 3 per row x batch 4
    assert est.pass_hours(cfg, est.PassData(), 2, 4) is None


def test_dense_parameters_of_the_encoder_by_hand(tmp_path):
    cfg = _cfg(tmp_path)
    # per layer: LN 2*8, W1 8*32 + 32, LN 2*8, W2 8*8 + 8, pos bias 10, time bias 64
    assert dense_parameters(cfg) == 3 * (16 + 288 + 16 + 72 + 10 + 64) + 16


def test_plan_prints_the_time_model(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    cfg.sharding.strategy = "row_wise"
    cfg.model.user_feature_tokens = ["surface"]
    assert plan_command(cfg, events=7200, tokens_per_s=2) == 0
    out = capsys.readouterr().out
    assert "fp32 weights + rowwise_adagrad state only" in out
    # 2 ranks; 11 tokens per sequence with the contextual token
    assert f"encoder {size(3 * 4 * 11 * 104 * 4)} (4 x 11 tokens)" in out
    assert size(3 * 4 * 11 * 104 * 4) == "53.62 KiB"
    hours = float(re.search(r"one pass over 7,200 events \(--events\): ([\d.]+) hours", out)[1])
    assert hours == pytest.approx(7200 / (2 * 2 * 3600), abs=0.005)
    assert "at 2 tokens/s per GPU (an estimate; history re-encoding not counted" in out
    item, surface = 0.5 * 90 * (8 + 64), 0.5 * 40 * (8 + 64)  # both row-wise over 2 ranks
    assert f"all-to-all {size(item + surface)} (sharded tables)" in out
