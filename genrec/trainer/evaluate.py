"""`genrec evaluate`: score a checkpoint without training, on every rank of the launcher.

epochs mode  the task's metrics on the leave-one-out "test" (or "valid") targets (retrieval:
             recall/NDCG@5,10 of the model and most-popular, full catalog, history
             excluded; ranking: per task AUC/NE/calibration and the item rate's): what `EpochTrainer.run`
             reports for its best checkpoint, for any checkpoint (a run stopped by hand,
             an earlier epoch).
stream mode  per window of `data.windows` (default: every prepared window) the progressive
             metric (recall/NDCG@10 and most-popular's, or per task AUC/NE/calibration), with the checkpoint's weights and counts
             frozen: held-out later windows, or a window scored again by a newer model.
             `trainer.eval_batches` bounds the batches per rank and window as in training.

The checkpoint defaults to the newest one in `trainer.run_dir`, in epochs mode to the best
on validation that the newest one names. run_dir's metrics files are left alone;
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
    best = ckpt.read_state(latest).get("best_step", -1)  # epochs mode: the best on valid
    return ckpt.checkpoint_path(cfg.trainer.run_dir, best) if best >= 0 else latest


def run_evaluation(cfg: Config, ctx: DistContext, checkpoint: str, split: str, out: str) -> dict:
    """The worker side: restore `checkpoint`, score, and (rank 0) write `out`."""
    from genrec.trainer.loop import build_runner

    t0 = time.time()
    epochs = cfg.trainer.mode == "epochs"
    trainer = build_runner(cfg, ctx, log_metrics=False)
    trainer.restore(Path(checkpoint))
    result: dict = {
        "checkpoint": str(checkpoint),
        "step": trainer.step,
        "mode": cfg.trainer.mode,
        "world_size": ctx.world_size,
    }
    t_score = time.time()
    if epochs:
        result["split"] = split
        result.update({f"{split}/{k}": v for k, v in trainer.score_split(split).items()})
    else:
        result["windows"] = trainer.score_windows()
    result["score_seconds"] = time.time() - t_score  # the scoring alone, restore excluded
    result["seconds"] = time.time() - t0
    if ctx.is_main:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    return result


def describe_result(result: dict) -> list[str]:
    """Human lines of a `run_evaluation` result: one per window (stream mode), or the
    split's metrics next to their baseline (epochs mode), for retrieval or ranking."""
    from genrec.trainer.stream_runner import format_row
    from genrec.trainer.tasks import describe_ranking

    if "windows" in result:
        return [format_row(row) for row in result["windows"]]
    s = result["split"]
    if f"{s}/recall@10" not in result:
        return [f"{s}: {int(result[f'{s}/users'])} users  " + describe_ranking(result, f"{s}/")]
    return [
        f"{s}: {int(result[f'{s}/users'])} users  "
        + "  ".join(
            f"{m} {result[f'{s}/{m}']:.4f} (pop {result[f'{s}/most_popular/{m}']:.4f})"
            for m in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
        )
    ]
