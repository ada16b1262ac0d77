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


# ------------------------------------------------------------------ data.source: parquet

PARQUET_YAML = """
data:
  source: parquet
  window: day
  parquet:
    user: customer
    item: sku
    timestamp: ts
    timestamp_unit: ms
    action: event
    action_values: {seen: view, basket: cart, bought: order}
    context: {price: unit_price}
"""


def write_event_log(path, users=60, items=200, events=3000, seed=5) -> pa.Table:
    """A user's own log: custom column names, ms timestamps over 3 days, string actions."""
    rng = np.random.default_rng(seed)
    t0 = 1_700_006_400_000  # a midnight UTC, in ms
    table = pa.table(
        {
            "customer": rng.integers(1, users + 1, events),
            "sku": rng.integers(1, items + 1, events),
            "ts": t0 + rng.choice(3 * 86_400_000, events, replace=False),  # distinct times
            "event": rng.choice(["seen", "basket", "bought"], events, p=[0.7, 0.2, 0.1]),
            "unit_price": rng.uniform(1, 50, events).astype(np.float32),
        }
    )
    pq.write_table(table, path)
    return table


def _parquet_cfg(tmp_path, *overrides):
    from genrec.config import load_config

    (tmp_path / "cfg.yaml").write_text(PARQUET_YAML)
    return load_config(tmp_path / "cfg.yaml", list(overrides))


def test_parquet_source_maps_custom_columns(tmp_path):
    from genrec.data_pipeline.sources import source_spec

    log = write_event_log(tmp_path / "log.parquet")
    cfg = _parquet_cfg(tmp_path)
    events = _events(source_spec(cfg.data.parquet), str(tmp_path))
    assert events.num_rows == log.num_rows
    assert events["user_id"].to_pylist() == log["customer"].to_pylist()
    assert events["item_id"].to_pylist() == log["sku"].to_pylist()
    assert events["timestamp"].to_pylist() == (log["ts"].to_numpy() // 1000).tolist()
    codes = {"seen": 0, "basket": 2, "bought": 3}  # schemas.ACTIONS of view, cart, order
    assert events["action"].to_pylist() == [codes[a] for a in log["event"].to_pylist()]
    np.testing.assert_array_equal(events["price"].to_numpy(), log["unit_price"].to_numpy())
    # no time column: row order is time, every event in window 0; integer action codes
    pq.write_table(
        pa.table({"u": [7, 8, 7], "i": [1, 2, 3], "a": [1, 3, 1]}), tmp_path / "log.parquet"
    )
    cfg = _parquet_cfg(
        tmp_path, "data.parquet={user: u, item: i, action: a, action_values: {1: click, 3: order}}"
    )
    events = _events(source_spec(cfg.data.parquet), str(tmp_path))
    assert events["timestamp"].to_pylist() == [0, 1, 2]
    assert events["action"].to_pylist() == [1, 3, 1]


def test_parquet_source_bad_rows_are_named_or_skipped_and_counted(tmp_path):
    from genrec.config import ConfigError
    from genrec.data_pipeline.sources import source_spec
    from genrec.data_pipeline.validation import DataError

    pq.write_table(
        pa.table(
            {
                "customer": pa.array([1, None, 3, 4], pa.int64()),
                "sku": [1, 2, -3, 4],
                "ts": [0, 1000, 2000, 3000],
                "event": ["seen", "seen", "seen", "returned"],
                "unit_price": [1.0, 2.0, 3.0, 4.0],
            }
        ),
        tmp_path / "log.parquet",
    )
    spec = source_spec(_parquet_cfg(tmp_path).data.parquet)
    with pytest.raises(DataError, match=r"log.parquet: column 'customer', row 1: null value"):
        list(iter_events(get_source(spec), str(tmp_path)))
    bad = BadRows("skip")
    events = pa.Table.from_batches(list(iter_events(get_source(spec), str(tmp_path), bad=bad)))
    assert events["user_id"].to_pylist() == [1]
    assert bad.rows == {"null_value": 1, "negative_value": 1, "unknown_action": 1}
    pq.write_table(
        pa.table({"customer": [1, 4], "sku": [1, 4], "ts": [0, 3000], "event": ["seen", "returned"],
                  "unit_price": [1.0, 4.0]}),
        tmp_path / "log.parquet",
    )  # fmt: skip
    with pytest.raises(DataError, match=r"column 'event', row 1: unknown action 'returned'"):
        list(iter_events(get_source(spec), str(tmp_path)))
    with pytest.raises(DataError, match="column 'sku'.*missing"):
        pq.write_table(pa.table({"customer": [1], "ts": [0]}), tmp_path / "log.parquet")
        list(iter_events(get_source(spec), str(tmp_path)))
    with pytest.raises(ConfigError, match=r"data.parquet.action_values.seen: 'seen!'"):
        _parquet_cfg(tmp_path, "data.parquet.action_values={seen: seen!}")


def test_parquet_log_prepares_and_trains(tmp_path, ray_local):
    """Custom-named Parquet -> `source: parquet` -> prepare -> a short 1-rank train; every
    prepared (user, day) row holds exactly that user's events of the day, in time order."""
    import json

    from genrec.config import load_config
    from genrec.data_pipeline.sequences import prepare
    from genrec.data_pipeline.sources import source_spec
    from genrec.trainer.launch import train

    from ..trainer.helpers import TINY_MODEL

    raw = tmp_path / "raw"
    raw.mkdir()
    log = write_event_log(raw / "log.parquet").to_pandas()
    cfg = _parquet_cfg(
        tmp_path,
        f"data.raw_dir={raw}",
        f"data.prepared_dir={tmp_path / 'prepared'}",
        f"trainer.run_dir={tmp_path / 'run'}",
    )
    rep = prepare(
        source=source_spec(cfg.data.parquet),
        in_dir=cfg.data.raw_dir,
        out_dir=cfg.data.prepared_dir,
        window=cfg.data.window,
        max_len=10,
    )
    assert rep.events == len(log)
    meta = json.loads((tmp_path / "prepared" / schemas.META_FILE).read_text())
    assert json.loads(meta["source"].removeprefix("parquet:"))["user"] == "customer"
    parts = sorted(glob.glob(str(tmp_path / "prepared" / "window=*" / "*.parquet")))
    shards = pa.concat_tables([pq.read_table(p) for p in parts]).to_pandas()
    log["day"] = log["ts"] // 1000 // 86_400
    assert len(shards) == log.groupby(["customer", "day"]).ngroups
    for row in shards.sample(20, random_state=0).itertuples():
        mine = log[(log.customer == row.user_id) & (log.day == row.window)].sort_values("ts")
        targets = list(row.item_ids[row.num_history :])
        assert targets == mine.sku.tolist()
        assert list(row.price[row.num_history :]) == pytest.approx(mine.unit_price.tolist())
    train_cfg = load_config(
        "quickstart",
        [
            f"data.prepared_dir={tmp_path / 'prepared'}",
            f"trainer.run_dir={tmp_path / 'run'}",
            *TINY_MODEL,
            "trainer.world_size=1",
            "sharding.topology.world_size=1",
            "trainer.max_steps=3",
            "trainer.batch_size=16",
            "model.retrieval.num_negatives=32",
        ],
    )
    train(train_cfg, resume=False)
    state = json.loads(
        (tmp_path / "run" / "checkpoints" / "step-00000003" / "state.json").read_text()
    )
    assert state["step"] == 3
