"""Progressive evaluation pieces against hand-computed values."""

from __future__ import annotations

import math

import torch

from genrec.config import RetrievalConfig
from genrec.data_pipeline.batch import make_batch
from genrec.embeddings.frequency import CountMinSketch, PopularitySampler
from genrec.trainer.negatives import NegativeSampler, step_generator
from genrec.trainer.progressive import (
    ItemRateBaseline,
    PopularityBaseline,
    RankingMetrics,
    TopKMetrics,
    WindowMetrics,
)
from genrec.trainer.tasks import batch_target_mask


def _batch():
    # two sequences: [10, 11, 12] with 2 targets, [12, 13] with 1 target
    return make_batch(
        item_ids=[10, 11, 12, 12, 13],
        actions=[0] * 5,
        timestamps=[1, 2, 3, 1, 2],
        lengths=[3, 2],
        num_targets=[2, 1],
        user_ids=[1, 2],
        windows=[0, 0],
    )


def test_target_mask_marks_each_target_once():
    assert batch_target_mask(_batch()).tolist() == [False, True, True, False, True]


def test_popularity_baseline_excludes_history_and_ranks_by_past_counts():
    catalog = torch.tensor([10, 11, 12, 13, 14])
    base = PopularityBaseline(catalog)
    base.update(torch.tensor([12, 12, 12, 10, 10, 14]))  # counts: 12:3, 10:2, 14:1
    top = base.top_k(_batch(), k=2, exclude_history=True, max_len=3)
    # positions: predict 11 after [10]; 12 after [10, 11]; 13 after [12]
    assert top.tolist() == [[12, 14], [12, 14], [10, 14]]
    base.sync()  # single process: delta folds into the shared counts
    assert base.counts[:, 0].tolist() == [2.0, 0.0, 3.0, 0.0, 1.0]
    assert base.delta.sum() == 0


def test_popularity_leaders_kept_between_evals_equal_a_full_sort():
    """The merged leaders equal a full stable sort of the counts after every update, ties
    included (small ids, many repeats), across a sync, a load and a pending overflow."""
    g = torch.Generator().manual_seed(0)
    catalog = torch.arange(100, 400, 3)  # 100 items
    base = PopularityBaseline(catalog)

    def full(m):
        counts = (base.counts + base.delta)[:, 0]
        return torch.sort(counts, descending=True, stable=True).indices[:m]

    for step in range(60):
        ids = catalog[
            torch.randint(0, 40, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        ]
        base.update(torch.cat([ids, torch.tensor([7, 10_000])]))  # two ids outside
        m = 5 + step % 12
        assert base.leaders(m).tolist() == full(m).tolist(), step
        if step == 20:
            base.sync()
        if step == 40:
            base.load(base.counts.clone(), base.delta.clone())
    base.leaders(8)
    base.update(catalog.repeat(3))  # 300 updated rows: over the cap, a full pass next
    assert base._leaders is None
    assert base.leaders(8).tolist() == full(8).tolist()


def test_window_metrics_means():
    m = WindowMetrics(TopKMetrics((2, 3), "model/", "positions"))
    topk = torch.tensor([[5, 7, 9], [1, 2, 3], [4, 8, 6], [1, 1, 1]])
    pop = torch.tensor([[8, 8, 7], [8, 8, 8], [8, 8, 8], [8, 8, 8]])
    m.scores.add(topk, pop, torch.tensor([7, 9, 4, 2]))  # model: rank 2, miss, rank 1, miss
    m.add_loss(3.0, 2)
    m.add_loss(1.0, 2)
    r = m.reduce()
    assert r["positions"] == 4 and r["loss"] == 2.0
    assert r["model/recall@2"] == 0.5 and r["model/recall@3"] == 0.5
    assert math.isclose(r["model/ndcg@2"], (1 / math.log2(3) + 1) / 4)
    assert r["most_popular/recall@2"] == 0.0 and r["most_popular/recall@3"] == 0.25
    assert math.isclose(r["most_popular/ndcg@3"], 0.5 / 4)


def test_item_rate_baseline_and_ranking_metrics_hand_computed():
    base = ItemRateBaseline(torch.tensor([10, 11, 12]), num_tasks=2)
    base.update(torch.tensor([10, 10, 11, 99]), torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1]]))
    # item 99 is outside the catalog: not counted; global rates 2/3 and 1/3
    rates = base.rates(torch.tensor([10, 11, 12]))
    want = torch.tensor(
        [[(2 + 2 / 3) / 3, (1 + 1 / 3) / 3], [(2 / 3) / 2, (1 / 3) / 2], [2 / 3, 1 / 3]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(rates, want)
    base.sync()  # single process: the delta folds into the counts, rates unchanged
    torch.testing.assert_close(base.rates(torch.tensor([10, 11, 12])), want)
    restored = ItemRateBaseline(torch.tensor([10, 11, 12]), num_tasks=2)
    restored.load(base.counts, base.delta)  # as a checkpoint restores it
    torch.testing.assert_close(restored.rates(torch.tensor([10, 11, 12])), want)
    m = RankingMetrics(["click", "cart"], [False, False], "model/", "positions")
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.5, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    m.add(logits[:2], labels[:2], torch.full((2, 2), 0.5))
    m.add(logits[2:], labels[2:], torch.tensor([[0.2, 0.1], [0.9, 0.1]]))
    r = m.reduce()
    assert r["positions"] == 4
    # click: positives score 2.0, 0.5; negatives 1.0, -1.0: 3 of 4 pairs ordered
    assert r["model/click.auc"] == 0.75
    assert r["model/cart.auc"] == 0.5  # all logits tie
    # baseline click: positives 0.5, 0.9; negatives 0.5, 0.2: 3.5 of 4
    assert r["item_rate/click.auc"] == 0.875
    want_cal = float(torch.sigmoid(logits[:, 0]).mean()) / 0.5
    assert math.isclose(r["model/click.calibration"], want_cal, rel_tol=1e-6)


def test_negative_sampler_mixture_log_q():
    catalog = torch.arange(100, 200)
    sketch = CountMinSketch(4, 1 << 12, conservative=False)
    popular = PopularitySampler(capacity=16)
    cfg = RetrievalConfig(num_negatives=10, uniform_fraction=0.5, popularity_fraction=0.5)
    sampler = NegativeSampler(cfg, catalog, sketch, popular)
    ids, log_q = sampler.sample(step_generator(0, 0, 0))
    # nothing seen yet: all uniform, q = 1/|C|
    assert ids.numel() == 10 and torch.allclose(log_q, torch.full((10,), -math.log(100.0)))
    seen = torch.tensor([150] * 3 + [151])
    sketch.update(seen)
    popular.add(seen)
    ids, log_q = sampler.sample(step_generator(0, 1, 0))
    assert ids.numel() == 10
    q150 = 0.5 / 100 + 0.5 * 3 / 4
    got = dict(zip(ids.tolist(), log_q.tolist()))
    assert math.isclose(got[150], math.log(q150), rel_tol=1e-5)
    # same (seed, step, rank) draws the same negatives: resume needs no generator state
    again, _ = sampler.sample(step_generator(0, 1, 0))
    assert torch.equal(ids, again)
    # an explicit count (bce_negatives=per_position: one per target position): that many,
    # the popularity half mixed in among the uniform half rather than all at the end, each
    # id with its own log q
    ids, log_q = sampler.sample(step_generator(0, 2, 0), 400)
    assert ids.numel() == log_q.numel() == 400
    pop = (ids == 150) | (ids == 151)  # ~0.5 of the draws (+ ~2 % from the uniform half)
    assert 150 < int(pop.sum()) < 260
    assert 0.3 < float(pop[:200].float().mean()) < 0.7
    want = torch.log(0.5 / 100 + 0.5 * torch.where(ids == 150, 0.75, 0.0))
    want = torch.where(ids == 151, math.log(0.5 / 100 + 0.5 / 4), want)
    torch.testing.assert_close(log_q, want.float())


def test_metrics_log_resume_drops_rows_after_the_checkpoint(tmp_path):
    from genrec.trainer.metrics_log import MetricsLogger, read_metrics

    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3, 4):
        log.log("step", step, {"loss": float(step)})
    log.log("window", 4, {"model/recall@10": 0.5}, window=7)
    log.resume_at(2)  # the run died after step 4; its checkpoint was at step 2
    log.log("step", 3, {"loss": 30.0})
    log.close()
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["value"]) for r in rows if r["kind"] == "step"] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]
    assert not [r for r in rows if r["kind"] == "window"]


def test_ranking_rows_are_described_under_every_prefix():
    from genrec.trainer.tasks import describe_ranking

    stream = {"model/click.auc": 0.61, "item_rate/click.auc": 0.55, "model/click.ne": 0.9}
    split = {"test/like.auc": 0.8, "test/item_rate/like.auc": 0.7, "test/users": 3.0}
    epoch = {"like.auc": 0.8, "item_rate/like.auc": 0.7}
    assert describe_ranking(stream, "model/") == "click AUC 0.6100 (item rate 0.5500)"
    assert describe_ranking(split, "test/") == "like AUC 0.8000 (item rate 0.7000)"
    assert describe_ranking(epoch) == "like AUC 0.8000 (item rate 0.7000)"


def _ranking_data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, 2, generator=g) < torch.tensor([0.3, 0.05])).float()
    logits = torch.randn(n, 2, generator=g) * 2 + labels * 1.5  # informative, AUC ~0.7
    baseline = torch.rand(n, 2, generator=g).clamp(0.01, 0.99)
    return logits, labels, baseline


def test_ranking_metrics_binned_equal_exact_within_the_bin_bound():
    """Past exact_rows the metrics come from sums and a histogram: NE and calibration equal
    the exact values, AUC within the half-a-bin bound (logits here are 0.002 apart at most
    in a bin of a 20k sample: the bound is far below 1e-3); the regression task's MSE too."""
    logits, labels, baseline = _ranking_data(0, 20_000)
    labels[:, 1] = torch.rand(20_000, generator=torch.Generator().manual_seed(1))  # regression
    exact = RankingMetrics(["click", "time"], [False, True], "model/", "n")
    binned = RankingMetrics(["click", "time"], [False, True], "model/", "n", exact_rows=5_000)
    for lo in range(0, 20_000, 4_000):
        for m in (exact, binned):
            m.add(logits[lo : lo + 4_000], labels[lo : lo + 4_000], baseline[lo : lo + 4_000])
    a, b = exact.reduce(), binned.reduce()
    assert "auc_binned" not in a and b["auc_binned"] == 1.0 and a["n"] == b["n"] == 20_000
    assert 0.6 < a["model/click.auc"] < 0.9  # informative, not degenerate
    for key in ("model/click.auc", "item_rate/click.auc"):
        assert abs(a[key] - b[key]) < 1e-4, (key, a[key], b[key])
    for key in (
        "model/click.ne",
        "model/click.calibration",
        "item_rate/click.ne",
        "item_rate/click.calibration",
        "model/time.mse",
        "item_rate/time.mse",
    ):
        assert math.isclose(a[key], b[key], rel_tol=1e-9), (key, a[key], b[key])


def test_binned_auc_hand_computed():
    """Bins in score order; a positive beats every negative below its bin, ties one half."""
    from genrec.models.metrics import binned_auc

    neg = torch.tensor([2.0, 1.0, 0.0, 1.0])
    pos = torch.tensor([0.0, 1.0, 2.0, 0.0])
    # pos in bin 1: beats 2 negatives, ties 1 -> 2.5; two pos in bin 2: beat 3 each -> 6
    assert binned_auc(neg, pos) == (2.5 + 6.0) / (3 * 4)


def _binned_on_ranks(rank: int, world_size: int) -> dict:
    """Rank 0 holds 3,000 candidates (over its exact_rows), rank 1 holds 1,000 (under)."""
    logits, labels, baseline = _ranking_data(2, 4_000)
    part = slice(0, 3_000) if rank == 0 else slice(3_000, 4_000)
    m = RankingMetrics(["click", "cart"], [False, False], "model/", "n", exact_rows=2_000)
    m.add(logits[part], labels[part], baseline[part])
    return m.reduce()


def test_ranking_metrics_binned_agree_across_ranks():
    """One rank over its exact_rows makes every rank report the binned values, equal to one
    process holding all candidates with the same setting."""
    from tests.dist_utils import run_on_ranks

    out = run_on_ranks(_binned_on_ranks, world_size=2)
    one = RankingMetrics(["click", "cart"], [False, False], "model/", "n", exact_rows=2_000)
    one.add(*_ranking_data(2, 4_000))
    want = one.reduce()
    assert out[0] == out[1]
    assert out[0]["auc_binned"] == 1.0 and out[0]["n"] == 4_000
    for key, v in want.items():
        assert math.isclose(out[0][key], v, rel_tol=1e-9, abs_tol=1e-12), key
