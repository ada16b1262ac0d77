"""Multi-epoch mode for the small public benchmarks: leave-one-out with early stopping.

Per user sequence (oldest first): the last event is the test target, the second-to-last the
validation target, everything before is training data (every position a target). Each
epoch trains on the training parts, then scores the validation targets against the full
catalog (history excluded); the best epoch by validation NDCG@10 is checkpointed, training
stops after `trainer.patience` validations without improvement, and the best checkpoint is
scored on the test targets. Model selection never looks at test. With trainer.eval_every=N
only every N-th epoch (and the last) is validated: for models that need hundreds of cheap
epochs, where scoring the full catalog would cost as much as training.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

from genrec.data_pipeline.batch import Batch, sequences_from_rows
from genrec.trainer import checkpoint as ckpt
from genrec.trainer.distributed import all_reduce_
from genrec.trainer.loop import StreamTrainer
from genrec.trainer.progressive import WindowMetrics, hits_and_ndcg

KS = (5, 10)


def read_user_sequences(prepared_dir: str | Path) -> pa.Table:
    """All rows of a prepared directory, one per user (windows concatenated in order)."""
    files = sorted(str(p) for p in Path(prepared_dir).glob("window=*/*.parquet"))
    if not files:
        raise FileNotFoundError(f"{prepared_dir} holds no window=*/part-*.parquet shards")
    table = ds.dataset(files, format="parquet").to_table(
        columns=["user_id", "window", "item_ids", "timestamps", "actions", "num_history"]
    )
    if table.num_rows != len(pc.unique(table.column("user_id"))):
        raise ValueError(
            f"{prepared_dir}: epochs mode expects one window per user (prepare the text or "
            f"recbole source with one window, e.g. --window 1000000000000)"
        )
    return table.sort_by("user_id")


def loo_view(table: pa.Table, split: str) -> pa.Table:
    """Rows cut for a split: train = all but the last two events (all targets);
    valid = all but the last, one target; test = everything, one target."""
    n = pc.list_value_length(table.column("item_ids")).to_numpy()
    keep = {"train": n - 2, "valid": n - 1, "test": n}[split]
    ok = keep >= 2  # at least one target with one event before it
    table, keep = table.filter(pa.array(ok)), keep[ok]
    cols = {
        c: table.column(c) if split == "test" else _cut(table.column(c), keep)
        for c in ("item_ids", "timestamps", "actions")
    }
    num_history = np.zeros_like(keep) if split == "train" else keep - 1
    return pa.table(
        {
            "user_id": table.column("user_id"),
            "window": table.column("window"),
            **cols,
            "num_history": pa.array(num_history.astype(np.int32)),
        }
    )


def _cut(col: pa.ChunkedArray, keep: np.ndarray) -> pa.Array:
    arr = col.combine_chunks()
    offs = arr.offsets.to_numpy()
    values = arr.flatten()
    new_offs = np.concatenate([[0], np.cumsum(keep)]).astype(np.int32)
    idx = (
        np.concatenate([np.arange(offs[i], offs[i] + keep[i]) for i in range(len(keep))])
        if len(keep)
        else np.zeros(0, np.int64)
    )
    return pa.ListArray.from_arrays(pa.array(new_offs), values.take(pa.array(idx)))


class EpochTrainer(StreamTrainer):
    def _rank_batches(self, table: pa.Table, shuffle_seed: int | None) -> list[Batch]:
        n = table.num_rows
        order = np.arange(n)
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(n)
        ws, bs, r = self.ctx.world_size, self.cfg.trainer.batch_size, self.ctx.rank
        steps = math.ceil(n / (ws * bs))
        out = []
        for s in range(steps):
            rows = order[s * ws * bs : (s + 1) * ws * bs][r::ws]
            if (
                rows.size == 0
            ):  # this rank ran short: a batch with no targets keeps collectives aligned
                rows, empty = order[:1], True
            else:
                empty = False
            b = sequences_from_rows(table.take(pa.array(rows)), self.cfg.model.max_len)
            if empty:
                b.num_targets.zero_()
            out.append(b)
        return out

    @torch.no_grad()
    def score(self, table: pa.Table) -> dict[str, float]:
        """Recall/NDCG@K of the model and of the most-popular baseline (training counts,
        the same history exclusion) on the one target of each row of `table`."""
        sums = torch.zeros(1 + 4 * len(KS), dtype=torch.float64)
        self.model.eval()
        exclude = self.cfg.model.retrieval.exclude_history
        for batch in self._rank_batches(table, None):
            batch = batch.to(self.ctx.device)
            topk, _, targets = self.model.module.top_k(
                batch, self.catalog.to(self.ctx.device), max(KS), exclude_history=exclude
            )
            topk, targets = topk.cpu(), targets.cpu()
            pop = self.baseline.top_k(batch.to("cpu"), max(KS), exclude, self.cfg.model.max_len)
            sums[0] += targets.numel()
            for i, k in enumerate(KS):
                for j, ranked in enumerate((topk, pop)):
                    hr, ndcg = hits_and_ndcg(ranked[:, :k], targets)
                    sums[1 + 4 * i + 2 * j] += hr
                    sums[2 + 4 * i + 2 * j] += ndcg
        all_reduce_(sums)
        n = max(float(sums[0]), 1.0)
        out = {"users": float(sums[0])}
        for i, k in enumerate(KS):
            for j, prefix in enumerate(("", "most_popular/")):
                out[f"{prefix}recall@{k}"] = float(sums[1 + 4 * i + 2 * j]) / n
                out[f"{prefix}ndcg@{k}"] = float(sums[2 + 4 * i + 2 * j]) / n
        return out

    def score_split(self, split: str) -> dict[str, float]:
        """`score` on the leave-one-out `split` ("valid" or "test") of the prepared data."""
        if split not in ("valid", "test"):
            raise ValueError(f"split {split!r}: epochs mode scores 'valid' or 'test'")
        return self.score(loo_view(read_user_sequences(self.cfg.data.prepared_dir), split))

    def run(self, resume: bool = False, progress: bool = True) -> list[dict]:
        t_start = time.time()
        if self.cfg.trainer.eval_every < 1:
            raise ValueError(f"trainer.eval_every={self.cfg.trainer.eval_every}: must be >= 1")
        table = read_user_sequences(self.cfg.data.prepared_dir)
        train, valid, test = (loo_view(table, s) for s in ("train", "valid", "test"))
        best, best_step, bad, history = -1.0, -1, 0, []
        for epoch in range(self.cfg.trainer.epochs):
            t0 = time.time()
            metrics_loss, n_loss = 0.0, 0.0
            wm = WindowMetrics()
            for batch in self._rank_batches(train, self.cfg.trainer.seed * 1000 + epoch):
                loss = self.train_step(batch.to(self.ctx.device), wm)
                self.step += 1
                metrics_loss, n_loss = metrics_loss + loss, n_loss + 1
            self.baseline.sync()  # fold this epoch's training counts in on every rank
            row = {"epoch": epoch, "loss": metrics_loss / max(n_loss, 1)}
            last = epoch == self.cfg.trainer.epochs - 1
            val = (
                self.score(valid)
                if (epoch + 1) % self.cfg.trainer.eval_every == 0 or last
                else None
            )
            row["seconds"] = time.time() - t0
            row.update({f"valid/{k}": v for k, v in (val or {}).items()})
            history.append(row)
            self.logger.log("epoch", epoch, {k: v for k, v in row.items() if k != "epoch"})
            if progress and self.ctx.is_main:
                msg = f"epoch {epoch:>3}  loss {row['loss']:.4f}"
                if val is not None:
                    msg += (
                        f"  valid R@10 {val['recall@10']:.4f}  N@10 {val['ndcg@10']:.4f}  "
                        f"(most popular {val['most_popular/recall@10']:.4f})"
                    )
                # stdout stays free for a caller's one JSON line
                print(f"{msg}  ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
            if val is None:  # not a validation epoch (trainer.eval_every)
                continue
            if val["ndcg@10"] > best:
                best, best_step, bad = val["ndcg@10"], self.step, 0
                self.history = history
                self.save()
            else:
                bad += 1
                if bad >= self.cfg.trainer.patience:
                    break
        best_path = ckpt.checkpoint_root(self.run_dir) / f"{ckpt.PREFIX}{best_step:08d}"
        self.restore(best_path)
        result = {
            "best_epoch_step": best_step,
            "valid": best,
            **{f"test/{k}": v for k, v in self.score(test).items()},
            "seconds": time.time() - t_start,  # training and scoring, start-up excluded
        }
        history.append(result)
        self.history = history
        self.logger.close()
        return history
