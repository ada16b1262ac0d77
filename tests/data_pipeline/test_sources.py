"""Source adapters on generated files (T-ECD, VK-LSVD, Yambda) and real files (text, RecBole)."""

from __future__ import annotations

import glob
import os
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrec.data_pipeline import schemas
from genrec.data_pipeline.sources import (
    NAMESPACE_SHIFT,
    ORDER_SHIFT,
    TECD_DOMAINS,
    get_source,
    iter_events,
)
from genrec.data_pipeline.synthetic import generate
from genrec.data_pipeline.validation import BadRows

SMALL = dict(users=80, events=6000, items=300, seed=3)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("raw")
    out = {}
    for source in ("tecd", "vk_lsvd", "yambda"):
        out[source] = str(root / source)
        generate(source, out[source], **SMALL)
    return out


def _events(source: str, path: str) -> pa.Table:
    src = get_source(source)
    batches = list(iter_events(src, path))
    for b in batches:
        assert b.schema == schemas.events_schema(src.context)
    return pa.Table.from_batches(batches, schema=schemas.events_schema(src.context))


def test_tecd_canonical_and_namespaced(raw):
    events = _events("tecd", raw["tecd"])
    raw_tables = {
        d: pq.read_table(sorted(glob.glob(os.path.join(raw["tecd"], d, "events", "*.pq"))))
        for d in TECD_DOMAINS
    }
    assert events.num_rows == sum(t.num_rows for t in raw_tables.values())
    # raw item ids of the domains collide, canonical ones must not
    raw_ids = {d: set(raw_tables[d]["item_id"].to_pylist()) for d in TECD_DOMAINS[:3]}
    assert raw_ids["marketplace"] & raw_ids["retail"]
    item = events["item_id"].to_numpy()
    domain = events["domain"].to_numpy()
    np.testing.assert_array_equal(item >> NAMESPACE_SHIFT, domain)
    per_domain = [set(item[domain == d].tolist()) for d in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not per_domain[a] & per_domain[b]
        assert len(per_domain[a]) == len(
            set(raw_tables[TECD_DOMAINS[a]].column("brand_id" if a == 3 else "item_id").to_pylist())
        )
    # action mapping: counts per canonical action equal the raw action_type counts
    raw_actions = Counter()
    for d in TECD_DOMAINS[:3]:
        raw_actions.update(raw_tables[d]["action_type"].to_pylist())
    got = Counter(events["action"].to_pylist())
    assert got[schemas.ACTIONS["view"]] == raw_actions["view"]
    assert got[schemas.ACTIONS["cart"]] == raw_actions["add-to-cart"]
    assert got[schemas.ACTIONS["order"]] == (
        raw_actions["order"] + raw_actions["transaction"] + raw_tables["payments"].num_rows
    )
    # timestamps are seconds
    first = raw_tables["marketplace"]["timestamp"][0].value // 1000
    assert first in set(events["timestamp"].to_pylist())


def test_vk_order_key_monotone_within_files(raw):
    src = get_source("vk_lsvd")
    frags = src.plan(raw["vk_lsvd"], BadRows())
    assert {f.window for f in frags} == set(range(8))
    for frag in frags:
        table = pa.Table.from_batches(list(src.read(frag, BadRows())))
        ts = table["timestamp"].to_numpy()
        assert (np.diff(ts) > 0).all()
        week = int(os.path.basename(frag.path)[5:7])
        np.testing.assert_array_equal(ts >> ORDER_SHIFT, week)
        np.testing.assert_array_equal(ts & ((1 << ORDER_SHIFT) - 1), np.arange(len(ts)))
        rawt = pq.read_table(frag.path)
        np.testing.assert_array_equal(table["user_id"].to_numpy(), rawt["user_id"].to_numpy())
        like = rawt["like"].to_numpy(zero_copy_only=False)
        act = table["action"].to_numpy()
        plain = ~np.column_stack(
            [
                rawt[c].to_numpy(zero_copy_only=False)
                for c in (
                    "like",
                    "dislike",
                    "share",
                    "bookmark",
                    "click_on_author",
                    "open_comments",
                )
            ]
        ).any(1)
        assert (act[plain] == schemas.ACTIONS["view"]).all()
        only_like = (
            like
            & ~rawt["dislike"].to_numpy(zero_copy_only=False)
            & ~rawt["share"].to_numpy(zero_copy_only=False)
        )
        assert (act[only_like] == schemas.ACTIONS["like"]).all()
        np.testing.assert_allclose(table["watch_time"].to_numpy(), rawt["timespent"].to_numpy())


def test_yambda_seconds_and_per_type_files_agree(raw, tmp_path):
    events = _events("yambda", raw["yambda"])
    multi = pq.read_table(os.path.join(raw["yambda"], "flat", "50m", "multi_event.parquet"))
    assert events.num_rows == multi.num_rows
    np.testing.assert_array_equal(
        events["timestamp"].to_numpy(), multi["timestamp"].to_numpy().astype(np.int64) * 5
    )
    got = Counter(events["action"].to_pylist())
    likes = pq.read_metadata(os.path.join(raw["yambda"], "flat", "50m", "likes.parquet"))
    assert got[schemas.ACTIONS["like"]] == likes.num_rows
    # without multi_event.parquet the per-type files give the same events
    size_dir = tmp_path / "50m"
    shutil.copytree(os.path.join(raw["yambda"], "flat", "50m"), size_dir)
    os.remove(size_dir / "multi_event.parquet")
    per_type = _events("yambda", str(size_dir))

    def key(t):
        return sorted(
            zip(*(t[c].to_pylist() for c in ("user_id", "item_id", "timestamp", "action")))
        )

    assert key(per_type) == key(events)


@pytest.mark.parametrize(
    "name,users,items,interactions",
    [("Sports_and_Outdoors", 35_598, 18_357, 296_337), ("Toys_and_Games", 19_412, 11_924, 167_597)],
)
def test_text_sequences_real(shared_data, name, users, items, interactions):
    path = shared_data / "amazon" / f"{name}.txt"
    events = _events("text", str(path))
    assert events.num_rows == interactions
    assert len(set(events["user_id"].to_pylist())) == users
    assert len(set(events["item_id"].to_pylist())) == items
    # position is the order key: the first user's line, in order
    with open(path) as f:
        first = [int(x) for x in f.readline().split()]
    u = events["user_id"].to_numpy()
    m = u == first[0]
    assert events["item_id"].to_numpy()[m].tolist() == first[1:]
    assert events["timestamp"].to_numpy()[m].tolist() == list(range(len(first) - 1))


def test_recbole_real(shared_data):
    path = shared_data / "ml-100k" / "ml-100k.inter"
    events = _events("recbole", str(path.parent))
    assert events.num_rows == 100_000
    assert len(set(events["user_id"].to_pylist())) == 943
    assert len(set(events["item_id"].to_pylist())) == 1682
    with open(path) as f:
        f.readline()
        rows = [line.split("\t") for _, line in zip(range(5), f)]
    for i, (u, it, rating, ts) in enumerate(rows):
        assert events["user_id"][i].as_py() == int(u)
        assert events["item_id"][i].as_py() == int(it)
        assert events["timestamp"][i].as_py() == int(float(ts))
        want = "like" if float(rating) >= 4 else "view"
        assert events["action"][i].as_py() == schemas.ACTIONS[want]
