"""Losses: next-item sampled softmax with logQ correction, full softmax, multi-task ranking.

Sampled softmax (one row per target position p, label = its next item y_p):

    columns   [ y_p ]  +  [ y_j for every position j of the batch ]  +  [ sampled n ]
    logit     cos/tau        cos/tau - log c(y_j)                         cos/tau - log(N q(n))

The correction is log of the candidate's expected number of copies in the candidate set
(importance sampling of the full softmax's partition sum):
- the positive is included exactly once, so it is not corrected;
- in-batch negatives are the batch's other targets, drawn from the data distribution, so
  their expected count is estimated by the batch itself: c(i) = how many positions of the
  batch have target i (Yi et al. 2019's streaming-frequency estimate, computed on the batch);
- sampled negatives come from the trainer's uniform+popularity mixture with per-draw
  probability q = exp(neg_log_q); N draws give N q expected copies.
Columns equal to the row's own target (accidental hits, including the in-batch diagonal)
are masked. With `logq=False` no column is corrected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_MASKED = -1e9


def in_batch_log_count(ids: torch.Tensor) -> torch.Tensor:
    """log of how many entries of `ids` equal each entry (float [P])."""
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return counts[inverse].to(torch.float32).log()


def sampled_softmax_loss(
    states: torch.Tensor,  # [P, D] L2-normalized user states
    pos_emb: torch.Tensor,  # [P, D] L2-normalized embeddings of each position's target
    pos_ids: torch.Tensor,  # [P] raw ids of the targets
    neg_emb: torch.Tensor,  # [N, D] L2-normalized sampled negatives
    neg_ids: torch.Tensor,  # [N]
    neg_log_q: torch.Tensor,  # [N] log per-draw sampling probability
    *,
    temperature: float,
    in_batch: bool = True,
    logq: bool = True,
) -> torch.Tensor:
    """Mean over positions of the sampled softmax cross-entropy (see module docstring)."""
    pos = (states * pos_emb).sum(-1, keepdim=True) / temperature
    cols = [pos]
    if in_batch:
        s = states @ pos_emb.T / temperature
        if logq:
            s = s - in_batch_log_count(pos_ids)[None, :]
        s = s.masked_fill(pos_ids[None, :] == pos_ids[:, None], _MASKED)
        cols.append(s)
    if neg_ids.numel():
        s = states @ neg_emb.T / temperature
        if logq:
            s = s - (neg_log_q.to(s.dtype) + math.log(neg_ids.numel()))[None, :]
        s = s.masked_fill(neg_ids[None, :] == pos_ids[:, None], _MASKED)
        cols.append(s)
    logits = torch.cat(cols, dim=1)
    labels = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    return F.cross_entropy(logits, labels)


def full_softmax_loss(
    states: torch.Tensor,  # [P, D]
    catalog_emb: torch.Tensor,  # [C, D]
    target_index: torch.Tensor,  # [P] row of each target in the catalog
    *,
    temperature: float,
) -> torch.Tensor:
    """Exact softmax over the whole catalog (small catalogs)."""
    # scale the [P, D] states, not the [P, C] logits: one pass less over the big matrix
    return F.cross_entropy((states / temperature) @ catalog_emb.T, target_index)


def bce_one_negative_loss(
    states: torch.Tensor,  # [P, D]
    pos_emb: torch.Tensor,  # [P, D] each position's target
    neg_emb: torch.Tensor,  # [P, D] one sampled item per position
    pos_ids: torch.Tensor,  # [P]
    neg_ids: torch.Tensor,  # [P]
    *,
    temperature: float,
) -> torch.Tensor:
    """SASRec's objective (Kang & McAuley 2018): -log s(pos) - log(1 - s(neg)) per position,
    mean over positions; a negative that equals the position's target is dropped."""
    pos = (states * pos_emb).sum(-1) / temperature
    neg = (states * neg_emb).sum(-1) / temperature
    keep = (neg_ids != pos_ids).to(neg.dtype)
    return (F.softplus(-pos) + keep * F.softplus(neg)).mean()


def multitask_loss(
    logits: torch.Tensor,  # [P, K]
    labels: torch.Tensor,  # [P, K] float
    weights: list[float],
    regression: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Weighted sum of per-task mean BCE-with-logits (or MSE for regression tasks)."""
    per_task = []
    for k, is_reg in enumerate(regression):
        if is_reg:
            per_task.append(F.mse_loss(logits[:, k], labels[:, k]))
        else:
            per_task.append(F.binary_cross_entropy_with_logits(logits[:, k], labels[:, k]))
    total = sum(w * loss for w, loss in zip(weights, per_task))
    return total, per_task
