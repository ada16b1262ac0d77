"""The generative task (model.task=generative): semantic-ID generation, `tasks.Task`'s interface.

  loss       the model's teacher-forced code NLL (models/generative.py)
  evaluate   constrained beam search over the trie of the catalog's codes -> the top-k items
             of each target position (the user's history dropped when
             model.generative.exclude_history) -> the same `TopKMetrics` as retrieval, beside
             the most-popular baseline, so progressive / epochs metrics and
             benchmarks/quality.py read it unchanged. Every result is a catalog item by
             construction (the trie's leaves); each evaluated batch checks it and fails
             naming the item otherwise, so a finished run had an invalid-result rate of 0.
  state      the most-popular baseline's counts, as retrieval keeps them.

Beam search runs on each rank over its own target positions: the decoder is dense
(replicated), so no collective runs inside it; the one sparse lookup per eval batch (the
encoder's input) is the same collective as in training. Cost per position: L decoder
passes over beam_width rows, each scoring one level's codebook (Amazon: 4 levels x 20
beams x <= 256 codes), independent of the catalog size; the trie is built once per process
(T-ECD's 30M items x 4 levels: ~2 GB of host memory, see semantic/beam.py).
"""

from __future__ import annotations

import torch

from genrec.config import Config
from genrec.data_pipeline.batch import Batch
from genrec.models.generative import drop_history
from genrec.trainer.progressive import PopularityBaseline, TopKMetrics
from genrec.trainer.tasks import BaselineState, batch_target_mask


class GenerativeTask(BaselineState):
    selection_key = "ndcg@10"
    selection_sign = 1.0

    def __init__(self, cfg: Config, model, catalog: torch.Tensor, device: torch.device) -> None:
        self.cfg, self.model, self.catalog, self.device = cfg, model, catalog, device
        self.gcfg = cfg.model.generative
        self.baseline = PopularityBaseline(catalog)

    def loss(
        self, batch: Batch, rng: torch.Generator, host: Batch | None = None
    ) -> tuple[torch.Tensor, int]:
        host = batch if host is None else host
        items = host.item_ids.cpu()[batch_target_mask(host)]
        out = self.model(batch)
        self.baseline.update(items)  # scored before this batch, learns from it after
        return out.loss, out.num_targets

    def new_metrics(self, ks: tuple[int, ...], model_prefix: str, count_key: str):
        return TopKMetrics(ks, model_prefix, count_key)

    def evaluate(self, batch: Batch, metrics: TopKMetrics) -> None:
        k = max(metrics.ks)
        if self.gcfg.top_k < k:
            raise ValueError(
                f"model.generative.top_k={self.gcfg.top_k}: the metrics need the top {k}; "
                f"set top_k (and beam_width) >= {k}"
            )
        module = self.model.module
        items, _, targets, tgt, rows = module.generate(batch, self.gcfg.beam_width, self.gcfg.top_k)
        self.check_items(items)
        if self.gcfg.exclude_history:
            items = drop_history(batch, items, tgt, rows, k)
        pop = self.baseline.top_k(
            batch.to("cpu"), k, self.gcfg.exclude_history, self.cfg.model.max_len
        )
        metrics.add(items[:, :k], pop, targets)

    def check_items(self, items: torch.Tensor) -> None:
        """Every beam result is a catalog item (-1: fewer codes than top_k, a tiny catalog)."""
        real = items[items >= 0].cpu()
        bad = self.baseline.index(real) < 0  # the baseline's catalog rows: -1 outside
        if bool(bad.any()):
            raise RuntimeError(
                f"beam search returned {int(bad.sum())} items outside the catalog (first: "
                f"{int(real[bad][0])}): the codes file holds items the prepared data lacks; "
                "tokenize the prepared catalog (model.generative.codes)"
            )

    def describe(self, row: dict, prefix: str = "") -> str:
        return (
            f"R@10 {row[prefix + 'recall@10']:.4f}  N@10 {row[prefix + 'ndcg@10']:.4f}  "
            f"(most popular {row['most_popular/recall@10']:.4f}; beam search)"
        )
