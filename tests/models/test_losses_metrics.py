"""Sampled softmax with logQ correction and the offline metrics, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from genrec.models.losses import (
    bce_one_negative_loss,
    full_softmax_loss,
    in_batch_log_count,
    sampled_softmax_loss,
)
from genrec.models.metrics import (
    auc,
    calibration,
    normalized_entropy,
    ranks_from_topk,
    recall_ndcg_sums,
    task_metrics,
)

E10, E20, E30 = [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]
STATES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
POS_IDS = torch.tensor([10, 20, 20])
POS_EMB = torch.tensor([E10, E20, E20])
NEG_IDS = torch.tensor([30, 10])
NEG_EMB = torch.tensor([E30, E10])
NEG_LOG_Q = torch.tensor([math.log(0.1), math.log(0.2)])  # expected copies N*q = 0.2, 0.4


def loss(**kw):
    return float(
        sampled_softmax_loss(
            STATES, POS_EMB, POS_IDS, NEG_EMB, NEG_IDS, NEG_LOG_Q, temperature=0.5, **kw
        )
    )


def test_in_batch_log_count():
    torch.testing.assert_close(
        in_batch_log_count(torch.tensor([5, 5, 7])), torch.tensor([math.log(2), math.log(2), 0.0])
    )


def test_sampled_softmax_logq_hand_computed():
    e = math.exp
    # row 0 (target 10): positive 1/0.5; in-batch 20 twice: 0 - log 2 each; 30: 0.6/0.5 - log 0.2;
    # the sampled 10 is an accidental hit (masked)
    row0 = -2 + math.log(e(2) + 2 * 0.5 + 5 * e(1.2))
    # row 1 (target 20): in-batch 10: 0 - log 1; its own and row 2's 20 masked;
    # 30: 0.8/0.5 - log 0.2; 10: 0 - log 0.4
    row1 = -2 + math.log(e(2) + 1 + 5 * e(1.6) + 2.5)
    # row 2 (target 20, state [.6,.8]): positive .8/.5; in-batch 10: 1.2; 30: 1/.5 - log .2;
    # 10: 1.2 - log 0.4
    row2 = -1.6 + math.log(e(1.6) + e(1.2) + 5 * e(2) + 2.5 * e(1.2))
    assert loss() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-5)


def test_sampled_softmax_variants_hand_computed():
    e = math.exp
    no_inb = [
        -2 + math.log(e(2) + 5 * e(1.2)),
        -2 + math.log(e(2) + 5 * e(1.6) + 2.5),
        -1.6 + math.log(e(1.6) + 5 * e(2) + 2.5 * e(1.2)),
    ]
    assert loss(in_batch=False) == pytest.approx(sum(no_inb) / 3, rel=1e-5)
    no_q = [
        -2 + math.log(e(2) + 2 * e(0) + e(1.2)),
        -2 + math.log(e(2) + e(0) + e(1.6) + e(0)),
        -1.6 + math.log(e(1.6) + e(1.2) + e(2) + e(1.2)),
    ]
    assert loss(logq=False) == pytest.approx(sum(no_q) / 3, rel=1e-5)


def test_full_softmax_hand_computed():
    catalog = torch.tensor([E10, E20, E30])
    got = full_softmax_loss(STATES[:1], catalog, torch.tensor([0]), temperature=1.0)
    e = math.exp
    assert float(got) == pytest.approx(-1 + math.log(e(1) + e(0) + e(0.6)), rel=1e-6)


def test_bce_one_negative_hand_computed():
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    neg = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])  # row 1's negative is its own target
    got = bce_one_negative_loss(
        states, pos, neg, torch.tensor([4, 9]), torch.tensor([7, 9]), temperature=0.5
    )

    def sig(x):
        return 1 / (1 + math.exp(-x))

    # row 0: pos logit 0.6/0.5, neg logit -1/0.5; row 1: pos logit 2, its negative dropped
    want = (-math.log(sig(1.2)) - math.log(1 - sig(-2.0)) - math.log(sig(2.0))) / 2
    assert abs(float(got) - want) < 1e-6


def test_rank_metrics_hand_computed():
    topk = torch.tensor([[5, 3, 9], [1, 2, 3], [7, 8, 9]])
    targets = torch.tensor([3, 4, 7])
    ranks = ranks_from_topk(topk, targets)
    assert ranks.tolist() == [2.0, math.inf, 1.0]
    assert recall_ndcg_sums(topk, targets, 1) == pytest.approx((1.0, 1.0))
    assert recall_ndcg_sums(topk, targets, 3) == pytest.approx((2.0, 1 / math.log2(3) + 1))
    # rank 2, miss, rank 1 (the stream's progressive metric case)
    got = recall_ndcg_sums(
        torch.tensor([[5, 7, 9], [1, 2, 3], [4, 8, 6]]), targets.new_tensor([7, 9, 4]), 3
    )
    assert got == pytest.approx((2.0, 1 / math.log2(3) + 1.0))


def test_auc_and_ne_hand_computed():
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    # a tie between a positive and a negative counts one half
    assert auc(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 0])) == 0.75
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    # p = sigmoid([0, log 3]) = [0.5, 0.75], labels [1, 0]: log loss (log 2 + log 4)/2,
    # base rate 0.5 has entropy log 2
    ne = normalized_entropy(torch.tensor([0.0, math.log(3)]), torch.tensor([1.0, 0.0]))
    assert ne == pytest.approx(1.5, rel=1e-6)


def test_calibration_and_task_metrics_hand_computed():
    # p = [0.5, 0.75, 0.5], labels [1, 0, 0]: mean p 7/12 over rate 1/3
    logits = torch.tensor([0.0, math.log(3), 0.0])
    labels = torch.tensor([1.0, 0.0, 0.0])
    assert calibration(logits, labels) == pytest.approx((7 / 12) / (1 / 3))
    assert math.isnan(calibration(logits, torch.zeros(3)))
    m = task_metrics(logits, labels, regression=False)
    assert m["auc"] == pytest.approx(0.25)  # the positive ties one negative, loses to one
    assert set(m) == {"auc", "ne", "calibration"}
    mse = task_metrics(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]), regression=True)
    assert mse == {"mse": pytest.approx(2.5)}
