"""Offline metrics: ranking quality of top-K lists, and per-task classification quality.

Retrieval (one target per position; rank r is 1-based, `inf` when the target is missing
from the list):  HR@K = [r <= K],  NDCG@K = [r <= K] / log2(r + 1),  MRR = 1 / r (0 if
missing). Recall@K is per user with a set of relevant items: |top-K & relevant| / |relevant|.
Ranking tasks: AUC (Mann-Whitney, ties count half) and normalized entropy
NE = mean log loss / entropy of the base rate (< 1 beats predicting the base rate).
"""

from __future__ import annotations

import math

import torch


def ranks_from_topk(topk_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target in its row of a [P, K] id list; inf where absent."""
    match = topk_ids == targets[:, None]
    first = match.to(torch.int8).argmax(dim=1).to(torch.float64) + 1.0
    return torch.where(match.any(dim=1), first, torch.full_like(first, math.inf))


def hit_rate_at_k(ranks: torch.Tensor, k: int) -> float:
    return float((ranks <= k).to(torch.float64).mean()) if ranks.numel() else math.nan


def ndcg_at_k(ranks: torch.Tensor, k: int) -> float:
    if not ranks.numel():
        return math.nan
    r = ranks.to(torch.float64)
    gain = torch.where(r <= k, 1.0 / torch.log2(r.clamp_max(1e18) + 1.0), torch.zeros_like(r))
    return float(gain.mean())


def mrr(ranks: torch.Tensor) -> float:
    return float((1.0 / ranks.to(torch.float64)).mean()) if ranks.numel() else math.nan


def recall_at_k(topk_ids: torch.Tensor, relevant: list[torch.Tensor], k: int) -> float:
    """Mean over users of the share of their relevant items found in their top-K."""
    vals = []
    for row, rel in zip(topk_ids[:, :k], relevant):
        rel = torch.unique(rel)
        if rel.numel():
            vals.append(float(torch.isin(rel, row).sum()) / rel.numel())
    return sum(vals) / len(vals) if vals else math.nan


def retrieval_metrics(topk_ids: torch.Tensor, targets: torch.Tensor, ks=(1, 10, 50)) -> dict:
    ranks = ranks_from_topk(topk_ids, targets)
    out = {f"hr@{k}": hit_rate_at_k(ranks, k) for k in ks}
    out.update({f"ndcg@{k}": ndcg_at_k(ranks, k) for k in ks})
    out["mrr"] = mrr(ranks)
    return out


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability a random positive outscores a random negative (nan if a class is empty)."""
    s = scores.detach().to(torch.float64).flatten()
    y = labels.detach().flatten() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    # average the ranks of tied scores
    _, inverse, counts = torch.unique(sorted_s, return_inverse=True, return_counts=True)
    rank_sum = torch.zeros(counts.numel(), dtype=torch.float64).index_add(
        0, inverse, torch.arange(1, s.numel() + 1, dtype=torch.float64)
    )
    avg = rank_sum / counts
    ranks[order] = avg[inverse]
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean BCE of sigmoid(logits) divided by the entropy of the labels' base rate."""
    x = logits.detach().to(torch.float64).flatten()
    y = labels.detach().to(torch.float64).flatten()
    if not y.numel():
        return math.nan
    p = float(y.mean())
    if p <= 0.0 or p >= 1.0:
        return math.nan
    ll = torch.nn.functional.binary_cross_entropy_with_logits(x, y)
    base = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    return float(ll) / base


def ranking_metrics(
    logits: torch.Tensor, labels: torch.Tensor, tasks: list[str], regression: list[bool]
) -> dict[str, float]:
    """Per task: auc/ne for binary tasks, mse for regression tasks."""
    out = {}
    for k, (task, is_reg) in enumerate(zip(tasks, regression)):
        if is_reg:
            out[f"{task}/mse"] = float(((logits[:, k] - labels[:, k]) ** 2).mean())
        else:
            out[f"{task}/auc"] = auc(logits[:, k], labels[:, k])
            out[f"{task}/ne"] = normalized_entropy(logits[:, k], labels[:, k])
    return out
