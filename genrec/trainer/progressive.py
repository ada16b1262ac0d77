"""Progressive (out-of-sample) evaluation on a stream, and the most-popular baseline.

Before a batch is trained on, the current model ranks the full catalog for every target
position of the batch; HR@K and NDCG@K accumulate per window. The baseline on the same
positions ranks items by how often they occurred in the stream *before* this batch, with
the user's history excluded exactly as for the model. Sums are all-reduced at window end.
"""

from __future__ import annotations

import math

import torch

from genrec.data_pipeline.batch import Batch
from genrec.models.retrieval import target_events
from genrec.trainer.distributed import all_reduce_

FIELDS = ("count", "model_hr", "model_ndcg", "pop_hr", "pop_ndcg", "loss_sum", "loss_n")


def hits_and_ndcg(topk: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Sums of HR@K and NDCG@K over rows of a [P, K] top-K id matrix."""
    match = topk == targets[:, None]
    hit = match.any(dim=1)
    rank = match.float().argmax(dim=1)
    ndcg = torch.where(hit, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros_like(rank).float())
    return float(hit.sum()), float(ndcg.sum())


class PopularityBaseline:
    """Exact running counts over the catalog; ranks by count with history excluded."""

    def __init__(self, catalog: torch.Tensor) -> None:
        self.catalog = catalog  # sorted raw ids
        self.counts = torch.zeros(catalog.numel(), dtype=torch.float64)  # synced across ranks
        self.delta = torch.zeros_like(self.counts)  # this rank's counts since the last sync

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        idx = torch.searchsorted(self.catalog, ids).clamp_max(self.catalog.numel() - 1)
        return torch.where(self.catalog[idx] == ids, idx, torch.full_like(idx, -1))

    def top_k(self, batch: Batch, k: int, exclude_history: bool, max_len: int) -> torch.Tensor:
        pos, rows = target_events(batch)
        m = min(self.catalog.numel(), k + (max_len if exclude_history else 0))
        # ties broken by catalog order so the baseline is deterministic
        cand = torch.topk(self.counts + self.delta, m).indices
        cand_ids = self.catalog[cand]
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
        idx = self.index(ids)
        idx = idx[idx >= 0]
        self.delta.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))

    def sync(self) -> None:
        """Fold every rank's counts into the shared ones (at window ends)."""
        self.counts += all_reduce_(self.delta.clone())
        self.delta.zero_()


class WindowMetrics:
    """Per-window sums; `reduce()` all-reduces them and returns means."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(FIELDS), dtype=torch.float64)

    def add(self, **values: float) -> None:
        for name, v in values.items():
            self.sums[FIELDS.index(name)] += v

    def reduce(self) -> dict[str, float]:
        s = all_reduce_(self.sums.clone())
        d = dict(zip(FIELDS, s.tolist()))
        n = max(d["count"], 1.0)
        return {
            "positions": d["count"],
            "model/hr@10": d["model_hr"] / n,
            "model/ndcg@10": d["model_ndcg"] / n,
            "most_popular/hr@10": d["pop_hr"] / n,
            "most_popular/ndcg@10": d["pop_ndcg"] / n,
            "loss": d["loss_sum"] / max(d["loss_n"], 1.0) if d["loss_n"] else math.nan,
        }
