"""Session fixtures for deploy tests: real ml-100k histories, checkpoints written by 2 and 1
sharded gloo ranks, and the artifacts exported from them (AOTInductor compiles ONCE)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from genrec.config import Config, to_dict
from tests.deploy.helpers import (
    read_ml100k,
    sharded_train_and_save,
    tiny_config,
    user_sequences,
    write_prepared,
)
from tests.dist_utils import run_on_ranks


@dataclass
class DeployEnv:
    root: Path
    cfg: Config
    catalog: np.ndarray  # raw item ids of ml-100k
    seqs: list[dict]  # real user histories (<= 24 events, oldest first)
    checkpoints: dict[int, Path]  # world size -> checkpoint dir
    sharded_top10: dict[int, dict]  # world size -> rank 0's top-10 from the sharded model


@pytest.fixture(scope="session")
def deploy_env(tmp_path_factory, shared_data) -> DeployEnv:
    root = tmp_path_factory.mktemp("deploy")
    events = read_ml100k(shared_data / "ml-100k")
    catalog = write_prepared(events, root / "prepared")
    cfg = tiny_config(str(root / "prepared"))
    seqs = user_sequences(events, n_users=32, max_events=24)
    checkpoints, top10 = {}, {}
    for ws in (2, 1):
        run_dir = root / f"run-ws{ws}"
        out = run_on_ranks(
            sharded_train_and_save, ws, args=(to_dict(cfg), str(run_dir), seqs, catalog)
        )
        checkpoints[ws] = run_dir / "checkpoints" / "step-00000002"
        top10[ws] = out[0]
    return DeployEnv(root, cfg, catalog, seqs, checkpoints, top10)


@pytest.fixture(scope="session")
def eager_model(deploy_env):
    from genrec.deploy.export import load_checkpoint_model

    return load_checkpoint_model(deploy_env.checkpoints[2])[0]


@pytest.fixture(scope="session")
def retrieval_artifact(deploy_env) -> Path:
    """The ws=2 checkpoint exported WITH AOTInductor (the one compile of the session)."""
    from genrec.deploy.export import export

    out = deploy_env.root / "artifact-retrieval"
    export(str(deploy_env.checkpoints[2]), str(out), compile_aot=True)
    return out


def save_unsharded_checkpoint(model: torch.nn.Module, cfg: Config, run_dir: Path) -> Path:
    """A one-process checkpoint (no process group) through the trainer's save_checkpoint."""
    from genrec.trainer.checkpoint import save_checkpoint

    state = {"step": 0, "world_size": 1, "config": to_dict(cfg), "position": None}
    return save_checkpoint(run_dir, 0, {"model": model.state_dict()}, state, {}).wait()


@pytest.fixture(scope="session")
def ranking_setup(deploy_env):
    """(eager ranking model, its exported artifact without AOT compile)."""
    from genrec.deploy.export import export
    from genrec.models.build import build_model

    cfg = tiny_config(deploy_env.cfg.data.prepared_dir, task="ranking")
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial head and biases, so every term of the math matters
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.3)
    ckpt = save_unsharded_checkpoint(model, cfg, deploy_env.root / "ranking-run")
    out = deploy_env.root / "artifact-ranking"
    export(str(ckpt), str(out), compile_aot=False)
    return model, out


@pytest.fixture(scope="session")
def direct_setup(deploy_env):
    """(eager retrieval model with a direct item table, its artifact without AOT compile)."""
    from genrec.deploy.export import export
    from genrec.models.build import build_model

    cfg = tiny_config(deploy_env.cfg.data.prepared_dir, direct=True)
    torch.manual_seed(2)
    model = build_model(cfg).eval()
    ckpt = save_unsharded_checkpoint(model, cfg, deploy_env.root / "direct-run")
    out = deploy_env.root / "artifact-direct"
    export(str(ckpt), str(out), compile_aot=False)
    return model, out


@pytest.fixture(scope="session")
def generative_setup(deploy_env):
    """A semantic-ID artifact over ml-100k's catalog (unique hand-made codes, random
    weights, no training): (its directory, the codes)."""
    from genrec.config import TableConfig
    from genrec.data_pipeline.model_inputs import read_model_inputs
    from genrec.deploy.export import export
    from genrec.models.build import build_model
    from genrec.semantic.tokenize import write_codes

    ids = np.unique(deploy_env.catalog).astype(np.int64)
    codes = np.stack([ids // 64, (ids // 8) % 8, ids % 8], axis=1)
    write_codes(deploy_env.root / "codes.parquet", ids, codes)
    cfg = tiny_config(deploy_env.cfg.data.prepared_dir, task="generative")
    cfg.embeddings.tables.append(
        TableConfig(name="sid", kind="direct", num_embeddings=64, dim=32, features=["sid"])
    )
    g = cfg.model.generative
    g.codes, g.decoder_layers, g.beam_width, g.top_k = (
        str(deploy_env.root / "codes.parquet"),
        1,
        12,
        10,
    )
    torch.manual_seed(3)
    model = build_model(cfg, read_model_inputs(cfg)).eval()
    ckpt = save_unsharded_checkpoint(model, cfg, deploy_env.root / "generative-run")
    out = deploy_env.root / "artifact-generative"
    export(str(ckpt), str(out))
    return out, codes
