"""Shared pieces of the trainer tests: a tiny model config and checkpoint readers."""

from __future__ import annotations

from pathlib import Path

from genrec.config import Config, from_dict, load_config
from genrec.data_pipeline.model_inputs import read_model_inputs
from genrec.trainer import checkpoint as ckpt

from ..conftest import ROOT

TINY_MODEL = [
    "trainer.log_every=1",
    "model.max_len=20",
    "model.num_layers=1",
    "model.dim=32",
    "model.attn_dim=16",
    "model.linear_dim=16",
    "embeddings.frequency.width=4096",
]


def tiny_config(prepared_dir: Path, run_dir: Path, *extra: str) -> Config:
    """The quickstart config shrunk for tests, reading `prepared_dir`, writing `run_dir`."""
    return load_config(
        ROOT / "genrec" / "configs" / "quickstart.yaml",
        [f"data.prepared_dir={prepared_dir}", f"trainer.run_dir={run_dir}", *TINY_MODEL, *extra],
    )


def final_model_state(run_dir: Path) -> tuple[dict, dict]:
    """The latest checkpoint's model weights, loaded unsharded in this process, and its state."""
    from genrec.models.build import build_model

    path = ckpt.latest_checkpoint(run_dir)
    state = ckpt.read_state(path)
    cfg = from_dict(state["config"])
    app = {"model": build_model(cfg, read_model_inputs(cfg)).state_dict()}
    ckpt.load_sharded(path, app)
    return {k: v.clone() for k, v in app["model"].items()}, state


def make_prepared(base: Path, users: int, events: int, items: int, seed: int) -> Path:
    """Generate synthetic T-ECD under base/raw and prepare daily shards (max_len 20) into
    base/prepared; returns `base`. Needs a running Ray (the `ray_local` fixture)."""
    from genrec.data_pipeline.sequences import prepare
    from genrec.data_pipeline.synthetic import generate

    generate(
        source="tecd", out_dir=str(base / "raw"), users=users, events=events, items=items, seed=seed
    )
    prepare(
        source="tecd",
        in_dir=str(base / "raw"),
        out_dir=str(base / "prepared"),
        window="day",
        max_len=20,
    )
    return base
