"""The one-pass streaming loop: every window once, in time order, evaluated before learned.

Per step, on every rank: take the next batch of the stream (timing the wait), rank the full
catalog for its target positions with the current weights (progressive validation, plus
the most-popular baseline on the same positions), then draw negatives and train on it.
At each window end the per-window metrics are all-reduced and logged, frequency state is
synced across ranks, and a checkpoint is written. Randomness is a pure function of
(seed, step, rank), so a resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from genrec.config import Config, to_dict
from genrec.data_pipeline.schemas import META_FILE
from genrec.data_pipeline.stream import StreamPosition, open_stream
from genrec.embeddings.frequency import CountMinSketch, PopularitySampler
from genrec.models.retrieval import target_events
from genrec.trainer import checkpoint as ckpt
from genrec.trainer.assembly import assemble
from genrec.trainer.distributed import DistContext, all_reduce_
from genrec.trainer.host_memory import reuse_freed_host_memory
from genrec.trainer.metrics_log import MetricsLogger
from genrec.trainer.negatives import NegativeSampler, step_generator
from genrec.trainer.progressive import PopularityBaseline, WindowMetrics, hits_and_ndcg

EVAL_K = 10


def load_catalog(prepared_dir: str | Path) -> torch.Tensor:
    path = Path(prepared_dir) / "items.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run `genrec prepare` on the raw data first "
            f"(it writes the item catalog beside the sequence shards)"
        )
    ids = torch.as_tensor(pq.read_table(path, columns=["item_id"]).column(0).to_numpy().copy())
    return torch.sort(ids.to(torch.int64)).values


def read_meta(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {prepared_dir} is not a prepared directory")
    return json.loads(path.read_text())


class StreamTrainer:
    def __init__(self, cfg: Config, ctx: DistContext, log_metrics: bool = True) -> None:
        """`log_metrics=False`: leave run_dir's metrics files alone (evaluating a run)."""
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = Path(cfg.trainer.run_dir)
        self.catalog = load_catalog(cfg.data.prepared_dir)
        parts = assemble(cfg, ctx)
        self.model, self.optimizer = parts.model, parts.optimizer
        self.dense_optimizer, self.dense_params = parts.dense_optimizer, parts.dense_params
        fc = cfg.embeddings.frequency
        self.sketch = CountMinSketch(fc.depth, fc.width, conservative=False, seed=cfg.trainer.seed)
        self.sketch_delta = CountMinSketch(
            fc.depth, fc.width, conservative=False, seed=cfg.trainer.seed
        )
        self.popular = PopularitySampler(capacity=65536, seed=cfg.trainer.seed)
        self.baseline = PopularityBaseline(self.catalog)
        self.step = 0
        self._saved_step = -1
        self.position: StreamPosition | None = None
        self.history: list[dict] = []  # per-window rows, for the summary table
        self.logger = MetricsLogger(self.run_dir, enabled=ctx.is_main and log_metrics)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cfg.trainer.bf16 and ctx.device.type == "cuda"
            else nullcontext()
        )

    # ------------------------------------------------------------------ state
    def _app_state(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, obj in (
            ("sketch", self.sketch),
            ("sketch_delta", self.sketch_delta),
            ("popular", self.popular),
        ):
            out.update({f"{prefix}.{k}": torch.as_tensor(v) for k, v in obj.state_dict().items()})
        out["baseline.counts"] = self.baseline.counts
        out["baseline.delta"] = self.baseline.delta
        return out

    def save(self) -> Path:
        state = {
            "step": self.step,
            "position": self.position.to_dict() if self.position else None,
            "world_size": self.ctx.world_size,
            "history": self.history,
            "config": to_dict(self.cfg),
        }
        self._saved_step = self.step
        return ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            self._app_state(),
            state,
            self._tensors(),
            keep_last=self.cfg.trainer.keep_last,
        )

    def restore(self, path: Path) -> None:
        app = self._app_state()
        ckpt.load_sharded(path, app)
        self.model.load_state_dict(app["model"])
        self.optimizer.load_state_dict(app["optim"])
        state = ckpt.read_state(path)
        tensors = ckpt.read_tensors(path, self.ctx.rank, int(state["world_size"]))

        def part(prefix: str) -> dict:
            return {
                k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")
            }

        self.sketch.load_state_dict(part("sketch"))
        self.sketch_delta.load_state_dict(part("sketch_delta"))
        self.popular.load_state_dict(part("popular"))
        self.baseline.counts.copy_(tensors["baseline.counts"])
        self.baseline.delta.copy_(tensors["baseline.delta"])
        self.step = self._saved_step = int(state["step"])
        self.logger.resume_at(self.step)
        self.position = StreamPosition.from_dict(state["position"]) if state["position"] else None
        self.history = list(state.get("history", []))

    # ------------------------------------------------------------------ steps
    def _sync_frequencies(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.sketch_delta.all_reduce_()
        self.sketch.merge_(self.sketch_delta)
        self.sketch_delta.counters.zero_()
        self.sketch_delta.total.zero_()
        self.baseline.sync()

    @torch.no_grad()
    def evaluate(self, batch, metrics: WindowMetrics) -> None:
        self.model.eval()
        with self.autocast:
            topk, _, targets = self.model.module.top_k(
                batch,
                self.catalog.to(self.ctx.device),
                EVAL_K,
                exclude_history=self.cfg.model.retrieval.exclude_history,
            )
        hr, ndcg = hits_and_ndcg(topk.cpu(), targets.cpu())
        pop = self.baseline.top_k(
            batch.to("cpu"),
            EVAL_K,
            self.cfg.model.retrieval.exclude_history,
            self.cfg.model.max_len,
        )
        p_hr, p_ndcg = hits_and_ndcg(pop, targets.cpu())
        metrics.add(
            count=float(targets.numel()), model_hr=hr, model_ndcg=ndcg, pop_hr=p_hr, pop_ndcg=p_ndcg
        )

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

    def train_step(self, batch, metrics: WindowMetrics) -> float:
        self.model.train()
        self._set_learning_rates()
        torch.manual_seed(self.cfg.trainer.seed * 7919 + self.step * 131 + self.ctx.rank)
        items = batch.item_ids.cpu()[batch_target_mask(batch)]  # each event once, as a target
        self.sketch_delta.update(items)
        self.popular.add(items)
        if self.cfg.model.retrieval.full_softmax:  # exact softmax: the catalog is the set
            negatives, neg_log_q = self.catalog, torch.zeros(self.catalog.numel())
        else:
            rc = self.cfg.model.retrieval
            sampler = NegativeSampler(rc, self.catalog, self._merged_sketch(), self.popular)
            per_position = (
                self.cfg.model.task == "retrieval"
                and rc.loss == "bce"
                and rc.bce_negatives == "per_position"
            )
            negatives, neg_log_q = sampler.sample(
                step_generator(self.cfg.trainer.seed, self.step, self.ctx.rank),
                int(target_events(batch)[0].numel()) if per_position else None,
            )
        with self.autocast:
            out = self.model(batch, negatives.to(self.ctx.device), neg_log_q.to(self.ctx.device))
        out.loss.backward()
        if self.cfg.trainer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.cfg.trainer.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        n = float(out.num_targets)
        metrics.add(loss_sum=loss * n, loss_n=n)
        self.baseline.update(items)
        return loss

    def _merged_sketch(self) -> CountMinSketch:
        s = self.sketch
        merged = CountMinSketch(s.depth, s.width, conservative=False, seed=s.seed)
        return merged.merge_(s).merge_(self.sketch_delta)

    def check_replicas(self) -> None:
        """Dense parameters are data-parallel: every rank must hold the same values."""
        with torch.no_grad():
            total = torch.stack([p.detach().double().sum() for p in self.dense_params]).sum()
        lo = all_reduce_(total.clone().cpu(), dist.ReduceOp.MIN)
        hi = all_reduce_(total.clone().cpu(), dist.ReduceOp.MAX)
        if not torch.isclose(lo, hi, rtol=1e-9, atol=1e-9):
            raise RuntimeError(
                f"dense replicas diverged across ranks (param sums {float(lo)} vs {float(hi)}): "
                "gradients are not being averaged; check the data-parallel wrapper"
            )

    def _end_window(self, window: int, metrics: WindowMetrics, t_window: float) -> dict:
        self.check_replicas()
        self._sync_frequencies()
        row = {"window": window, **metrics.reduce(), "seconds": time.time() - t_window}
        self.history.append(row)
        self.logger.log(
            "window", self.step, {k: v for k, v in row.items() if k != "window"}, window
        )
        return row

    # ------------------------------------------------------------------ loop
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

    def _next_batch(self, it) -> tuple:
        """(the stream's next batch on this rank or None at its end, seconds waited), after
        checking that every rank agrees on (has a batch, its window)."""
        t0 = time.perf_counter()
        batch = next(it, None)
        t_input = time.perf_counter() - t0
        flag = torch.tensor(
            [0 if batch is None else 1, -1 if batch is None else int(batch.windows[0])]
        )
        lo, hi = (
            all_reduce_(flag.clone(), dist.ReduceOp.MIN),
            all_reduce_(flag.clone(), dist.ReduceOp.MAX),
        )
        if not torch.equal(lo, hi):
            raise RuntimeError(
                f"rank {self.ctx.rank}: ranks disagree on the stream (has batch, window) "
                f"min={lo.tolist()} max={hi.tolist()}; the stream must give every rank "
                f"the same number of batches per window"
            )
        return batch, t_input

    def score_windows(self) -> list[dict]:
        """Frozen weights: the progressive metric of each streamed window (data.windows,
        default all) without training on it, up to trainer.eval_batches batches per rank
        and window (0: all). For held-out windows after a run, or any checkpoint."""
        stream = self._open_stream(None)  # from the first window's start, not the resume point
        it = iter(stream)
        rows: list[dict] = []
        window, metrics, evaluated, t_window = None, WindowMetrics(), 0, time.time()
        limit = self.cfg.trainer.eval_batches
        while True:
            batch, _ = self._next_batch(it)
            b_window = None if batch is None else int(batch.windows[0])
            if window is not None and b_window != window:
                row = {"window": window, **metrics.reduce(), "seconds": time.time() - t_window}
                rows.append({k: v for k, v in row.items() if k != "loss"})
                metrics, evaluated, t_window = WindowMetrics(), 0, time.time()
            if batch is None:
                break
            window = b_window
            if limit == 0 or evaluated < limit:
                self.evaluate(batch.to(self.ctx.device), metrics)
                evaluated += 1
        stream.close()
        return rows

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
        window, metrics, t_window, evaluated = None, WindowMetrics(), time.time(), 0
        every = self.cfg.trainer.checkpoint_every
        while True:
            batch, t_input = self._next_batch(it)
            b_window = None if batch is None else int(batch.windows[0])
            if window is not None and b_window != window:
                row = self._end_window(window, metrics, t_window)
                self.save()
                if bar is not None:
                    bar.write(format_row(row))
                metrics, t_window, evaluated = WindowMetrics(), time.time(), 0
            if batch is None or (
                self.cfg.trainer.max_steps and self.step >= self.cfg.trainer.max_steps
            ):
                break
            window = b_window
            position_after = stream.position
            if self.ctx.device.type == "cuda":  # page-locked host copy: async H2D transfer
                batch = batch.pin_memory()
            batch = batch.to(self.ctx.device, non_blocking=True)
            t1 = time.perf_counter()
            limit = self.cfg.trainer.eval_batches
            if limit == 0 or evaluated < limit:
                self.evaluate(batch, metrics)
                evaluated += 1
            loss = self.train_step(batch, metrics)
            self.step += 1
            self.position = position_after
            t_step = time.perf_counter() - t1 + t_input
            if self.ctx.is_main and self.step % self.cfg.trainer.log_every == 0:
                self.logger.log(
                    "step",
                    self.step,
                    {
                        "loss": loss,
                        "samples_per_s": batch.batch_size * self.ctx.world_size / t_step,
                        "tokens_per_s": batch.num_tokens * self.ctx.world_size / t_step,
                        "input_stall": t_input / t_step,
                    },
                    window,
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(window=window, loss=f"{loss:.3f}")
            if every and self.step % every == 0:
                self.save()
        stream.close()
        if self.step != self._saved_step:  # stopped by max_steps: leave a checkpoint there
            self.save()
        if bar is not None:
            bar.close()
        self.logger.close()
        return self.history


def batch_target_mask(batch) -> torch.Tensor:
    """Bool mask over tokens: True for target events (each event counted once, as a target)."""
    lengths = batch.lengths.cpu()
    first = lengths - batch.num_targets.cpu()
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    local = torch.arange(int(lengths.sum())) - torch.repeat_interleave(offsets[:-1], lengths)
    return local >= torch.repeat_interleave(first, lengths)


def format_row(row: dict) -> str:
    """One window's line; rows scored without training (`score_windows`) have no loss."""
    return (
        f"window {row['window']:>5}  positions {int(row['positions']):>7}  "
        f"HR@10 {row['model/hr@10']:.4f} (pop {row['most_popular/hr@10']:.4f})  "
        f"NDCG@10 {row['model/ndcg@10']:.4f} (pop {row['most_popular/ndcg@10']:.4f})"
        + (f"  loss {row['loss']:.3f}" if "loss" in row else "")
    )


def run_worker(cfg: Config, ctx: DistContext, resume: bool = True) -> list[dict]:
    if cfg.trainer.reuse_freed_host_memory:
        note = reuse_freed_host_memory()
        if ctx.is_main:  # stderr: stdout stays free for a caller's one JSON line
            print(note, file=sys.stderr, flush=True)
    if cfg.trainer.mode == "epochs":
        from genrec.trainer.epochs import EpochTrainer

        trainer: StreamTrainer = EpochTrainer(cfg, ctx)
    else:
        trainer = StreamTrainer(cfg, ctx)
    history = trainer.run(resume=resume)
    if ctx.is_main:
        (Path(cfg.trainer.run_dir) / "summary.json").write_text(
            json.dumps(
                {"steps": trainer.step, "windows": history, "world_size": ctx.world_size}, indent=1
            )
        )
    return history
