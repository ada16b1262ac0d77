from __future__ import annotations

import math

import pytest
import torch

from genrec.config import FrequencyConfig
from genrec.embeddings.frequency import CountMinSketch, FrequencyState, PopularitySampler

from ..dist_utils import run_on_ranks


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


def _colliding_pair(cms: CountMinSketch) -> tuple[int, int]:
    """Two ids that share their row-0 counter and not their row-1 counter."""
    ids = torch.arange(1, 200)
    cols = cms.columns(ids)
    for i in range(ids.numel()):
        for j in range(i + 1, ids.numel()):
            if cols[0, i] == cols[0, j] and cols[1, i] != cols[1, j]:
                return int(ids[i]), int(ids[j])
    raise AssertionError("no colliding pair among 199 ids")


@pytest.mark.parametrize("conservative", [False, True])
def test_conservative_from_config_against_hand_computed_counters(conservative):
    """a and b share a row-0 counter. Batches [a a a], [b], [a]:
    standard:     row 0 = 3 + 1 + 1 = 5; row 1: a 4, b 1
    conservative: [b] finds est(b) = min(3, 0) = 0, raises only to 1, so row 0 stays 3;
                  [a] then finds est(a) = min(3, 3) = 3 and raises both to 4."""
    state = FrequencyState(FrequencyConfig(depth=2, width=8, conservative=conservative))
    assert state.delta.conservative is conservative and state.synced.conservative is conservative
    a, b = _colliding_pair(state.delta)
    for batch in ([a, a, a], [b], [a]):
        state.add_(torch.tensor(batch))
    cols = state.delta.columns(torch.tensor([a, b]))
    counters = state.delta.counters
    assert counters[0, cols[0, 0]] == (4 if conservative else 5)
    assert (counters[1, cols[1, 0]], counters[1, cols[1, 1]]) == (4, 1)
    assert state.estimate(torch.tensor([a, b])).tolist() == [4, 1]
    assert float(state.total) == 5 and float(counters.sum()) == (4 + 5 if conservative else 5 + 5)


def test_decay_from_config_against_hand_computed_counts():
    """decay 0.5 per window: window 1 sees 1 x6, 2 x3 -> (3, 1.5), total 4.5; window 2 adds
    1 x2 -> 5 before its end and 2.5 after, total (4.5 + 2) / 2 = 3.25."""
    state = FrequencyState(FrequencyConfig(depth=3, width=4096, conservative=True, decay=0.5))
    state.add_(torch.tensor([1] * 6 + [2] * 3))
    state.end_window_()
    assert state.estimate(torch.tensor([1, 2])).tolist() == [3.0, 1.5]
    assert float(state.total) == 4.5
    state.add_(torch.tensor([1, 1]))
    assert state.estimate(torch.tensor([1])).tolist() == [5.0]  # synced + this rank's delta
    state.end_window_()
    assert state.estimate(torch.tensor([1, 2])).tolist() == [2.5, 0.75]
    assert float(state.total) == 3.25
    with pytest.raises(ValueError, match=r"frequency.decay must be in \(0, 1\]"):
        FrequencyState(FrequencyConfig(decay=1.5))


def test_updates_and_syncs_stay_in_their_buffers():
    """No sketch-sized allocation per step: add_, estimate and sync_ reuse the buffers."""
    state = FrequencyState(FrequencyConfig(depth=4, width=1 << 12, conservative=False))
    ptrs = (state.synced.flat.data_ptr(), state.delta.flat.data_ptr())
    views = (state.delta.counters.data_ptr(), state.delta.total.data_ptr())
    for step in range(3):
        state.add_(_zipf_stream(500, 300, seed=step))
        state.estimate(torch.arange(10))
    state.end_window_()
    assert (state.synced.flat.data_ptr(), state.delta.flat.data_ptr()) == ptrs
    assert (state.delta.counters.data_ptr(), state.delta.total.data_ptr()) == views
    assert float(state.total) == 1500 and float(state.delta.flat.abs().sum()) == 0


def _state(ids: list[torch.Tensor], synced: torch.Tensor | None = None) -> FrequencyState:
    state = FrequencyState(FrequencyConfig(depth=4, width=512, conservative=False), seed=1)
    if synced is not None:
        state.add_(synced).sync_()
    for x in ids:
        state.add_(x)
    return state


def _one_sketch(*streams: torch.Tensor) -> CountMinSketch:
    union = CountMinSketch(4, 512, conservative=False, seed=1)
    union.add_(torch.cat(streams))
    return union


def test_reshard_two_ranks_to_one_keeps_every_count_once():
    base, r0, r1 = (_zipf_stream(3000, 400, seed=s) for s in (4, 5, 6))
    saved = [_state([r0], synced=base).state_dict(), _state([r1], synced=base).state_dict()]
    (one,) = FrequencyState.reshard(saved, 1)
    state = _state([])
    state.load_state_dict(one)
    union = _one_sketch(base, r0, r1)
    assert torch.equal(state.synced.counters + state.delta.counters, union.counters)
    assert float(state.total) == 9000 and float(state.delta.total) == 0
    ids = torch.unique(torch.cat([base, r0, r1]))
    assert torch.equal(state.estimate(ids), union.estimate(ids))


def test_reshard_one_rank_to_two_counts_the_delta_once():
    """rank % old_world would hand rank 0's delta to both new ranks: counted twice."""
    base, mine, new0, new1 = (_zipf_stream(2000, 300, seed=s) for s in (7, 8, 9, 10))
    saved = [_state([mine], synced=base).state_dict()]
    two = FrequencyState.reshard(saved, 2)
    states = [_state([]), _state([])]
    for st, sd in zip(states, two):
        st.load_state_dict(sd)
    states[0].add_(new0)
    states[1].add_(new1)
    # the next sync, done here by folding the two ranks' saved states
    (after,) = FrequencyState.reshard([s.state_dict() for s in states], 1)
    union = _one_sketch(base, mine, new0, new1)
    assert torch.equal(after["synced"]["counters"], union.counters)
    assert float(after["synced"]["total"]) == 8000
    with pytest.raises(ValueError, match="synced sketch that differs"):
        FrequencyState.reshard([saved[0], _state([], synced=new0).state_dict()], 1)


def _sync_on_ranks(rank: int, world_size: int) -> list[float]:
    state = _state([_zipf_stream(1000, 200, seed=20 + rank)])
    state.end_window_()
    return state.estimate(torch.arange(13, 13 + 7919 * 50, 7919)).tolist()


def test_sync_over_two_gloo_ranks_equals_one_sketch_of_both_streams():
    got = run_on_ranks(_sync_on_ranks, world_size=2)
    union = _one_sketch(_zipf_stream(1000, 200, seed=20), _zipf_stream(1000, 200, seed=21))
    want = union.estimate(torch.arange(13, 13 + 7919 * 50, 7919)).tolist()
    assert got[0] == got[1] == want
