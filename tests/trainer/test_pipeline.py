"""TorchRec's train pipeline equals the plain loop: 2 gloo ranks, DMP-sharded tables.

The same stream is trained twice from the same seed, with trainer.pipeline=none (every step
plain) and trainer.pipeline=sparse_dist (after each window's first evaluated batch the rest
of the window runs through TrainPipelineSparseDist, in segments cut at every checkpoint);
and the same for epochs mode (whole epochs pipelined). Every step's loss on every rank and
the final weights must be equal: the pipeline moves only host preparation and the ids'
all-to-all ahead, never a lookup (trainer/pipeline.py).
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


@pytest.fixture(scope="module")
def prepared_epochs(prepared) -> Path:
    """The same raw events prepared for epochs mode (one window per user)."""
    from genrec.data_pipeline.sequences import prepare

    out = prepared / "prepared_epochs"
    prepare(source="tecd", in_dir=str(prepared / "raw"), out_dir=str(out), window="1000000000000",
            max_len=20)  # fmt: skip
    return out


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


def _train_epochs(rank: int, world_size: int, prepared: str, run_dir: str, pipeline: str) -> dict:
    from genrec.trainer.distributed import context_from_initialized
    from genrec.trainer.epochs import EpochTrainer
    from genrec.trainer.progressive import WindowMetrics

    cfg = tiny_config(
        Path(prepared),
        Path(run_dir),
        f"trainer.pipeline={pipeline}",
        "trainer.mode=epochs",
        "trainer.epochs=2",
        "trainer.batch_size=16",
        "model.dropout=0.1",
        "model.retrieval.num_negatives=64",
        "embeddings.tables=[{name: item, num_embeddings: 4096, dim: 32, features: [item_id]}]",
    )
    losses: list[float] = []
    add_loss = WindowMetrics.add_loss

    def record(self, loss, n):  # every training step's loss on this rank (test only)
        losses.append(float(loss))
        add_loss(self, loss, n)

    piped: list[int] = []
    forward = EpochTrainer.pipelined_forward

    def pipelined_forward(self, step):  # the steps TorchRec's pipeline ran
        piped.append(step.step)
        return forward(self, step)

    WindowMetrics.add_loss, EpochTrainer.pipelined_forward = record, pipelined_forward
    trainer = EpochTrainer(cfg, context_from_initialized("cpu"))
    history = trainer.run(resume=False, progress=False)
    return {"losses": losses, "test": history[-1], "piped": piped}


def test_pipelined_epochs_equal_plain_epochs(prepared, prepared_epochs):
    out, weights = {}, {}
    for pipeline in ("none", "sparse_dist"):
        run = prepared / f"epochs_{pipeline}"
        out[pipeline] = run_on_ranks(
            _train_epochs, world_size=2, args=(str(prepared_epochs), str(run), pipeline)
        )
        weights[pipeline] = final_model_state(run)[0]
    for rank in range(2):
        plain, piped = out["none"][rank], out["sparse_dist"][rank]
        assert len(piped["losses"]) == len(plain["losses"]) > 10
        assert piped["piped"] == list(range(len(piped["losses"]))) and not plain["piped"]
        torch.testing.assert_close(
            torch.tensor(piped["losses"]), torch.tensor(plain["losses"]), rtol=1e-6, atol=1e-7
        )
        assert piped["test"]["test/ndcg@10"] == pytest.approx(plain["test"]["test/ndcg@10"])
    for k in weights["none"]:
        torch.testing.assert_close(
            weights["sparse_dist"][k], weights["none"][k], rtol=1e-6, atol=1e-7, msg=k
        )
