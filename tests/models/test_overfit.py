"""Small models learn a tiny deterministic data set: retrieval (HSTU and SASRec) and ranking."""

from __future__ import annotations

import math

import pytest
import torch

from genrec.data_pipeline.batch import make_batch
from genrec.models.build import build_model
from genrec.models.metrics import auc, recall_ndcg_sums
from tests.models.helpers import small_config

NUM_ITEMS = 30


def walk_batch(g: torch.Generator, users: int = 32, length: int = 10, targets: int = 4):
    """Each user walks the item ring: i, i+1, i+2, ... (mod NUM_ITEMS); random actions."""
    start = torch.randint(0, NUM_ITEMS, (users, 1), generator=g)
    items = (start + torch.arange(length)[None]) % NUM_ITEMS
    actions = torch.randint(0, 4, (users, length), generator=g)
    ts = torch.cumsum(torch.randint(1, 500, (users, length), generator=g), 1)
    return make_batch(
        items.flatten(),
        actions.flatten(),
        ts.flatten(),
        torch.full((users,), length),
        torch.full((users,), targets),
        torch.arange(users),
        torch.zeros(users),
        context={"category": items.flatten() % 5},
    )


@pytest.mark.parametrize("kind,mode", [("hstu", "sum"), ("hstu", "interleave"), ("sasrec", "sum")])
def test_retrieval_overfits_item_ring(kind, mode):
    torch.manual_seed(0)
    cfg = small_config(kind=kind, token_mode=mode)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    catalog = torch.arange(NUM_ITEMS)
    losses = []
    for _ in range(150):
        negatives = torch.randint(0, NUM_ITEMS, (32,), generator=g)
        out = model(walk_batch(g), negatives, torch.full((32,), -math.log(NUM_ITEMS)))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5, losses
    model.eval()
    ids, _, targets = model.top_k(walk_batch(g), catalog, 10, exclude_history=False, block=8)
    hr1 = recall_ndcg_sums(ids, targets, 1)[0] / targets.numel()
    assert hr1 > 0.9


def test_ranking_learns_action_labels_and_regression():
    torch.manual_seed(0)
    cfg = small_config(task="ranking")
    cfg.model.ranking.tasks = ["click", "order", "watch_time"]
    cfg.model.ranking.regression_tasks = ["watch_time"]
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)

    def batch():
        b = walk_batch(g)
        items = b.item_ids
        # click (funnel: click/cart/order) iff the item is even, order iff divisible by 4
        actions = torch.where(items % 4 == 0, 3, torch.where(items % 2 == 0, 1, 0))
        return make_batch(
            items,
            actions,
            b.timestamps,
            b.lengths,
            b.num_targets,
            b.user_ids,
            b.windows,
            context={"watch_time": items % 5},
        )

    first = None
    for _ in range(60):
        out = model(batch())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else float(out.loss.detach())
    assert float(out.loss.detach()) < 0.2 * first
    model.eval()
    b = batch()
    with torch.no_grad():
        out = model(b)
    cand = b.item_ids.reshape(32, 10)[:, -4:].flatten()  # last 4 events of each row
    assert out.labels[:, 0].tolist() == (cand % 2 == 0).float().tolist()
    assert out.labels[:, 1].tolist() == (cand % 4 == 0).float().tolist()
    assert out.labels[:, 2].tolist() == (cand % 5).float().tolist()
    assert auc(out.logits[:, 0], out.labels[:, 0]) > 0.95
    assert auc(out.logits[:, 1], out.labels[:, 1]) > 0.95
    assert float(((out.logits[:, 2] - out.labels[:, 2]) ** 2).mean()) < 0.5
