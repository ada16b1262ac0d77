"""The one-pass streaming runner: every window once, in time order, evaluated before learned.

Per step, on every rank: read the next batch of the stream (timing the wait), score it with
the current weights (the task's progressive metric, e.g. recall@10 against most-popular or
per-task AUC against the item rate), train on it, log, and checkpoint every
`trainer.checkpoint_every` steps. At each window end the per-window metrics are reduced
across ranks and logged, the task's running state is synced, and a checkpoint is written
with the stream position, so a resumed run continues exactly like an uninterrupted one.

With trainer.pipeline=sparse_dist, once a window's evaluated batches (trainer.eval_batches)
are done its remaining steps run through TorchRec's train pipeline (pipeline.py) in one
segment per window, cut at each checkpoint and at max_steps: a segment prepares only the
steps it trains and ends drained, so the saved position and task state are exact. The
first batch of the next window, read to see the window end, waits in `pending`.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import record_function

from genrec.data_pipeline.stream import StreamPosition, open_stream
from genrec.trainer import checkpoint as ckpt
from genrec.trainer.core import TrainerCore
from genrec.trainer.distributed import DistContext, all_reduce_
from genrec.trainer.progressive import WindowMetrics
from genrec.trainer.tasks import describe_ranking

EVAL_KS = (10,)


class StreamTrainer(TrainerCore):
    def __init__(self, cfg, ctx: DistContext, log_metrics: bool = True) -> None:
        super().__init__(cfg, ctx, log_metrics)
        self.position: StreamPosition | None = None

    def progress_state(self) -> dict:
        return {"position": self.position.to_dict() if self.position else None}

    def load_progress_state(self, state: dict) -> None:
        self.position = StreamPosition.from_dict(state["position"]) if state["position"] else None

    def window_metrics(self) -> WindowMetrics:
        return self.new_metrics(EVAL_KS, "model/", "positions")

    # ------------------------------------------------------------------ stages
    def _open_stream(self, position: StreamPosition | None):
        return open_stream(
            self.cfg.data,
            self.cfg.data.prepared_dir,
            self.ctx.rank,
            self.ctx.world_size,
            self.cfg.trainer.batch_size,
            self.cfg.model.max_len,
            position=position,
            windows=self.cfg.data.windows or None,
        )

    def read_batch(self, it) -> tuple:
        """(the stream's next batch on this rank or None at its end, seconds waited), after
        checking that every rank agrees on (has a batch, its window)."""
        with record_function("genrec.read_batch"):
            t0 = time.perf_counter()
            batch = next(it, None)
            t_input = time.perf_counter() - t0
            flag = torch.tensor(
                [0 if batch is None else 1, -1 if batch is None else int(batch.windows[0])]
            )
            lo = all_reduce_(flag.clone(), torch.distributed.ReduceOp.MIN)
            hi = all_reduce_(flag.clone(), torch.distributed.ReduceOp.MAX)
            if not torch.equal(lo, hi):
                raise RuntimeError(
                    f"rank {self.ctx.rank}: ranks disagree on the stream (has batch, window) "
                    f"min={lo.tolist()} max={hi.tolist()}; the stream must give every rank "
                    f"the same number of batches per window"
                )
            return batch, t_input

    def end_window(self, window: int, metrics: WindowMetrics, t_window: float) -> dict:
        self.check_replicas()
        self.task.sync()
        row = {"window": window, **metrics.reduce(), "seconds": time.time() - t_window}
        self.history.append(row)
        self.log("window", self.step, {k: v for k, v in row.items() if k != "window"}, window)
        return row

    def _should_evaluate(self, evaluated: int) -> bool:
        limit = self.cfg.trainer.eval_batches
        return limit == 0 or evaluated < limit

    # ------------------------------------------------------------------ loops
    def score_windows(self) -> list[dict]:
        """Frozen weights: the progressive metric of each streamed window (data.windows,
        default all) without training on it, up to trainer.eval_batches batches per rank
        and window (0: all). For held-out windows after a run, or any checkpoint."""
        stream = self._open_stream(None)  # from the first window's start, not the resume point
        it = iter(stream)
        rows: list[dict] = []
        window, metrics, evaluated, t_window = None, self.window_metrics(), 0, time.time()
        while True:
            batch, _ = self.read_batch(it)
            b_window = None if batch is None else int(batch.windows[0])
            if window is not None and b_window != window:
                row = {"window": window, **metrics.reduce(), "seconds": time.time() - t_window}
                rows.append({k: v for k, v in row.items() if k != "loss"})
                metrics, evaluated, t_window = self.window_metrics(), 0, time.time()
            if batch is None:
                break
            window = b_window
            if self._should_evaluate(evaluated):
                self.evaluate(batch.to(self.ctx.device), metrics.scores)
                evaluated += 1
        stream.close()
        return rows

    def _step_limit(self) -> int | None:
        """The step after which training must pause: the next checkpoint or max_steps."""
        t = self.cfg.trainer
        limits = [
            s
            for s in (
                t.max_steps,
                t.checkpoint_every and (self.step // t.checkpoint_every + 1) * t.checkpoint_every,
            )
            if s
        ]
        return min(limits) if limits else None

    def _segment(self, first: tuple, it, stream, window: int, pending: list):
        """Prepared steps from `first` (batch, input wait, position after it) on, while the
        batches are of `window` and the step limit is not reached. The first batch of the
        next window (or the stream's end) is left in `pending`, read but not prepared."""
        step, limit = self.step, self._step_limit()
        batch, t_input, position = first
        while True:
            yield self.prepare_step(batch, step, position=position, t_input=t_input)
            step += 1
            if limit is not None and step >= limit:
                return
            batch, t_input = self.read_batch(it)
            position = stream.position
            if batch is None or int(batch.windows[0]) != window:
                pending.append((batch, t_input, position))
                return

    def run(self, resume: bool = True, progress: bool = True) -> list[dict]:
        latest = ckpt.latest_checkpoint(self.run_dir) if resume else None
        if latest is not None:
            self.restore(latest)
        stream = self._open_stream(self.position)
        bar = None
        if progress and self.ctx.is_main:
            from tqdm import tqdm

            bar = tqdm(desc="train", unit="step", dynamic_ncols=True, initial=self.step)
        it = iter(stream)
        window, metrics, t_window, evaluated = None, self.window_metrics(), time.time(), 0
        every = self.cfg.trainer.checkpoint_every
        pending: list[tuple] = []  # a batch read but not trained: (batch, wait, position)
        while True:
            if pending:
                batch, t_input, position_after = pending.pop()
            else:
                batch, t_input = self.read_batch(it)
                position_after = stream.position
            b_window = None if batch is None else int(batch.windows[0])
            if window is not None and b_window != window:
                row = self.end_window(window, metrics, t_window)
                self.save()
                if bar is not None:
                    bar.write(format_row(row))
                metrics, t_window, evaluated = self.window_metrics(), time.time(), 0
            if batch is None or (
                self.cfg.trainer.max_steps and self.step >= self.cfg.trainer.max_steps
            ):
                break
            window = b_window
            if self.pipelined and not self._should_evaluate(evaluated):
                # the rest of the window (up to a checkpoint) through TorchRec's pipeline
                first = (batch, t_input, position_after)
                t_last = [time.perf_counter()]

                def on_step(loss, step, metrics=metrics, window=window, t_last=t_last):
                    metrics.add_loss(loss, float(step.num_targets))
                    now = time.perf_counter()
                    self._after_step(loss, step.batch, step.info, now - t_last[0], window, bar)
                    t_last[0] = now

                self.train_pipelined(self._segment(first, it, stream, window, pending), on_step)
            else:
                host = batch
                if self.ctx.device.type == "cuda":  # page-locked host copy: async H2D transfer
                    batch = batch.pin_memory()
                batch = batch.to(self.ctx.device, non_blocking=True)
                t1 = time.perf_counter()
                if self._should_evaluate(evaluated):
                    self.evaluate(batch, metrics.scores)
                    evaluated += 1
                loss = self.train_step(batch, metrics, host)
                info = {"position": position_after, "t_input": t_input}
                self._after_step(loss, batch, info, time.perf_counter() - t1 + t_input, window, bar)
            if every and self.step % every == 0 and self.step != self._saved_step:
                self.save()
        stream.close()
        if self.step != self._saved_step:  # stopped by max_steps: leave a checkpoint there
            self.save()
        self.wait_for_checkpoint()
        if bar is not None:
            bar.close()
        self.logger.close()
        return self.history

    def _after_step(self, loss, batch, info: dict, t_step: float, window: int, bar) -> None:
        """Count the step, move the resume position past its batch, log every log_every."""
        self.step += 1
        self.position = info["position"]
        # the only host sync of a step: the loss, every log_every steps
        log_now = self.step % self.cfg.trainer.log_every == 0
        if log_now:
            loss = float(loss)
        if self.ctx.is_main and log_now:
            n = self.ctx.world_size
            self.log(
                "step",
                self.step,
                {
                    "loss": loss,
                    "samples_per_s": batch.batch_size * n / t_step,
                    "tokens_per_s": batch.num_tokens * n / t_step,
                    "input_stall": info["t_input"] / t_step,
                },
                window,
            )
        if bar is not None:
            bar.update(1)
            if log_now:
                bar.set_postfix(window=window, loss=f"{loss:.3f}")


def format_row(row: dict) -> str:
    """One window's line (retrieval or ranking); rows scored without training
    (`score_windows`) have no loss."""
    head = f"window {row['window']:>5}  positions {int(row['positions']):>7}  "
    if "model/recall@10" in row:
        body = (
            f"R@10 {row['model/recall@10']:.4f} (pop {row['most_popular/recall@10']:.4f})  "
            f"N@10 {row['model/ndcg@10']:.4f} (pop {row['most_popular/ndcg@10']:.4f})"
        )
    else:
        body = describe_ranking(row, "model/")
    return head + body + (f"  loss {row['loss']:.3f}" if "loss" in row else "")
