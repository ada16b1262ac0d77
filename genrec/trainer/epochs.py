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
from genrec.trainer.core import TrainerCore

KS = (5, 10)
EPOCH_STATE = ("epoch", "best", "best_step", "bad")  # saved in every checkpoint


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


class EpochTrainer(TrainerCore):
    def __init__(self, cfg, ctx, log_metrics: bool = True) -> None:
        super().__init__(cfg, ctx, log_metrics)
        self.progress: dict = {"epoch": -1, "best": -math.inf, "best_step": -1, "bad": 0}

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
            # a rank that ran short gets a batch with no targets: collectives stay aligned
            empty = rows.size == 0
            if empty:
                rows = order[:1]
            b = sequences_from_rows(table.take(pa.array(rows)), self.cfg.model.max_len)
            if empty:
                b.num_targets.zero_()
            out.append(b)
        return out

    @torch.no_grad()
    def score(self, table: pa.Table) -> dict[str, float]:
        """The task's metrics (retrieval: recall/NDCG@K of the model and most-popular,
        full catalog, history excluded; ranking: per task AUC/NE/calibration of the model
        and the item rate) on the one target of each row of `table`."""
        metrics = self.task.new_metrics(KS, "", "users")
        for batch in self._rank_batches(table, None):
            self.evaluate(batch.to(self.ctx.device), metrics)
        return metrics.reduce()

    def score_split(self, split: str) -> dict[str, float]:
        """`score` on the leave-one-out `split` ("valid" or "test") of the prepared data."""
        if split not in ("valid", "test"):
            raise ValueError(f"split {split!r}: epochs mode scores 'valid' or 'test'")
        return self.score(loo_view(read_user_sequences(self.cfg.data.prepared_dir), split))

    def train_view(self, train: pa.Table, epoch: int) -> pa.Table:
        """Retrieval and causal ranking train on every position of the training part.
        Target-aware ranking's candidates see only the events before them that are not
        candidates: each epoch cuts every row at a random point (seeded by seed and epoch),
        the events after it are the candidates."""
        if self.cfg.model.task != "ranking" or self.cfg.model.ranking.causal:
            return train  # causal ranking predicts every event from the ones before it
        n = pc.list_value_length(train.column("item_ids")).to_numpy()
        rng = np.random.default_rng(self.cfg.trainer.seed * 1000 + epoch + 7)
        history = np.floor(rng.random(n.size) * (n - 1)).astype(np.int32) + 1
        return train.set_column(
            train.schema.get_field_index("num_history"), "num_history", pa.array(history)
        )

    def progress_state(self) -> dict:
        return dict(self.progress)

    def load_progress_state(self, state: dict) -> None:
        self.progress = {k: state[k] for k in EPOCH_STATE if k in state}

    def protected_checkpoint(self) -> Path | None:
        best = self.progress.get("best_step", -1)
        return ckpt.checkpoint_path(self.run_dir, best) if best >= 0 else None

    def _finished(self) -> bool:
        p, t = self.progress, self.cfg.trainer
        return p["epoch"] + 1 >= t.epochs or p["bad"] >= t.patience

    def run(self, resume: bool = True, progress: bool = True) -> list[dict]:
        """Epochs until trainer.epochs or trainer.patience validations without improvement,
        then the best checkpoint scored on test. Every epoch ends with a checkpoint (the
        best one is kept beside the last `keep_last`), so `resume` continues an interrupted
        run exactly where it stopped: same shuffles, same steps, same validations."""
        t_start = time.time()
        if self.cfg.trainer.eval_every < 1:
            raise ValueError(f"trainer.eval_every={self.cfg.trainer.eval_every}: must be >= 1")
        self.progress = {"epoch": -1, "best": -math.inf, "best_step": -1, "bad": 0}
        self.history = []
        latest = ckpt.latest_checkpoint(self.run_dir) if resume else None
        if latest is not None and "epoch" in ckpt.read_state(latest):
            self.restore(latest)
        table = read_user_sequences(self.cfg.data.prepared_dir)
        train, valid, test = (loo_view(table, s) for s in ("train", "valid", "test"))
        p = self.progress
        while not self._finished():
            self.run_epoch(p["epoch"] + 1, train, valid, progress)
        if p["best_step"] < 0:
            raise RuntimeError("no validation happened: set trainer.epochs >= 1")
        self.restore(ckpt.checkpoint_path(self.run_dir, p["best_step"]))
        result = {
            "best_epoch_step": p["best_step"],
            "valid": self.task.selection_sign * p["best"],
            **{f"test/{k}": v for k, v in self.score(test).items()},
            "seconds": time.time() - t_start,  # training and scoring, start-up excluded
        }
        self.history = [*self.history, result]
        self.wait_for_checkpoint()
        self.logger.close()
        return self.history

    def run_epoch(self, epoch: int, train: pa.Table, valid: pa.Table, progress: bool) -> None:
        """Train one epoch, validate it (every eval_every-th and the last), checkpoint."""
        t0, t = time.time(), self.cfg.trainer
        wm = self.new_metrics(KS, "", "users")
        batches = self._rank_batches(self.train_view(train, epoch), t.seed * 1000 + epoch)
        if self.pipelined:  # the whole epoch through TorchRec's pipeline, drained at its end
            first = self.step
            steps = (self.prepare_step(b, first + i) for i, b in enumerate(batches))

            def on_step(loss, step):
                wm.add_loss(loss, float(step.num_targets))
                self.step += 1

            self.train_pipelined(steps, on_step)
        else:
            for batch in batches:
                self.train_step(batch.to(self.ctx.device), wm, batch)
                self.step += 1
        self.task.sync()  # fold this epoch's training counts in on every rank
        s = wm.loss
        row = {"epoch": epoch, "loss": float(s[0] / s[1]) if s[1] > 0 else math.nan}
        validate = (epoch + 1) % t.eval_every == 0 or epoch == t.epochs - 1
        val = self.score(valid) if validate else None
        row["seconds"] = time.time() - t0
        row.update({f"valid/{k}": v for k, v in (val or {}).items()})
        self.log("epoch", epoch, {k: v for k, v in row.items() if k != "epoch"})
        if progress and self.ctx.is_main:
            msg = f"epoch {epoch:>3}  loss {row['loss']:.4f}"
            if val is not None:
                msg += "  valid " + self.task.describe(val)
            # stdout stays free for a caller's one JSON line
            print(f"{msg}  ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
        p = self.progress
        p["epoch"] = epoch
        self.history = [*self.history, row]
        if val is not None:
            score = self.task.selection_sign * val[self.task.selection_key]
            if score > p["best"]:
                p["best"], p["best_step"], p["bad"] = score, self.step, 0
            else:
                p["bad"] += 1
        self.save()
