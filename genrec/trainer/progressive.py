"""Progressive (out-of-sample) evaluation: baselines and the per-window metric sums.

Before a batch is trained on, the current model scores it; the sums accumulate per window
(or per split in epochs mode) and are reduced across ranks once, at the window's end:

  TopKMetrics     retrieval: recall@K / NDCG@K of the model's top-K over the full catalog
                  and of the most-popular baseline on the same positions (additive sums,
                  one all-reduce of a few floats);
  RankingMetrics  ranking: per task AUC / NE / calibration of the model and of the
                  item-positive-rate baseline. Exact (the window's scores gathered) while
                  every rank holds at most `exact_rows` candidates; past that, from sums
                  and a logit histogram all-reduced once (`models.metrics.binned_auc`): a
                  T-ECD day is ~1e9 candidates, which no rank could gather (rows report
                  `auc_binned` 1.0 then);
  WindowMetrics   either of them plus the mean training loss.

Baselines learn only from events already trained on (counts before this batch):
  PopularityBaseline  ranks items by past occurrence counts, the user's history excluded;
  ItemRateBaseline    scores a candidate by its item's past positive rate per task,
                      (positives + r) / (seen + 1) with r the global rate so far.
Both keep exact per-item counts over the catalog (T-ECD: 30M items x 8 B = 240 MB per
count column per rank) and fold the ranks' deltas together at window ends.
"""

from __future__ import annotations

import math

import torch

from genrec.data_pipeline.batch import Batch
from genrec.models.metrics import (
    AUC_BINS,
    binned_auc,
    cross_entropy_bits,
    ne_from_sums,
    recall_ndcg_sums,
    score_bins,
    task_metrics,
)
from genrec.models.retrieval import target_events
from genrec.trainer.distributed import all_gather_rows, all_reduce_


class _CatalogCounts:
    """Exact per-item count columns over a sorted catalog, with a per-rank delta."""

    def __init__(self, catalog: torch.Tensor, columns: int) -> None:
        self.catalog = catalog  # sorted raw ids
        self.counts = torch.zeros(catalog.numel(), columns, dtype=torch.float64)  # synced
        self.delta = torch.zeros_like(self.counts)  # this rank's counts since the last sync
        # column sums of counts + delta, kept as counts change: an eval step reads them
        # without a pass over the catalog (30M rows at T-ECD)
        self.totals = torch.zeros(columns, dtype=torch.float64)

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        """Catalog row of each id, -1 for ids outside the catalog."""
        if self.catalog.numel() == 0:
            return torch.full_like(ids, -1)
        idx = torch.searchsorted(self.catalog, ids).clamp_max(self.catalog.numel() - 1)
        return torch.where(self.catalog[idx] == ids, idx, torch.full_like(idx, -1))

    def add(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        idx = self.index(ids)
        keep = idx >= 0
        values = values[keep].to(torch.float64)
        self.delta.index_add_(0, idx[keep], values)
        self.totals += values.sum(dim=0)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """[n, columns] counts + delta of catalog rows `idx` (-1: zeros), read per row."""
        safe = idx.clamp_min(0)
        row = self.counts[safe] + self.delta[safe]
        return torch.where(idx[:, None] >= 0, row, torch.zeros_like(row))

    def load(self, counts: torch.Tensor, delta: torch.Tensor) -> None:
        """Restore synced counts and this rank's delta (a checkpoint or a reshard)."""
        self.counts.copy_(counts)
        self.delta.copy_(delta)
        self.totals = self.counts.sum(dim=0) + self.delta.sum(dim=0)

    def sync(self) -> None:
        """Fold every rank's counts into the shared ones (at window ends)."""
        self.counts += all_reduce_(self.delta.clone())
        self.delta.zero_()
        self.totals = self.counts.sum(dim=0)  # once per window, not per step


class PopularityBaseline(_CatalogCounts):
    """Exact running counts over the catalog; ranks by count with history excluded.

    An eval step needs only the top m = k (+ max_len with history excluded) items in the
    order (count descending, catalog row ascending). Those leaders are kept, not recomputed:
    counts only grow between syncs, so an item that is neither a leader nor updated since
    the last merge stays behind all m leaders, and the new leaders are the top m of
    (leaders + updated rows). An eval step merges the rows updated since the previous one
    (O(m + updated) instead of a sort of the catalog: 30M rows, 240 MB at T-ECD); a full
    pass happens once per window (sync / load replace the counts) or when the updates
    since the last merge outgrow a quarter of the catalog.
    """

    def __init__(self, catalog: torch.Tensor) -> None:
        super().__init__(catalog, 1)
        self._leaders: torch.Tensor | None = None  # catalog rows, in rank order
        self._pending: list[torch.Tensor] = []  # rows updated since the last merge
        self._pending_rows = 0

    def _invalidate(self) -> None:
        self._leaders, self._pending, self._pending_rows = None, [], 0

    def _ranked(self, rows: torch.Tensor, m: int) -> torch.Tensor:
        """The first m of `rows` (ascending, unique) by count descending, row ascending."""
        counts = self.rows(rows)[:, 0]
        order = torch.sort(counts, descending=True, stable=True).indices[:m]
        return rows[order]

    def leaders(self, m: int) -> torch.Tensor:
        """Catalog rows of the m most counted items (ties: lower catalog row first)."""
        m = min(m, self.catalog.numel())
        if self._leaders is None or self._leaders.numel() < m:
            self._leaders = self._ranked(torch.arange(self.catalog.numel()), m)
        elif self._pending:
            rows = torch.unique(torch.cat([self._leaders, *self._pending]))  # sorted
            self._leaders = self._ranked(rows, self._leaders.numel())
        self._pending, self._pending_rows = [], 0
        return self._leaders[:m]

    def top_k(self, batch: Batch, k: int, exclude_history: bool, max_len: int) -> torch.Tensor:
        pos, rows = target_events(batch)
        m = min(self.catalog.numel(), k + (max_len if exclude_history else 0))
        cand_ids = self.catalog[self.leaders(m)]
        if not exclude_history or pos.numel() == 0:
            return cand_ids[:k].expand(pos.numel(), -1)
        offsets = batch.offsets
        items = batch.item_ids
        starts = offsets[rows]
        hist_len = pos - starts
        width = int(hist_len.max()) if hist_len.numel() else 0
        ar = torch.arange(max(width, 1))
        idx = (starts[:, None] + ar[None, :]).clamp_max(max(items.numel() - 1, 0))
        hist = torch.where(ar[None, :] < hist_len[:, None], items[idx], torch.full_like(idx, -1))
        seen = (hist[:, :, None] == cand_ids[None, None, :]).any(dim=1)  # [P, m]
        order = torch.argsort(seen.to(torch.int8), dim=1, stable=True)[:, :k]
        return cand_ids[order]

    def update(self, ids: torch.Tensor) -> None:
        self.add(ids, torch.ones(ids.numel(), 1))
        if self._leaders is not None:
            idx = self.index(ids)
            idx = idx[idx >= 0]
            self._pending.append(idx)
            self._pending_rows += idx.numel()
            if self._pending_rows > max(4 * self._leaders.numel(), self.catalog.numel() // 4):
                self._invalidate()  # a full pass is cheaper than merging this many

    def load(self, counts: torch.Tensor, delta: torch.Tensor) -> None:
        super().load(counts, delta)
        self._invalidate()

    def sync(self) -> None:
        super().sync()
        self._invalidate()  # other ranks' counts arrived: one full pass at the next eval


class ItemRateBaseline(_CatalogCounts):
    """Per task, the candidate item's past positive rate (mean target for regression)."""

    def __init__(self, catalog: torch.Tensor, num_tasks: int) -> None:
        super().__init__(catalog, num_tasks + 1)  # column 0: times seen; then per task sums

    def rates(self, ids: torch.Tensor) -> torch.Tensor:
        """[P, T] smoothed past rates; an unseen item scores the global rate."""
        prior = self.totals[1:] / self.totals[0].clamp_min(1.0)
        row = self.rows(self.index(ids))
        return (row[:, 1:] + prior) / (row[:, :1] + 1.0)

    def update(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        ones = torch.ones(ids.numel(), 1, dtype=torch.float64)
        self.add(ids, torch.cat([ones, labels.to(torch.float64)], dim=1))


class TopKMetrics:
    """recall@K / NDCG@K sums of the model and most-popular, for each K in `ks`."""

    def __init__(self, ks: tuple[int, ...], model_prefix: str, count_key: str) -> None:
        self.ks, self.model_prefix, self.count_key = ks, model_prefix, count_key
        self.sums = torch.zeros(1 + 4 * len(ks), dtype=torch.float64)

    def add(self, model_topk: torch.Tensor, pop_topk: torch.Tensor, targets: torch.Tensor):
        self.sums[0] += targets.numel()
        for i, k in enumerate(self.ks):
            for j, ranked in enumerate((model_topk, pop_topk)):
                recall, ndcg = recall_ndcg_sums(ranked, targets, k)
                self.sums[1 + 4 * i + 2 * j] += recall
                self.sums[2 + 4 * i + 2 * j] += ndcg

    def reduce(self) -> dict[str, float]:
        s = all_reduce_(self.sums.clone())
        n = max(float(s[0]), 1.0)
        out = {self.count_key: float(s[0])}
        for i, k in enumerate(self.ks):
            for j, prefix in enumerate((self.model_prefix, "most_popular/")):
                out[f"{prefix}recall@{k}"] = float(s[1 + 4 * i + 2 * j]) / n
                out[f"{prefix}ndcg@{k}"] = float(s[2 + 4 * i + 2 * j]) / n
        return out


class RankingMetrics:
    """Per task metrics (models.metrics.task_metrics) of the model and of the item-rate
    baseline over every candidate added; keys `{prefix}{task}.{metric}`.

    Additive state kept for every candidate, per source (model, baseline) and task: n,
    positives (or the target sum), cross entropy in bits, predicted-probability sum, squared
    error, and a [2, AUC_BINS] histogram of logits by label (2 x 3 tasks x 256 KB). The
    candidates themselves are kept only up to `exact_rows` per rank; if any rank passed it,
    every rank reports the binned values (the same on all ranks, one all-reduce)."""

    SUMS = 5  # n, positives, ce bits, probability sum, squared error

    def __init__(
        self,
        tasks: list[str],
        regression: list[bool],
        model_prefix: str,
        count_key: str,
        exact_rows: int = 1 << 21,
    ) -> None:
        self.tasks, self.regression = tasks, regression
        self.model_prefix, self.count_key = model_prefix, count_key
        self.exact_rows = exact_rows
        t = len(tasks)
        self.sums = torch.zeros(2, t, self.SUMS, dtype=torch.float64)
        self.hist = torch.zeros(2, t, 2, AUC_BINS, dtype=torch.float64)  # [source, task, y]
        self.rows = 0
        self.parts: list[torch.Tensor] | None = []  # [P, 3T]: logits | labels | baseline

    def _logits(self, k: int, baseline: torch.Tensor) -> torch.Tensor:
        """The baseline predicts a rate: its logit is the rate's log-odds (regression: the
        rate itself)."""
        b = baseline[:, k].double()
        return b if self.regression[k] else torch.logit(b.clamp(1e-6, 1 - 1e-6))

    def add(self, logits: torch.Tensor, labels: torch.Tensor, baseline: torch.Tensor) -> None:
        logits, labels, baseline = logits.cpu(), labels.cpu(), baseline.cpu()
        self.rows += logits.shape[0]
        for k, reg in enumerate(self.regression):
            y = labels[:, k].double()
            for src, x in enumerate((logits[:, k].double(), self._logits(k, baseline))):
                s = self.sums[src, k]
                s[0] += y.numel()
                s[1] += y.sum()
                if reg:
                    s[4] += ((x - y) ** 2).sum()
                    continue
                s[2] += cross_entropy_bits(x, y)
                s[3] += torch.sigmoid(x).sum()
                self.hist[src, k].view(-1).index_add_(
                    0, (y > 0.5).long() * AUC_BINS + score_bins(x), torch.ones_like(x)
                )
        if self.parts is not None:
            self.parts.append(torch.cat([logits.float(), labels.float(), baseline.float()], 1))
            if self.rows > self.exact_rows:
                self.parts = None  # binned from here on: no rank gathers a window this size

    def reduce(self) -> dict[str, float]:
        flags = torch.tensor([float(self.parts is None)], dtype=torch.float64)
        flat = all_reduce_(torch.cat([self.sums.flatten(), self.hist.flatten(), flags]))
        if float(flat[-1]) == 0:
            return self._exact()
        t = len(self.tasks)
        sums = flat[: self.sums.numel()].view(2, t, self.SUMS)
        hist = flat[self.sums.numel() : -1].view(2, t, 2, AUC_BINS)
        out = {self.count_key: float(sums[0, 0, 0]) if t else 0.0, "auc_binned": 1.0}
        for k, (task, reg) in enumerate(zip(self.tasks, self.regression)):
            for src, prefix in enumerate((self.model_prefix, "item_rate/")):
                n, pos, ce, prob, sse = (float(v) for v in sums[src, k])
                if reg:
                    out[f"{prefix}{task}.mse"] = sse / n if n else math.nan
                    continue
                out[f"{prefix}{task}.auc"] = binned_auc(hist[src, k, 0], hist[src, k, 1])
                out[f"{prefix}{task}.ne"] = ne_from_sums(ce, n, pos)
                out[f"{prefix}{task}.calibration"] = prob / pos if pos else math.nan
        return out

    def _exact(self) -> dict[str, float]:
        t = len(self.tasks)
        local = torch.cat(self.parts) if self.parts else torch.zeros(0, 3 * t)
        rows = all_gather_rows(local)
        out = {self.count_key: float(rows.shape[0])}
        logits, labels, base = rows[:, :t], rows[:, t : 2 * t], rows[:, 2 * t :]
        for k, (task, reg) in enumerate(zip(self.tasks, self.regression)):
            for name, v in task_metrics(logits[:, k], labels[:, k], reg).items():
                out[f"{self.model_prefix}{task}.{name}"] = v
            for name, v in task_metrics(self._logits(k, base), labels[:, k], reg).items():
                out[f"item_rate/{task}.{name}"] = v
        return out


class WindowMetrics:
    """A task's evaluation metrics plus the mean training loss of one window or epoch.

    The loss sums stay where the loss is (the device): adding one is no host sync; they are
    read back once, by `loss` / `reduce`."""

    def __init__(self, scores: TopKMetrics | RankingMetrics) -> None:
        self.scores = scores
        self._loss: torch.Tensor | None = None  # sum of loss * n, n

    def add_loss(self, loss: torch.Tensor | float, n: float) -> None:
        loss = torch.as_tensor(loss).detach().to(torch.float64)
        if self._loss is None:
            self._loss = torch.zeros(2, dtype=torch.float64, device=loss.device)
        self._loss[0] += loss * n
        self._loss[1] += n

    @property
    def loss(self) -> torch.Tensor:
        """[sum of loss * n, n] on the host (one readback)."""
        return torch.zeros(2, dtype=torch.float64) if self._loss is None else self._loss.cpu()

    def reduce(self) -> dict[str, float]:
        out = self.scores.reduce()
        s = all_reduce_(self.loss)
        out["loss"] = float(s[0] / s[1]) if s[1] > 0 else math.nan
        return out
