"""TorchRec's train pipeline (`TrainPipelineSparseDist`) over the trainer's prepared steps.

A step is split in two (trainer.pipeline=sparse_dist):

  host    `TrainerCore.prepare_step(batch, step)`: the task's bookkeeping (item frequencies,
          popularity ring, baseline), negatives drawn with the step's generator
          (negatives.step_generator), the lookup KJT hashed into table rows: a `StepBatch`
          whose sharded collections' inputs are attributes (`ec_rows`, `mc_rows`)
  device  `model(step)`: the sharded lookups on those attributes, then the loss

What `TrainPipelineSparseDist.progress` (torchrec 1.8, train_pipelines.py) does for step i,
with batches i and i+1 in flight:

  1. zero_grad; wait for batch i's copy;
  2. start the input distribution (the ids' all-to-all, no weights read) of batch i+1;
  3. take batch i+2 from the iterator (our host `prepare_step`) and copy it to the device;
  4. forward of batch i: its sharded lookups read the tables NOW, i.e. after step i-1's
     fused sparse update (done inside step i-1's backward) and dense optimizer step;
  5. finish batch i+1's input distribution; backward of i (fused sparse update); optimizer.

So every lookup sees exactly the weights the plain loop's would, and the only work moved
ahead is host work that reads no weights (prepared in step order, so the task's state
evolves as in the plain loop) and the ids' all-to-all. The pipelined run equals the plain
loop step for step (tests/trainer/test_pipeline.py). The forward of step i is
`TrainerCore.pipelined_forward`: the step's learning rates and RNG seed, bf16 autocast,
then the model; the optimizer the pipeline steps clips dense gradients first
(`ClippedOptimizer`), as the plain step does.

Each call of `run_pipeline` is one segment: a fresh pipeline that fx-traces the model at its
first batch (finding the sharded modules fed by `step.<attr>`), runs the iterator dry (the
last batches drained with `execute_all_batches`) and detaches (the sharded modules get their
own forwards back, for evaluation and plain steps). Runners end a segment where the state
must be exact on every rank: a window end, a checkpoint, max_steps, an epoch end; nothing
is then in flight and nothing was prepared beyond the last trained step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.profiler import record_function
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist


class ClippedOptimizer:
    """What the pipeline steps: `core.optimizer_step` (dense gradients clipped, both
    optimizers stepped, gradients cleared). Its zero_grad also clears (set to None)."""

    def __init__(self, core) -> None:
        self.core = core

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.core.optimizer.zero_grad(set_to_none=True)

    def step(self, closure=None) -> None:
        self.core.optimizer_step()


def run_pipeline(core, steps: Iterable, on_step: Callable[[torch.Tensor, object], None]) -> None:
    """Train `core` on every StepBatch of `steps` through a TrainPipelineSparseDist;
    `on_step(detached loss, step)` after each optimizer step (the caller advances
    core.step there). Returns with nothing in flight and the model detached."""
    it = iter(steps)
    core.model.train()
    pipe = TrainPipelineSparseDist(
        core.model,
        ClippedOptimizer(core),
        core.ctx.device,
        execute_all_batches=True,
        custom_model_fwd=core.pipelined_forward,
    )
    try:
        while True:
            try:
                with record_function("genrec.train_step"):
                    loss, step = pipe.progress(it)
            except StopIteration:
                break
            on_step(loss, step)
    finally:
        pipe.detach()
