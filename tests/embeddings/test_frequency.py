from __future__ import annotations

import math

import pytest
import torch

from genrec.embeddings.frequency import CountMinSketch, PopularitySampler


def _zipf_stream(n: int, items: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, items + 1, dtype=torch.float64) ** 1.1
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g) * 7919 + 13


@pytest.mark.parametrize("conservative", [False, True])
def test_error_within_eps_delta_on_zipf_stream(conservative):
    stream = _zipf_stream(100_000, 20_000)
    cms = CountMinSketch(depth=4, width=512, conservative=conservative, seed=3)
    for chunk in stream.split(4096):  # streamed in batches
        cms.update(chunk)
    ids, exact = torch.unique(stream, return_counts=True)
    est = cms.estimate(ids)
    assert int(cms.total) == stream.numel()
    assert bool((est >= exact).all()), "count-min never underestimates"
    over = (est - exact).double()
    bad = float((over > cms.epsilon * stream.numel()).double().mean())
    assert cms.epsilon == pytest.approx(math.e / 512) and cms.delta == pytest.approx(math.exp(-4))
    assert bad <= cms.delta, (bad, cms.delta)
    # head items are estimated almost exactly
    top = exact.argsort(descending=True)[:10]
    assert float((over[top] / exact[top]).max()) < 0.05


def test_conservative_update_never_worse_than_standard():
    stream = _zipf_stream(30_000, 5_000, seed=1)
    std, cons = CountMinSketch(3, 256, False, 5), CountMinSketch(3, 256, True, 5)
    for chunk in stream.split(1000):
        std.update(chunk)
        cons.update(chunk)
    ids, exact = torch.unique(stream, return_counts=True)
    e_std, e_cons = std.estimate(ids), cons.estimate(ids)
    assert bool((e_cons >= exact).all()) and bool((e_cons <= e_std).all())
    assert float((e_cons - exact).sum()) < 0.7 * float((e_std - exact).sum())


def test_merged_equals_union_for_standard_update():
    a_ids, b_ids = _zipf_stream(5000, 800, seed=2), _zipf_stream(7000, 800, seed=3)
    a, b, union = (CountMinSketch(4, 300, conservative=False, seed=9) for _ in range(3))
    a.update(a_ids)
    b.update(b_ids, counts=torch.full_like(b_ids, 2))
    union.update(torch.cat([a_ids, b_ids, b_ids]))
    a.merge_(b)
    assert torch.equal(a.counters, union.counters) and int(a.total) == int(union.total)
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge_(CountMinSketch(4, 301, conservative=False, seed=9))


def test_log_q_decay_and_state_dict_roundtrip():
    cms = CountMinSketch(4, 1024, seed=0)
    cms.update(torch.tensor([1] * 60 + [2] * 30 + [3] * 10))
    lq = cms.log_q(torch.tensor([1, 2, 3, 999]))
    torch.testing.assert_close(lq[:3], torch.log(torch.tensor([0.6, 0.3, 0.1])))
    assert float(lq[3]) == pytest.approx(math.log(1 / 100))  # unseen: one count
    cms.decay_(0.5)
    assert cms.estimate(torch.tensor([1, 2, 3])).tolist() == [30, 15, 5] and int(cms.total) == 50
    other = CountMinSketch(4, 1024, seed=0)
    other.load_state_dict(cms.state_dict())
    assert torch.equal(other.counters, cms.counters) and int(other.total) == 50
    with pytest.raises(ValueError, match="depth/width/seed"):
        CountMinSketch(4, 512).load_state_dict(cms.state_dict())


def test_popularity_sampler_is_frequency_proportional_and_keeps_recent_ids():
    s = PopularitySampler(capacity=1000, seed=0)
    s.add(torch.full((500,), 99))  # pushed out by what follows
    s.add(torch.tensor([1] * 600 + [2] * 300 + [3] * 100))
    assert 99 not in s.buffer.tolist() and s.filled == 1000
    draws = s.sample(40_000)
    freq = torch.bincount(draws, minlength=4)[1:4].double() / draws.numel()
    torch.testing.assert_close(
        freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.015, rtol=0
    )
    again = PopularitySampler(capacity=1000)
    again.load_state_dict(s.state_dict())
    assert torch.equal(again.sample(50), s.sample(50))
    with pytest.raises(RuntimeError, match="before any add"):
        PopularitySampler(4).sample(1)
