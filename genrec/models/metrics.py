"""The metrics of genrec, one implementation each, used by every trainer mode and benchmark.

Retrieval (one target per position; rank r is 1-based, `inf` when the target is missing
from the top-K list): recall@K = [r <= K] (with one relevant item per position it is the
hit rate), NDCG@K = [r <= K] / log2(r + 1). `recall_ndcg_sums` returns SUMS over positions
so that windows, ranks and batches add them up before dividing once.

Ranking tasks, on logits and {0, 1} labels:
  AUC          probability that a random positive outscores a random negative (Mann-Whitney,
               ties count one half); nan when a class is empty;
  NE           normalized entropy: mean log loss of sigmoid(logit) / entropy of the base
               rate (< 1 beats always predicting the base rate);
  calibration  mean predicted probability / observed positive rate (1 is calibrated).
`auc`, `normalized_entropy` and `calibration` are exact (a sort per call). At scale a
window's scores are not gathered: `trainer.progressive.RankingMetrics` keeps additive sums
(NE, calibration) and a logit histogram per class, all-reduced once, and `binned_auc` reads
the AUC off the histogram: pairs in one bin count one half, so the error is at most half the
fraction of positive-negative pairs that share a bin (bins 32/16384 = 0.002 logits wide).
NE is torchrec.metrics' formula on the sums; AUC is not torchrec's `compute_auc`, which
ranks tied scores as if positives came first (scores [0.5, 0.5, 0.2], labels [1, 0, 0]:
1.0 instead of 0.75; all scores equal: 1.0 instead of 0.5) and gives 0.5 for a window with
one class: a baseline with many tied scores (every unseen item at the global rate) would
look better than it is.
"""

from __future__ import annotations

import math

import torch
from torchrec.metrics.ne import compute_ne


def ranks_from_topk(topk_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target in its row of a [P, K] id list; inf where absent."""
    match = topk_ids == targets[:, None]
    first = match.to(torch.int8).argmax(dim=1).to(torch.float64) + 1.0
    return torch.where(match.any(dim=1), first, torch.full_like(first, math.inf))


def recall_ndcg_sums(topk_ids: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[float, float]:
    """(sum of recall@k, sum of NDCG@k) over the rows of a [P, >= k] top-K id matrix."""
    r = ranks_from_topk(topk_ids[:, :k], targets)
    hit = r <= k
    gain = torch.where(hit, 1.0 / torch.log2(r.clamp_max(1e18) + 1.0), torch.zeros_like(r))
    return float(hit.sum()), float(gain.sum())


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability a random positive outscores a random negative (nan if a class is empty)."""
    s = scores.detach().to(torch.float64).flatten()
    y = labels.detach().flatten() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # average rank of each distinct score (ties share it)
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct value's first
    avg = first.to(torch.float64) + (counts.to(torch.float64) + 1.0) / 2.0
    u = float(avg[inverse][y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


AUC_BINS = 1 << 14  # logit-uniform histogram bins over [-AUC_RANGE, AUC_RANGE]
AUC_RANGE = 16.0


def score_bins(scores: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each logit (clamped into [-AUC_RANGE, AUC_RANGE])."""
    s = scores.detach().to(torch.float64).clamp(-AUC_RANGE, AUC_RANGE)
    b = ((s + AUC_RANGE) * (AUC_BINS / (2 * AUC_RANGE))).to(torch.int64)
    return b.clamp_max(AUC_BINS - 1)


def binned_auc(neg_hist: torch.Tensor, pos_hist: torch.Tensor) -> float:
    """AUC from per-bin negative and positive counts (bins in score order); pairs in one
    bin count one half, as tied scores do in `auc` (nan if a class is empty)."""
    neg, pos = neg_hist.to(torch.float64), pos_hist.to(torch.float64)
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    below = torch.cumsum(neg, 0) - neg
    return float((pos * (below + 0.5 * neg)).sum()) / (n_pos * n_neg)


def cross_entropy_bits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed BCE of sigmoid(logits) in bits (torchrec's NE numerator), float64."""
    x = logits.detach().to(torch.float64).flatten()
    y = labels.detach().to(torch.float64).flatten()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="sum")
    return ce / math.log(2)


def ne_from_sums(ce_bits: float, n: float, pos: float) -> float:
    """Normalized entropy from the additive sums (nan when a class is empty)."""
    if n == 0 or pos == 0 or pos == n:
        return math.nan
    v = torch.tensor([ce_bits, n, pos, n - pos], dtype=torch.float64)
    return float(compute_ne(v[0], v[1], v[2], v[3], eta=1e-12))


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean BCE of sigmoid(logits) divided by the entropy of the labels' base rate
    (torchrec.metrics.ne on the sums; nan when a class is empty)."""
    y = labels.detach().to(torch.float64).flatten()
    return ne_from_sums(float(cross_entropy_bits(logits, y)), float(y.numel()), float(y.sum()))


def calibration(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean predicted probability / observed positive rate (nan without positives)."""
    y = labels.detach().to(torch.float64).flatten()
    if not y.numel() or float(y.sum()) == 0.0:
        return math.nan
    return float(torch.sigmoid(logits.detach().to(torch.float64)).mean() / y.mean())


def task_metrics(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> dict[str, float]:
    """One task's metrics: auc, ne, calibration (binary) or mse (regression)."""
    if regression:
        mse = float(((logits.double() - labels.double()) ** 2).mean()) if labels.numel() else 0.0
        return {"mse": mse if labels.numel() else math.nan}
    return {
        "auc": auc(logits, labels),
        "ne": normalized_entropy(logits, labels),
        "calibration": calibration(logits, labels),
    }
