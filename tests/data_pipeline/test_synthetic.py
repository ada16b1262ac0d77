"""Synthetic generators: own layouts, determinism, and signal beyond popularity."""

from __future__ import annotations

import glob
import os
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrec.data_pipeline.sources import get_source, iter_events
from genrec.data_pipeline.synthetic import generate
from genrec.data_pipeline.synthetic.world import World, slice_plan


def _read_all(root: str) -> dict[str, pa.Table]:
    files = sorted(glob.glob(os.path.join(root, "**", "*.p*q*"), recursive=True))
    return {os.path.relpath(f, root): pq.read_table(f) for f in files}


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(users=30, events=1500, items=100)
    a = generate("tecd", str(tmp_path / "a"), seed=5, **kw)
    b = generate("tecd", str(tmp_path / "b"), seed=5, **kw)
    c = generate("tecd", str(tmp_path / "c"), seed=6, **kw)
    ta, tb, tc = (_read_all(str(tmp_path / x)) for x in "abc")
    assert ta.keys() == tb.keys() and all(ta[k].equals(tb[k]) for k in ta)
    assert a.events == b.events
    k = "marketplace/events/00000.pq"
    assert not ta[k].equals(tc[k])
    assert "events/s" in a.summary() and f"{a.events:,} events" in a.summary()
    assert c.events > 0


def test_layouts_and_own_schemas(tmp_path):
    kw = dict(users=30, events=2000, items=100, seed=0)
    t = generate("tecd", str(tmp_path / "tecd"), **kw)
    days = sorted(os.listdir(tmp_path / "tecd" / "marketplace" / "events"))
    assert days == [f"{d:05d}.pq" for d in range(14)]
    ev = pq.read_table(tmp_path / "tecd" / "retail" / "events" / "00002.pq")
    assert ev.schema.names == ["timestamp", "user_id", "item_id", "subdomain", "action_type", "os"]
    assert set(ev["action_type"].to_pylist()) <= {"view", "click", "add-to-cart", "order"}
    items = pq.read_table(tmp_path / "tecd" / "offers" / "items.pq")
    assert items.schema.field("embedding").type == pa.list_(pa.float32())
    pay = pq.read_table(sorted(glob.glob(str(tmp_path / "tecd" / "payments" / "events" / "*"))))
    assert pay.schema.names == ["timestamp", "user_id", "brand_id", "price"]
    rows = sum(pq.read_metadata(f).num_rows for f in t.files if "/events/" in f)
    assert rows == t.events and 0.97 * 2000 <= t.events <= 2000

    v = generate("vk_lsvd", str(tmp_path / "vk"), **kw)
    weeks = sorted(glob.glob(str(tmp_path / "vk" / "interactions" / "*" / "week_*.parquet")))
    assert [os.path.relpath(w, tmp_path / "vk") for w in weeks[:1]] == [
        "interactions/test/week_07.parquet"
    ]
    vt = pq.read_table(weeks[1])
    assert vt.schema.field("user_id").type == pa.uint32()
    assert vt.schema.field("timespent").type == pa.uint8()
    assert "timestamp" not in vt.schema.names
    assert v.events == 2000
    emb = np.load(tmp_path / "vk" / "metadata" / "item_embeddings.npz")
    assert emb["embedding"].shape[0] == emb["item_id"].shape[0] == 100

    y = generate("yambda", str(tmp_path / "y"), **kw)
    multi = pq.read_table(tmp_path / "y" / "flat" / "50m" / "multi_event.parquet")
    assert multi.num_rows == y.events
    per_type = sum(
        pq.read_metadata(f).num_rows
        for f in glob.glob(str(tmp_path / "y" / "flat" / "50m" / "*s.parquet"))
    )
    assert per_type == multi.num_rows
    listen = multi.filter(pa.compute.equal(multi["event_type"], "listen"))
    assert listen["played_ratio_pct"].null_count == 0
    assert multi["played_ratio_pct"].null_count == multi.num_rows - listen.num_rows


def test_slice_plan_is_exact_and_bounded():
    plan = slice_plan(1_234_567, 14 * 86400, max_slice_events=50_000)
    assert sum(q for *_, q in plan) == 1_234_567
    assert max(q for *_, q in plan) <= 50_000 * 1.7  # daily rhythm around the mean
    assert plan[0][0] == 0 and plan[-1][1] == 14 * 86400


def test_embeddings_agree_with_clusters():
    w = World(users=10, items=600, seed=0)
    emb, c = w.item_embedding, w.item_cluster
    sims = emb @ emb.T
    same = c[:, None] == c[None, :]
    np.fill_diagonal(same, False)
    assert sims[same].mean() > sims[~same & ~np.eye(len(c), dtype=bool)].mean() + 0.5


@pytest.mark.parametrize("source", ["tecd", "vk_lsvd", "yambda"])
def test_next_item_predictable_beyond_popularity(tmp_path, source):
    """A first-order transition model beats most-popular on next-item HR@10 by far."""
    generate(source, str(tmp_path), users=300, events=30_000, items=800, seed=2)
    t = pa.Table.from_batches(list(iter_events(get_source(source), str(tmp_path))))
    u, i, ts = (t[c].to_numpy() for c in ("user_id", "item_id", "timestamp"))
    o = np.lexsort((ts, u))
    u, i, ts = u[o], i[o], ts[o]
    cut = np.quantile(ts, 0.8)
    same = np.r_[False, u[1:] == u[:-1]]
    train = same & (ts < cut)
    test = same & (ts >= cut)
    top = [x for x, _ in Counter(i[ts < cut].tolist()).most_common(10)]
    trans = defaultdict(Counter)
    for k in np.flatnonzero(train):
        trans[i[k - 1]][i[k]] += 1
    hit_pop = hit_markov = 0
    for k in np.flatnonzero(test):
        cand = [x for x, _ in trans[i[k - 1]].most_common(10)]
        cand += [x for x in top if x not in cand][: 10 - len(cand)]
        hit_markov += i[k] in cand
        hit_pop += i[k] in top
    n = int(test.sum())
    assert n > 4000
    assert hit_pop / n < 0.15
    assert hit_markov / n > 0.3 and hit_markov > 3 * hit_pop
