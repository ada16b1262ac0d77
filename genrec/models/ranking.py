"""Generative ranking: target-aware multi-task scoring of candidates after the history.

A batch's last num_targets[b] events are sequence b's candidates. They are appended after
the history as item tokens whose action is hidden (tokens.py), and the attention op runs in
target-aware mode (num_targets): each candidate sees the history and itself, never another
candidate, so one forward scores all candidates of a user independently. With
ranking.causal (interleave tokens: item, then action) training instead reads every target
event's ITEM token in the ordinary causal sequence: it sees all earlier events with their
actions and its own item, not its own action (HSTU's setting). Serving a single next event
is the same computation either way (the exported ranker appends candidates after the
history), so both train the same exported program. A small MLP on
each candidate's output gives one logit per task (model.ranking.tasks).

Labels come from the candidate's action code (data_pipeline.schemas.ACTIONS), with the
purchase funnel implied: "click" is any of click/cart/order, "cart" is cart or order,
"order" is order; any other action name is an exact match. A regression task (listed in
ranking.regression_tasks, e.g. watch_time) reads its target from the batch feature of the
same name (values cast to float) and trains with MSE; the others with BCE. Task losses are
summed with ranking.task_weights (default all 1).

Positives and negatives per source (the action codes the sources write; a negative is an
event the user was shown and did not act on in the task's way, never a sampled item):
  T-ECD      tasks click / cart / order from action_type; the funnel above, so a view is a
             negative of all three and a click a negative of cart and order;
  Yambda     tasks view (a listen of >= 30 % of the track), like, skip (a dislike or a
             listen under 30 %); a listen is a negative of like, a like of skip, etc.;
  VK-LSVD    like (like or bookmark), share, click (author click or comments), skip
             (dislike), and watch_time (regression on the `watch_time` context column):
             every shown video without the flag is its negative;
  MovieLens  like = rating >= 4; a rating below 4 (action view) is the negative.
In stream mode a window's events are the candidates and earlier windows the history; in
epochs mode each epoch cuts every training sequence at a random point (trainer/epochs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genrec.config import Config, ModelConfig
from genrec.data_pipeline.batch import ITEM_KEY, Batch, StepBatch
from genrec.data_pipeline.model_inputs import ModelInputs
from genrec.data_pipeline.schemas import ACTIONS
from genrec.embeddings.tables import SparseEmbeddings
from genrec.models.hstu import HSTUEncoder
from genrec.models.losses import multitask_loss
from genrec.models.retrieval import lookup_kjt, sharded_lookups, step_rows
from genrec.models.tokens import TokenBuilder

FUNNEL = {
    "click": ("click", "cart", "order"),
    "cart": ("cart", "order"),
    "order": ("order",),
}


@dataclass
class RankingOutput:
    loss: torch.Tensor  # scalar: weighted sum of per-task mean losses
    num_targets: int  # candidates scored
    logits: torch.Tensor  # [P, K] (raw predictions for regression tasks)
    labels: torch.Tensor  # [P, K]
    task_losses: dict[str, torch.Tensor]  # detached, where computed (reading one syncs)


def candidate_events(batch: Batch, num: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat index of every candidate event, its sequence row); `num`: how many there are,
    when known (no device read)."""
    lengths = batch.lengths.to(torch.int64)
    nt = batch.num_targets.to(torch.int64)
    ends = torch.cumsum(lengths, 0)
    num = int(nt.sum()) if num is None else num
    rows = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=lengths.device), nt, output_size=num
    )
    within = torch.arange(num, device=lengths.device) - torch.repeat_interleave(
        nt.cumsum(0) - nt, nt, output_size=num
    )
    return (ends - nt)[rows] + within, rows


class HSTURanking(nn.Module):
    def __init__(self, cfg: Config, inputs: ModelInputs | None = None) -> None:
        super().__init__()
        rc = cfg.model.ranking
        self.cfg = cfg
        self.tasks = list(rc.tasks)
        if not self.tasks:
            raise ValueError("model.ranking.tasks is empty: list at least one task")
        for t in rc.regression_tasks:
            if t not in self.tasks:
                raise ValueError(f"model.ranking.regression_tasks has {t!r}, not in tasks")
        for t in self.tasks:
            if t not in rc.regression_tasks and t not in ACTIONS:
                raise ValueError(
                    f"model.ranking.tasks: {t!r} is neither an action ({sorted(ACTIONS)}) "
                    "nor listed in ranking.regression_tasks"
                )
        if rc.task_weights and len(rc.task_weights) != len(self.tasks):
            raise ValueError(
                f"model.ranking.task_weights has {len(rc.task_weights)} entries for "
                f"{len(self.tasks)} tasks; give one weight per task or none"
            )
        if rc.causal and cfg.model.token_mode != "interleave":
            raise ValueError(
                "model.ranking.causal=true needs model.token_mode=interleave: in sum mode an "
                "event's token carries its own action, the label"
            )
        self.causal = rc.causal
        self.weights = list(rc.task_weights) or [1.0] * len(self.tasks)
        self.regression = [t in rc.regression_tasks for t in self.tasks]
        vocabularies = inputs.vocabularies if inputs is not None else None
        self.sparse = SparseEmbeddings.from_config(cfg, vocabularies=vocabularies)
        self.features = [ITEM_KEY, *cfg.model.user_feature_tokens]
        context_dims = {f: self.sparse.feature_dim(f) for f in cfg.model.user_feature_tokens}
        self.tokens = TokenBuilder(cfg.model, self.sparse.feature_dim(ITEM_KEY), context_dims)
        self.encoder = self.make_encoder(cfg.model)
        d = cfg.model.dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, len(self.tasks)))

    def make_encoder(self, cfg: ModelConfig) -> nn.Module:
        return HSTUEncoder(cfg)

    def labels(self, batch: Batch, cand: torch.Tensor) -> torch.Tensor:
        """[P, K] float labels of the candidates (see module docstring)."""
        actions = batch.actions[cand].to(torch.int64)
        cols = []
        for task, is_reg in zip(self.tasks, self.regression):
            if is_reg:
                if task not in batch.features.keys():
                    raise ValueError(
                        f"regression task {task!r} needs a batch feature named {task!r} "
                        f"(batch has {batch.features.keys()})"
                    )
                cols.append(batch.features[task].values()[cand].to(torch.float32))
            else:
                codes = torch.tensor([ACTIONS[a] for a in FUNNEL.get(task, (task,))])
                cols.append(torch.isin(actions, codes.to(actions.device)).to(torch.float32))
        return torch.stack(cols, dim=1)

    def prepare(self, batch: Batch) -> StepBatch:
        """The step's input: the sequences' lookup KJT hashed into table rows, split by
        collection; on the batch's device (the trainer: on the host, before the copy)."""
        none = batch.item_ids.new_zeros(0)
        groups = self.sparse.row_groups(lookup_kjt(batch, self.features, none))
        return StepBatch(
            batch=batch,
            ec_rows=groups.get("ec"),
            mc_rows=groups.get("mc"),
            dp_rows=groups.get("dp"),
            negatives=none,
            neg_log_q=none.to(torch.float32),
            num_events=int(batch.item_ids.numel()),
            num_targets=int(batch.num_targets.sum()),
            tokens=self.tokens.sizes(
                batch.actions, batch.lengths, batch.num_targets, candidates=not self.causal
            ),
        )

    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [P, K], flat candidate event index [P], sequence row [P])."""
        step = self.prepare(batch)
        return self._predict(step, *sharded_lookups(self.sparse, step))

    def _predict(self, step: StepBatch, ec_out, mc_out):
        batch = step.batch
        item_rows, _, context = step_rows(self.sparse, self.features, step, ec_out, mc_out)
        tok = self.tokens.for_step(item_rows, step, context, candidates=not self.causal)
        h = self.encoder(tok.x, tok.offsets, max(tok.max_len, 1), tok.timestamps, tok.num_targets)
        cand, rows = candidate_events(batch, step.num_targets)
        # causal: the candidate's item token (its action token follows it, unseen by it)
        read = tok.state_index[cand] - (1 if self.causal else 0)
        logits = self.head(h[read])
        if cand.numel() == 0:  # keep every parameter in the graph
            logits = logits + 0.0 * h.sum()
        return logits, cand, rows

    def forward(self, batch: Batch | StepBatch) -> RankingOutput:
        """Multi-task loss over all candidates (the batch's target events). A `StepBatch` is
        the trainer's, `prepare`d on the host; this body is what TorchRec's train pipeline
        traces (the sharded collections called on its attributes; the rest, `_ranking_loss`,
        opaque to the trace)."""
        if isinstance(batch, Batch):  # eager callers: the step input is built here
            batch = self.prepare(batch)
        ec_out, mc_out = sharded_lookups(self.sparse, batch)
        return _ranking_loss(self, batch, ec_out, mc_out)

    def _loss(self, step: StepBatch, ec_out, mc_out) -> RankingOutput:
        logits, cand, _ = self._predict(step, ec_out, mc_out)
        labels = self.labels(step.batch, cand)
        if cand.numel() == 0:
            zero = logits.sum() * 0.0
            return RankingOutput(zero, 0, logits, labels, {t: zero for t in self.tasks})
        loss, per_task = multitask_loss(logits, labels, self.weights, self.regression)
        return RankingOutput(
            loss,
            int(cand.numel()),
            logits,
            labels,
            {t: v.detach() for t, v in zip(self.tasks, per_task)},
        )


def _ranking_loss(model: HSTURanking, step: StepBatch, ec_out, mc_out) -> RankingOutput:
    """The loss after the sharded lookups (a plain call outside TorchRec's trace)."""
    return model._loss(step, ec_out, mc_out)


torch.fx.wrap("_ranking_loss")
