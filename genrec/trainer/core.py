"""The trainer core: model, optimizers, task, step counter, checkpoints. No mode, no task.

`TrainerCore(cfg, ctx)` assembles the sharded model (assembly.py) and the task object for
model.task (tasks.py) and owns what every mode shares:

  train_step(batch, metrics)   one optimizer step on the task's loss; randomness is a pure
                               function of (seed, step, rank), so resumed == uninterrupted
  prepare_step / train_pipelined  the same steps through TorchRec's train pipeline
                               (trainer.pipeline; pipeline.py): the host half of each step
                               prepared ahead, the forward with the step's lr and seed
  evaluate(batch, scores)      the task scores a batch with the current weights (no grad)
  save() / restore(path)       model + optimizer (DCP, any world size), the task's host
                               tensors per rank, and the runner's progress (`progress_state`)
  init_from(path)              model weights only, from another run (warm start)
  check_replicas()             dense data-parallel replicas must agree across ranks

Runners (stream_runner.py: one time-ordered pass; epochs.py: leave-one-out epochs) subclass
it and add only their loop; `loop.run_worker` picks one by trainer.mode. Each stage of a step is a
method labelled with `torch.profiler.record_function`, so a profile reads like the code:
genrec.read_batch, genrec.evaluate, genrec.prepare_step, genrec.train_step, genrec.log,
genrec.checkpoint.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.profiler import record_function

from genrec.config import Config, to_dict
from genrec.data_pipeline.batch import StepBatch
from genrec.trainer import checkpoint as ckpt
from genrec.trainer.assembly import assemble
from genrec.trainer.distributed import DistContext, all_reduce_, checkpoint_group
from genrec.trainer.metrics_log import MetricsLogger
from genrec.trainer.negatives import step_generator
from genrec.trainer.pipeline import run_pipeline
from genrec.trainer.progressive import WindowMetrics
from genrec.trainer.tasks import build_task


def load_catalog(prepared_dir: str | Path) -> torch.Tensor:
    path = Path(prepared_dir) / "items.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run `genrec prepare` on the raw data first "
            f"(it writes the item catalog beside the sequence shards)"
        )
    ids = torch.as_tensor(pq.read_table(path, columns=["item_id"]).column(0).to_numpy().copy())
    return torch.sort(ids.to(torch.int64)).values


class TrainerCore:
    def __init__(self, cfg: Config, ctx: DistContext, log_metrics: bool = True) -> None:
        """`log_metrics=False`: leave run_dir's metrics files alone (evaluating a run)."""
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = Path(cfg.trainer.run_dir)
        self.catalog = load_catalog(cfg.data.prepared_dir)
        parts = assemble(cfg, ctx)
        self.model, self.optimizer = parts.model, parts.optimizer
        self.dense_optimizer, self.dense_params = parts.dense_optimizer, parts.dense_params
        self.task = build_task(cfg, self.model, self.catalog, ctx.device)
        self.step = 0
        self._saved_step = -1
        self._pending: ckpt.PendingCheckpoint | None = None
        self.history: list[dict] = []  # per-window / per-epoch rows
        self.logger = MetricsLogger(self.run_dir, enabled=ctx.is_main and log_metrics)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cfg.trainer.bf16 and ctx.device.type == "cuda"
            else nullcontext()
        )
        self._pipeline_off = self._pipeline_off_reason()
        if cfg.trainer.pipeline == "sparse_dist" and self._pipeline_off and ctx.is_main:
            print(f"trainer.pipeline: plain steps: {self._pipeline_off}", file=sys.stderr)

    def new_metrics(self, ks: tuple[int, ...], model_prefix: str, count_key: str):
        return WindowMetrics(self.task.new_metrics(ks, model_prefix, count_key))

    # ------------------------------------------------------------------ state
    def progress_state(self) -> dict:
        """The runner's position (stream offset, epoch, ...), saved in the checkpoint."""
        return {}

    def load_progress_state(self, state: dict) -> None:
        pass

    def protected_checkpoint(self) -> Path | None:
        """A checkpoint that pruning must keep (epochs mode: the best on validation)."""
        return None

    def _app_state(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def save(self) -> Path:
        """Checkpoint the current step. With trainer.async_checkpoint the model and optimizer
        are staged into host memory and written in the background; the checkpoint is
        finished (renamed into place) at the next save, restore or `wait_for_checkpoint`."""
        self.wait_for_checkpoint()  # one in flight at a time
        with record_function("genrec.checkpoint"):
            state = {
                "step": self.step,
                "world_size": self.ctx.world_size,
                "history": self.history,
                "config": to_dict(self.cfg),
                **self.progress_state(),
            }
            self._saved_step = self.step
            shared, own = self.task.state_tensors()
            self._pending = ckpt.save_checkpoint(
                self.run_dir,
                self.step,
                self._app_state(),
                state,
                own,
                shared=shared,  # equal on every rank: saved once
                keep_last=self.cfg.trainer.keep_last,
                protect=self.protected_checkpoint(),
                async_group=(checkpoint_group() or True)
                if self.cfg.trainer.async_checkpoint
                else False,
            )
            return self._pending.path

    def wait_for_checkpoint(self) -> None:
        """Finish the checkpoint in flight, if any (collective)."""
        if self._pending is not None:
            with record_function("genrec.checkpoint_wait"):
                self._pending.wait()
            self._pending = None

    def restore(self, path: Path) -> None:
        self.wait_for_checkpoint()
        app = self._app_state()
        ckpt.load_sharded(path, app)
        self.model.load_state_dict(app["model"])
        self.optimizer.load_state_dict(app["optim"])
        state = ckpt.read_state(path)
        self._restore_task_state(path, int(state["world_size"]))
        self.step = self._saved_step = int(state["step"])
        self.logger.resume_at(self.step)
        self.history = list(state.get("history", []))
        self.load_progress_state(state)

    def _restore_task_state(self, path: Path, saved_world: int) -> None:
        """Same world size: the shared state and this rank's own. Another world size: every
        old rank's own state, resharded exactly by the task (nothing lost or counted twice)."""
        shared = ckpt.read_shared_tensors(path)
        rank, world = self.ctx.rank, self.ctx.world_size
        if saved_world == world:
            self.task.load_state_tensors(shared, ckpt.read_tensors(path, rank))
        else:
            owns = [ckpt.read_tensors(path, r) for r in range(saved_world)]
            self.task.load_state_tensors(*self.task.reshard(shared, owns, world)[rank])

    def has_checkpoint(self) -> bool:
        return ckpt.latest_checkpoint(self.run_dir) is not None

    def init_from(self, path: Path) -> None:
        """Warm start: the model weights of checkpoint `path` (any world size, same model
        config); optimizer state, step, task state and progress start fresh."""
        if not (Path(path) / ckpt.STATE_FILE).is_file():
            raise FileNotFoundError(
                f"--init-from {path}: not a genrec checkpoint (no {ckpt.STATE_FILE}); pass a "
                f"directory {ckpt.PREFIX}NNNNNNNN under a run's checkpoints"
            )
        app = {"model": self.model.state_dict()}
        ckpt.load_sharded(path, app)
        self.model.load_state_dict(app["model"])

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def evaluate(self, batch, scores) -> None:
        """Score `batch` into `scores`, the task's accumulator (WindowMetrics.scores)."""
        with record_function("genrec.evaluate"):
            self.model.eval()
            with self.autocast:
                self.task.evaluate(batch, scores)

    def _set_learning_rates(self) -> None:
        """Both learning rates for this step: a pure function of the step (exact resume)."""
        t = self.cfg.trainer
        scale = min(1.0, (self.step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        for group in self.model.fused_optimizer.param_groups:
            group["lr"] = t.sparse_lr * scale
        # the fused kernels update inside backward with the rate they were last given;
        # TorchRec's fused optimizers hand param_groups' lr to them on zero_grad/step
        self.model.fused_optimizer.zero_grad()
        for group in self.dense_optimizer.param_groups:
            group["lr"] = t.lr * scale

    def _begin_step(self) -> None:
        """Learning rates and the global RNG (dropout, pool picks) for step `self.step`."""
        self.model.train()
        self._set_learning_rates()
        seed, rank = self.cfg.trainer.seed, self.ctx.rank
        torch.manual_seed(seed * 7919 + self.step * 131 + rank)

    def optimizer_step(self) -> None:
        """Clip the dense gradients (trainer.grad_clip), step both optimizers, clear grads."""
        if self.cfg.trainer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.cfg.trainer.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, batch, metrics: WindowMetrics, host_batch=None) -> torch.Tensor:
        """One optimizer step on `batch`; returns the loss (its mean over targets), detached
        and where it was computed: reading it is a host sync, left to the caller.
        `host_batch`: the same batch still on the host, for the task's host bookkeeping
        (no device-to-host copy of its ids); default `batch`."""
        with record_function("genrec.train_step"):
            self._begin_step()
            with self.autocast:
                rng = step_generator(self.cfg.trainer.seed, self.step, self.ctx.rank)
                loss, n = self.task.loss(batch, rng, host_batch)
            loss.backward()
            self.optimizer_step()
            loss = loss.detach()
            metrics.add_loss(loss, float(n))
            return loss

    # ------------------------------------------------------------------ pipeline
    @property
    def pipelined(self) -> bool:
        """trainer.pipeline is on and this run can take it (`_pipeline_off_reason`)."""
        return self.cfg.trainer.pipeline == "sparse_dist" and self._pipeline_off is None

    def _pipeline_off_reason(self) -> str | None:
        """Why trainer.pipeline=sparse_dist runs plain steps here (None: it does not)."""
        if not hasattr(self.task, "prepare"):
            return f"task {self.cfg.model.task!r} has no host prepare stage (tasks.py)"
        sparse = getattr(self.model.module, "sparse", None)
        if getattr(sparse, "mc_ec", None) is not None:
            # they train on GPU only (no CPU kernel), so no test runs them pipelined
            return "managed-collision tables are not pipelined (untested)"
        return None

    def prepare_step(self, host, step: int, **info) -> StepBatch:
        """The host half of step `step` (pipeline.py): the task's bookkeeping, negatives
        drawn with that step's generator, the lookup hashed. Call in step order."""
        with record_function("genrec.prepare_step"):
            rng = step_generator(self.cfg.trainer.seed, step, self.ctx.rank)
            prepared = self.task.prepare(host, rng)
            if self.ctx.device.type == "cuda":  # page-locked: the pipeline's copy is async
                prepared = prepared.pin_memory()
            prepared.step, prepared.info = step, info
            return prepared

    def pipelined_forward(self, step: StepBatch) -> tuple[torch.Tensor, tuple]:
        """The forward TorchRec's pipeline calls for `step` (the same as the plain step's):
        (loss, (detached loss, step))."""
        if step.step != self.step:
            raise RuntimeError(f"pipeline out of order: batch of step {step.step} at {self.step}")
        self._begin_step()
        with self.autocast:
            loss = self.model(step).loss
        return loss, (loss.detach(), step)

    def train_pipelined(self, steps, on_step) -> None:
        """Train on every StepBatch of the iterable `steps` through TorchRec's pipeline;
        `on_step(loss, step)` after each optimizer step. Returns with nothing in flight."""
        run_pipeline(self, steps, on_step)

    def log(self, kind: str, x: int, values: dict, window: int = -1) -> None:
        with record_function("genrec.log"):
            self.logger.log(kind, x, values, window)

    def check_replicas(self) -> None:
        """Dense parameters are data-parallel: every rank must hold the same values (summed on
        the device, compared on the host group: one readback per window)."""
        with torch.no_grad():
            total = torch.stack([p.detach().double().sum() for p in self.dense_params]).sum()
        total = total.cpu()
        lo = all_reduce_(total.clone(), dist.ReduceOp.MIN)
        hi = all_reduce_(total.clone(), dist.ReduceOp.MAX)
        if not torch.isclose(lo, hi, rtol=1e-9, atol=1e-9):
            raise RuntimeError(
                f"dense replicas diverged across ranks (param sums {float(lo)} vs {float(hi)}): "
                "gradients are not being averaged; check the data-parallel wrapper"
            )

    def write_summary(self, history: list[dict]) -> None:
        if self.ctx.is_main:
            (self.run_dir / "summary.json").write_text(
                json.dumps(
                    {"steps": self.step, "windows": history, "world_size": self.ctx.world_size},
                    indent=1,
                )
            )
