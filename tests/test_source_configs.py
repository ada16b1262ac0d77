"""The shipped source configs (tecd, vk_lsvd, yambda) train end to end, scaled down.

Each config is loaded as shipped and shrunk only in size (tables keep their names, features,
kinds and hashes; the model keeps its contextual tokens): synthetic data of that source from
`genrec generate`, prepared by the Ray job, one stream-mode pass capped at a few steps on 2
gloo ranks. The run must finish with finite losses and progressive (per-window) metrics.
"""

from __future__ import annotations

import csv
import math

import pytest

from genrec.config import load_config

from .conftest import ROOT

STEPS = 6
SCALED = [
    "trainer.launcher=local",
    "trainer.world_size=2",
    "trainer.backend=gloo",
    "sharding.topology.world_size=2",
    "sharding.topology.device=cpu",
    "sharding.topology.hosts=1",
    "data.reader=local",
    "data.ray_address=",
    "data.max_len=20",
    "model.max_len=20",
    "model.dim=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.attn_dim=16",
    "model.linear_dim=16",
    "model.retrieval.num_negatives=64",
    "embeddings.frequency.width=4096",
    "trainer.batch_size=16",
    "trainer.eval_batches=2",
    "trainer.log_every=1",
    "trainer.checkpoint_every=0",
    f"trainer.max_steps={STEPS}",
]


def small_tables(cfg) -> str:
    """The config's own tables at 4096 rows (or fewer) x 32 dims, as one override."""
    rows = [
        f"{{name: {t.name}, num_embeddings: {min(t.num_embeddings, 4096)}, dim: 32, "
        f"features: [{', '.join(t.features)}], kind: {t.kind}, num_hashes: {t.num_hashes}}}"
        for t in cfg.embeddings.tables
    ]
    return f"embeddings.tables=[{', '.join(rows)}]"


@pytest.mark.parametrize("source", ["tecd", "vk_lsvd", "yambda"])
def test_source_config_trains_with_progressive_metrics(source, tmp_path, ray_local):
    from genrec.data_pipeline.sequences import prepare
    from genrec.data_pipeline.synthetic import generate
    from genrec.trainer.launch import train

    path = ROOT / "configs" / f"{source}.yaml"
    shipped = load_config(path)
    assert shipped.data.source == source
    generate(source, str(tmp_path / "raw"), users=200, events=6000, items=300, seed=0)
    prepare(
        source=source,
        in_dir=str(tmp_path / "raw"),
        out_dir=str(tmp_path / "prepared"),
        window=shipped.data.window,
        max_len=20,
    )
    cfg = load_config(
        path,
        [
            *SCALED,
            small_tables(shipped),
            f"data.prepared_dir={tmp_path / 'prepared'}",
            f"trainer.run_dir={tmp_path / 'run'}",
        ],
    )
    assert cfg.model.user_feature_tokens == shipped.model.user_feature_tokens
    train(cfg, resume=False)

    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["value"]) for r in rows if r["kind"] == "step" and r["name"] == "loss"]
    assert len(losses) == STEPS
    assert all(math.isfinite(v) for v in losses), losses
    windows = {r["window"] for r in rows if r["kind"] == "window"}
    assert windows, "no progressive (per-window) metrics were written"
    for w in windows:
        got = {
            r["name"]: float(r["value"]) for r in rows if r["kind"] == "window" and r["window"] == w
        }
        assert got["positions"] > 0
        assert 0.0 <= got["model/recall@10"] <= 1.0 and math.isfinite(got["loss"])
