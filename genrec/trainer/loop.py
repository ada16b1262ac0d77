"""The worker entry: `run_worker(cfg, ctx, resume)` runs the runner for trainer.mode.

Runners share one core (core.py) and one task interface (tasks.py); this module only maps
trainer.mode onto a runner, as models/build.py maps model.task onto a model:

  stream  StreamTrainer (stream_runner.py): one time-ordered pass, progressive metrics
  epochs  EpochTrainer (epochs.py): leave-one-out epochs with early stopping
"""

from __future__ import annotations

import sys
from pathlib import Path

from genrec.config import Config
from genrec.trainer.core import TrainerCore
from genrec.trainer.distributed import DistContext
from genrec.trainer.epochs import EpochTrainer
from genrec.trainer.host_memory import reuse_freed_host_memory
from genrec.trainer.stream_runner import StreamTrainer, format_row

__all__ = ["RUNNERS", "build_runner", "format_row", "run_worker"]

RUNNERS: dict[str, type[TrainerCore]] = {"stream": StreamTrainer, "epochs": EpochTrainer}


def build_runner(cfg: Config, ctx: DistContext, log_metrics: bool = True) -> TrainerCore:
    if cfg.trainer.mode not in RUNNERS:
        raise ValueError(f"trainer.mode={cfg.trainer.mode!r}: known {sorted(RUNNERS)}")
    return RUNNERS[cfg.trainer.mode](cfg, ctx, log_metrics=log_metrics)


def run_worker(cfg: Config, ctx: DistContext, resume: bool = True) -> list[dict]:
    if cfg.trainer.reuse_freed_host_memory:
        note = reuse_freed_host_memory()
        if ctx.is_main:  # stderr: stdout stays free for a caller's one JSON line
            print(note, file=sys.stderr, flush=True)
    trainer = build_runner(cfg, ctx)
    if cfg.trainer.init_from and not (resume and trainer.has_checkpoint()):
        trainer.init_from(Path(cfg.trainer.init_from))
    history = trainer.run(resume=resume)
    trainer.write_summary(history)
    return history
