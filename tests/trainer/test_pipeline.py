"""TorchRec's train pipeline equals the plain loop: 2 gloo ranks, DMP-sharded tables.

The same stream is trained twice from the same seed, with trainer.pipeline=none (every step
plain) and trainer.pipeline=sparse_dist (after each window's first evaluated batch the rest
of the window runs through TrainPipelineSparseDist, in segments cut at every checkpoint).
Every step's loss on every rank and the final weights must be equal: the pipeline moves only
host preparation and the ids' all-to-all ahead, never a lookup (trainer/pipeline.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ..dist_utils import run_on_ranks
from .helpers import final_model_state, make_prepared, tiny_config

STEPS = 14


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_local) -> Path:
    return make_prepared(
        tmp_path_factory.mktemp("pipeline"), users=300, events=30_000, items=600, seed=3
    )


def _cfg(base: Path, run: str, pipeline: str, task: str):
    extra = (
        ["model.task=ranking", "model.ranking.tasks=[click, cart]"]
        if task == "ranking"
        else ["model.retrieval.num_negatives=64"]
    )
    return tiny_config(
        base / "prepared",
        base / run,
        f"trainer.pipeline={pipeline}",
        "trainer.batch_size=16",
        "trainer.eval_batches=1",
        "trainer.checkpoint_every=5",
        f"trainer.max_steps={STEPS}",
        "trainer.warmup_steps=4",
        "model.dropout=0.1",  # the per-step seed must reach the pipelined forward too
        "embeddings.tables=[{name: item, num_embeddings: 4096, dim: 32, features: [item_id]}]",
        *extra,
    )


def _train(rank: int, world_size: int, base: str, run: str, pipeline: str, task: str) -> dict:
    from genrec.trainer.distributed import context_from_initialized
    from genrec.trainer.stream_runner import StreamTrainer

    trainer = StreamTrainer(_cfg(Path(base), run, pipeline, task), context_from_initialized("cpu"))
    losses: list[float] = []
    after_step = trainer._after_step

    def record(loss, *args):  # every step's loss on this rank (a readback: test only)
        losses.append(float(loss))
        after_step(loss, *args)

    piped_steps: list[int] = []
    forward = trainer.pipelined_forward

    def pipelined_forward(step):  # the steps TorchRec's pipeline ran
        piped_steps.append(step.step)
        return forward(step)

    trainer._after_step, trainer.pipelined_forward = record, pipelined_forward
    trainer.run(resume=False, progress=False)
    pipelined = [n for n, m in trainer.model.named_modules() if getattr(m, "is_pipelined", False)]
    return {"losses": losses, "pipelined": pipelined, "piped_steps": piped_steps}


@pytest.mark.parametrize("task", ["retrieval", "ranking"])
def test_pipeline_equals_plain_loop(prepared, task):
    runs = {}
    for pipeline in ("none", "sparse_dist"):
        run = f"{task}_{pipeline}"
        out = run_on_ranks(_train, world_size=2, args=(str(prepared), run, pipeline, task))
        runs[pipeline] = (out, *final_model_state(prepared / run))
    (plain, w_plain, s_plain), (piped, w_piped, s_piped) = runs["none"], runs["sparse_dist"]
    # the pipeline really ran: TorchRec rewrote the sharded collection's forward
    assert piped[0]["pipelined"] and not plain[0]["pipelined"]
    assert len(piped[0]["piped_steps"]) >= STEPS // 2 and not plain[0]["piped_steps"]
    for rank in range(2):
        assert len(piped[rank]["losses"]) == len(plain[rank]["losses"]) == STEPS
        torch.testing.assert_close(
            torch.tensor(piped[rank]["losses"]),
            torch.tensor(plain[rank]["losses"]),
            rtol=1e-6,
            atol=1e-7,
        )
    assert s_piped["step"] == s_plain["step"] == STEPS
    assert s_piped["position"] == s_plain["position"]
    assert w_piped.keys() == w_plain.keys()
    for k in w_plain:
        torch.testing.assert_close(w_piped[k], w_plain[k], rtol=1e-6, atol=1e-7, msg=k)
