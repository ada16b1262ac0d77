"""Tasks: what the trainer core trains and scores, behind one interface.

The core (core.py) knows neither the mode nor the task; it calls a `Task`:

  loss(batch, rng, host)  the step's loss (a scalar with grad) and how many targets it
                          covers; a task keeps its own bookkeeping here (retrieval: item
                          frequencies for its negative sampler and baseline), from `host`
                          (the batch before its device copy; None: `batch`)
  prepare(host, rng)      optional, what TorchRec's train pipeline needs: the host half of
                          `loss` (bookkeeping, negatives, hashing) as a `StepBatch` whose
                          `model(step)` gives the loss; `loss` is then prepare + forward.
                          Tasks without it train with the plain step (trainer.pipeline ignored)
  new_metrics(...)        an accumulator of the task's progressive metrics
  evaluate(batch, m)      score `batch` with the current weights into `m` (before training)
  sync()                  fold the ranks' running state together (window / epoch end)
  state_tensors()         host state to checkpoint beside the model, as (shared, own):
                          `shared` is equal on every rank (saved once), `own` this rank's
                          (its deltas since the last sync); load_state_tensors(shared, own)
  reshard(shared, owns, world_size)  the (shared, own) of each of `world_size` new ranks
                          from every old rank's `own`: the global counts carried exactly
  selection_key           the validation metric epochs mode selects on (selection_sign)
  describe(row, prefix)   one short line of a metrics row, for progress output

`TASKS` maps model.task onto a class, as models/build.py maps it onto a model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch

from genrec.config import Config
from genrec.data_pipeline.batch import Batch, StepBatch
from genrec.embeddings.frequency import FrequencyState, PopularitySampler
from genrec.models.ranking import candidate_events
from genrec.models.retrieval import target_events
from genrec.trainer.distributed import host_group
from genrec.trainer.negatives import NegativeSampler
from genrec.trainer.progressive import (
    ItemRateBaseline,
    PopularityBaseline,
    RankingMetrics,
    TopKMetrics,
)
from genrec.trainer.sharded_eval import sharded_top_k

Tensors = dict[str, torch.Tensor]


class Task(Protocol):
    selection_key: str
    selection_sign: float  # +1: higher is better

    def loss(
        self, batch: Batch, rng: torch.Generator, host: Batch | None = None
    ) -> tuple[torch.Tensor, int]: ...
    def new_metrics(self, ks: tuple[int, ...], model_prefix: str, count_key: str): ...
    def evaluate(self, batch: Batch, metrics) -> None: ...
    def sync(self) -> None: ...
    def state_tensors(self) -> tuple[Tensors, Tensors]: ...
    def load_state_tensors(self, shared: Tensors, own: Tensors) -> None: ...
    def reshard(
        self, shared: Tensors, owns: list[Tensors], world_size: int
    ) -> list[tuple[Tensors, Tensors]]: ...
    def describe(self, row: dict, prefix: str = "") -> str: ...


def batch_target_mask(batch: Batch) -> torch.Tensor:
    """Bool mask over tokens: True for target events (each event counted once, as a target)."""
    lengths = batch.lengths.cpu()
    first = lengths - batch.num_targets.cpu()
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    local = torch.arange(int(lengths.sum())) - torch.repeat_interleave(offsets[:-1], lengths)
    return local >= torch.repeat_interleave(first, lengths)


class RetrievalTask:
    """Next-item retrieval: sampled (or full) softmax against the catalog; progressive
    recall/NDCG@K against most-popular. Owns its negative sampler's frequency state."""

    selection_key = "ndcg@10"
    selection_sign = 1.0

    def __init__(self, cfg: Config, model, catalog: torch.Tensor, device: torch.device) -> None:
        self.cfg, self.model, self.catalog, self.device = cfg, model, catalog, device
        self.rc = cfg.model.retrieval
        seed = cfg.trainer.seed
        # synced + this rank's delta, updated in place: no sketch-sized allocation per step
        self.frequency = FrequencyState(cfg.embeddings.frequency, seed=seed)
        self.popular = PopularitySampler(capacity=65536, seed=seed)
        self.baseline = PopularityBaseline(catalog)
        self.catalog_device: torch.Tensor | None = None
        # one negative per target position (SASRec's BCE) instead of a shared pool
        self.per_position = self.rc.loss == "bce" and self.rc.bce_negatives == "per_position"

    def _negatives(self, batch: Batch, rng: torch.Generator):
        if self.rc.full_softmax:  # exact softmax: the catalog is the set
            return self.catalog, torch.zeros(self.catalog.numel())
        sampler = NegativeSampler(self.rc, self.catalog, self.frequency, self.popular)
        num = int(target_events(batch)[0].numel()) if self.per_position else None
        return sampler.sample(rng, num)

    def prepare(self, host: Batch, rng: torch.Generator) -> StepBatch:
        """Host half of a step, in step order: count the batch's items (sampler and
        baseline; the baseline was scored on this batch before), draw the negatives, hash
        the lookup. Reads no device state, so it may run steps ahead of the forward."""
        host = _on_host(host)
        items = host.item_ids[batch_target_mask(host)]  # each event once, as a target
        self.frequency.add_(items)
        self.popular.add(items)
        negatives, neg_log_q = self._negatives(host, rng)
        self.baseline.update(items)
        return self.model.module.prepare(host, negatives, neg_log_q)

    def loss(
        self, batch: Batch, rng: torch.Generator, host: Batch | None = None
    ) -> tuple[torch.Tensor, int]:
        return _prepared_loss(self, batch, rng, host)

    def new_metrics(self, ks: tuple[int, ...], model_prefix: str, count_key: str):
        return TopKMetrics(ks, model_prefix, count_key)

    def evaluate(self, batch: Batch, metrics: TopKMetrics) -> None:
        k = max(metrics.ks)
        if self.catalog_device is None:  # copied once, not per eval step
            self.catalog_device = self.catalog.to(self.device)
        # each rank scores 1/W of the catalog; equal to model.top_k over all of it
        topk, _, targets = sharded_top_k(
            self.model.module, batch, self.catalog_device, k, self.rc.exclude_history
        )
        pop = self.baseline.top_k(
            batch.to("cpu"), k, self.rc.exclude_history, self.cfg.model.max_len
        )
        metrics.add(topk.cpu(), pop, targets.cpu())

    def sync(self) -> None:
        """Window end: fold the ranks' frequency deltas in (then decay) and the baseline's."""
        self.frequency.end_window_(host_group())  # the sketch lives on the host
        self.baseline.sync()

    def state_tensors(self) -> tuple[Tensors, Tensors]:
        freq = self.frequency.state_dict()
        shared = {
            **_flat("frequency.synced", freq["synced"]),
            "baseline.counts": self.baseline.counts,
        }
        own = {
            **_flat("frequency.delta", freq["delta"]),
            **_flat("popular", self.popular.state_dict()),
            "baseline.delta": self.baseline.delta,
        }
        return shared, own

    def load_state_tensors(self, shared: Tensors, own: Tensors) -> None:
        self.frequency.load_state_dict(
            {"synced": _part(shared, "frequency.synced"), "delta": _part(own, "frequency.delta")}
        )
        self.popular.load_state_dict(_part(own, "popular"))
        self.baseline.load(shared["baseline.counts"], own["baseline.delta"])

    def reshard(
        self, shared: Tensors, owns: list[Tensors], world_size: int
    ) -> list[tuple[Tensors, Tensors]]:
        """Frequencies and baseline counts: the global sums whole in every new rank's synced
        part, zero deltas (FrequencyState.reshard); the popularity ring of new rank r is old
        rank r mod W's (a sample of recent ids, not a count)."""
        synced = _part(shared, "frequency.synced")
        freq = FrequencyState.reshard(
            [{"synced": synced, "delta": _part(own, "frequency.delta")} for own in owns],
            world_size,
        )
        counts, zero = _resharded_counts(shared["baseline.counts"], owns, "baseline.delta")
        out = []
        for r, f in enumerate(freq):
            own = owns[r % len(owns)]
            new_shared = {**_flat("frequency.synced", f["synced"]), "baseline.counts": counts}
            new_own = {
                **_flat("frequency.delta", f["delta"]),
                **{k: v for k, v in own.items() if k.startswith("popular.")},
                "baseline.delta": zero,
            }
            out.append((new_shared, new_own))
        return out

    def describe(self, row: dict, prefix: str = "") -> str:
        return (
            f"R@10 {row[prefix + 'recall@10']:.4f}  N@10 {row[prefix + 'ndcg@10']:.4f}  "
            f"(most popular {row['most_popular/recall@10']:.4f})"
        )


class BaselineState:
    """sync / state / reshard of a task whose only host state is `self.baseline` (catalog
    counts: synced counts saved once, each rank's delta its own), saved under `state_key`."""

    state_key = "baseline"

    def sync(self) -> None:
        self.baseline.sync()

    def state_tensors(self) -> tuple[Tensors, Tensors]:
        k = self.state_key
        return {f"{k}.counts": self.baseline.counts}, {f"{k}.delta": self.baseline.delta}

    def load_state_tensors(self, shared: Tensors, own: Tensors) -> None:
        k = self.state_key
        self.baseline.load(shared[f"{k}.counts"], own[f"{k}.delta"])

    def reshard(
        self, shared: Tensors, owns: list[Tensors], world_size: int
    ) -> list[tuple[Tensors, Tensors]]:
        k = self.state_key
        counts, zero = _resharded_counts(shared[f"{k}.counts"], owns, f"{k}.delta")
        return [({f"{k}.counts": counts}, {f"{k}.delta": zero})] * world_size


class RankingTask(BaselineState):
    """Multi-task ranking of each sequence's candidates (its target events): BCE / MSE per
    task; progressive AUC, NE and calibration per task against the item-rate baseline."""

    state_key = "item_rate"

    def __init__(self, cfg: Config, model, catalog: torch.Tensor, device: torch.device) -> None:
        self.cfg, self.model, self.device = cfg, model, device
        rc = cfg.model.ranking
        self.tasks = list(rc.tasks)
        self.regression = [t in rc.regression_tasks for t in self.tasks]
        binary = [t for t, r in zip(self.tasks, self.regression) if not r]
        # the first binary task's AUC; with regression tasks only, the first one's MSE
        self.selection_key = f"{binary[0]}.auc" if binary else f"{self.tasks[0]}.mse"
        self.selection_sign = 1.0 if binary else -1.0
        self.baseline = ItemRateBaseline(catalog, len(self.tasks))

    def prepare(self, host: Batch, rng: torch.Generator) -> StepBatch:
        """Host half of a step: the item-rate baseline learns the candidates' labels (read
        from the host batch, no device readback), the lookup is hashed."""
        host = _on_host(host)
        module = self.model.module
        cand, _ = candidate_events(host)
        self.baseline.update(host.item_ids[cand], module.labels(host, cand))
        return module.prepare(host)

    def loss(
        self, batch: Batch, rng: torch.Generator, host: Batch | None = None
    ) -> tuple[torch.Tensor, int]:
        return _prepared_loss(self, batch, rng, host)

    def new_metrics(self, ks: tuple[int, ...], model_prefix: str, count_key: str):
        return RankingMetrics(self.tasks, self.regression, model_prefix, count_key)

    def evaluate(self, batch: Batch, metrics: RankingMetrics) -> None:
        module = self.model.module
        logits, cand, _ = module.predict(batch)
        labels = module.labels(batch, cand)
        metrics.add(logits.cpu(), labels.cpu(), self.baseline.rates(batch.item_ids[cand].cpu()))

    def describe(self, row: dict, prefix: str = "") -> str:
        return describe_ranking(row, prefix)


def describe_ranking(row: dict, prefix: str = "") -> str:
    """`task AUC x (item rate y)` for every task with an AUC in `row`; the model's keys
    start with `prefix` ("model/" in stream rows, "test/" in an evaluation, "" in epoch
    rows), the baseline's with the same prefix less "model/"."""
    root = prefix[: -len("model/")] if prefix.endswith("model/") else prefix
    parts = []
    for key in row:
        if key.startswith(prefix) and key.endswith(".auc") and "/" not in key[len(prefix) :]:
            task = key[len(prefix) : -len(".auc")]
            parts.append(
                f"{task} AUC {row[key]:.4f} (item rate {row[f'{root}item_rate/{task}.auc']:.4f})"
            )
    return "  ".join(parts)


def _on_host(batch: Batch) -> Batch:
    return batch if batch.item_ids.device.type == "cpu" else batch.to("cpu")


def _prepared_loss(task, batch: Batch, rng: torch.Generator, host: Batch | None):
    """The plain step's loss of a task with `prepare`: prepared from the host batch, the
    sequences already on the device (`batch`) reused."""
    step = replace(task.prepare(batch if host is None else host, rng), batch=batch)
    return task.model(step.to(task.device)).loss, step.num_targets


def _part(tensors: Tensors, prefix: str) -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _flat(prefix: str, state: dict) -> Tensors:
    return {f"{prefix}.{k}": torch.as_tensor(v) for k, v in state.items()}


def _resharded_counts(
    counts: torch.Tensor, owns: list[Tensors], delta_key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(synced counts + every old rank's delta, a zero delta): what the next sync would give."""
    total = counts.clone()
    for own in owns:
        total += own[delta_key]
    return total, torch.zeros_like(total)


TASKS = {"retrieval": RetrievalTask, "ranking": RankingTask}


def build_task(cfg: Config, model, catalog: torch.Tensor, device: torch.device) -> Task:
    """The task object for model.task around the (DMP-wrapped) model."""
    if cfg.model.task == "generative":  # its module imports this one: imported here
        from genrec.trainer.generative_task import GenerativeTask as task  # noqa: N813

        return task(cfg, model, catalog, device)
    return TASKS[cfg.model.task](cfg, model, catalog, device)
