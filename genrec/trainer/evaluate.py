"""`genrec evaluate`: score a checkpoint without training, on every rank of the launcher.

epochs mode  Recall/NDCG@5,10 of the model and of most-popular on the leave-one-out "test"
             (or "valid") targets, full catalog, history excluded: what `EpochTrainer.run`
             reports for its best checkpoint, for any checkpoint (a run stopped by hand,
             an earlier epoch).
stream mode  per window of `data.windows` (default: every prepared window) the progressive
             HR@10/NDCG@10 and most-popular's, with the checkpoint's weights and counts
             frozen: held-out later windows, or a window scored again by a newer model.
             `trainer.eval_batches` bounds the batches per rank and window as in training.

The checkpoint defaults to the newest one in `trainer.run_dir` (in epochs mode that is the
best on validation: only improvements are saved). run_dir's metrics files are left alone;
rank 0 writes the result as JSON to `out`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from genrec.config import Config
from genrec.trainer import checkpoint as ckpt
from genrec.trainer.distributed import DistContext


def resolve_checkpoint(cfg: Config, checkpoint: str | None) -> Path:
    if checkpoint:
        path = Path(checkpoint)
        if not (path / ckpt.STATE_FILE).is_file():
            raise FileNotFoundError(
                f"{path} is not a genrec checkpoint (no {ckpt.STATE_FILE}); pass a "
                f"directory {ckpt.PREFIX}NNNNNNNN under a run's checkpoints"
            )
        return path
    latest = ckpt.latest_checkpoint(Path(cfg.trainer.run_dir))
    if latest is None:
        raise FileNotFoundError(
            f"{cfg.trainer.run_dir} holds no checkpoint: train first, point "
            "trainer.run_dir at a run, or pass --checkpoint"
        )
    return latest


def run_evaluation(cfg: Config, ctx: DistContext, checkpoint: str, split: str, out: str) -> dict:
    """The worker side: restore `checkpoint`, score, and (rank 0) write `out`."""
    from genrec.trainer.epochs import EpochTrainer
    from genrec.trainer.loop import StreamTrainer

    t0 = time.time()
    epochs = cfg.trainer.mode == "epochs"
    trainer = (EpochTrainer if epochs else StreamTrainer)(cfg, ctx, log_metrics=False)
    trainer.restore(Path(checkpoint))
    result: dict = {
        "checkpoint": str(checkpoint),
        "step": trainer.step,
        "mode": cfg.trainer.mode,
        "world_size": ctx.world_size,
    }
    if epochs:
        result["split"] = split
        result.update({f"{split}/{k}": v for k, v in trainer.score_split(split).items()})
    else:
        result["windows"] = trainer.score_windows()
    result["seconds"] = time.time() - t0
    if ctx.is_main:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    return result
