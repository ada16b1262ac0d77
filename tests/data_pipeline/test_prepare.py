"""prepare: every event is a target exactly once; histories equal a pure-python recomputation."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest

from genrec.data_pipeline import schemas, sequences
from genrec.data_pipeline.shard_index import load_window_index
from genrec.data_pipeline.sources import get_source, iter_events
from genrec.data_pipeline.synthetic import generate
from genrec.data_pipeline.validation import DataError


@pytest.fixture(scope="module")
def tecd_raw(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tecd"))
    generate("tecd", path, users=60, events=5000, items=200, seed=7)
    return path


def _expected(source: str, in_dir: str, seconds: int | None, max_len: int) -> dict:
    """(user, window) -> row, recomputed the straightforward way (stable sort by time)."""
    src = get_source(source)
    by_user = defaultdict(list)
    for batch in iter_events(src, in_dir):
        for ev in batch.to_pylist():
            by_user[ev["user_id"]].append(ev)
    rows = {}
    for user, evs in by_user.items():
        evs.sort(key=lambda e: e["timestamp"])  # stable: ties keep file order
        windows = [e["timestamp"] // seconds if seconds else e["timestamp"] >> 40 for e in evs]
        for i, w in enumerate(windows):
            if i and windows[i - 1] == w:
                continue
            j = i
            while j < len(evs) and windows[j] == w:
                j += 1
            h = max(0, i - max_len)
            part = evs[h:j]
            rows[(user, w)] = {
                "item_ids": [x["item_id"] for x in part],
                "timestamps": [x["timestamp"] for x in part],
                "actions": [x["action"] for x in part],
                "num_history": i - h,
                **{c: [x[c] for x in part] for c in src.context},
            }
    return rows


def _read_shards(out: str, context: tuple) -> dict:
    rows = {}
    for path in sorted(glob.glob(os.path.join(out, "window=*", "part-*.parquet"))):
        assert re.search(r"window=\d{5}/part-\d{5}\.parquet$", path)
        table = pq.read_table(path)
        assert table.schema == schemas.sequences_schema(context)
        users = table["user_id"].to_pylist()
        assert len(set(users)) == len(users)
        window = int(re.search(r"window=(\d+)", path).group(1))
        for r in table.to_pylist():
            assert r["window"] == window
            key = (r.pop("user_id"), r.pop("window"))
            assert key not in rows
            rows[key] = r
    return rows


def _check_layout(out: str, files_per_window: int, group: int) -> None:
    """<= files_per_window files per window, fixed row groups, an index that matches them."""
    meta = json.load(open(os.path.join(out, schemas.META_FILE)))
    for w in meta["windows"]:
        index = load_window_index(out, w, meta["rows_per_window"][str(w)])
        paths = sorted(glob.glob(os.path.join(out, schemas.window_dir(w), "part-*.parquet")))
        assert [os.path.basename(p) for p in paths] == list(index.files)
        assert 1 <= len(paths) <= files_per_window and index.row_group_rows == group
        for p, rows in zip(paths, index.file_rows):
            md = pq.read_metadata(p)
            sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            assert sum(sizes) == rows and all(n == group for n in sizes[:-1])
            assert 0 < sizes[-1] <= group


@pytest.mark.parametrize("task_mb,files_per_window", [(512, 4), (0.05, 3)])
def test_prepare_tecd_matches_recomputation(
    ray_local, tecd_raw, tmp_path, task_mb, files_per_window
):
    out = str(tmp_path / "prepared")
    report = sequences.prepare(
        "tecd", tecd_raw, out, window="day", max_len=7, task_mb=task_mb,
        files_per_window=files_per_window, row_group_rows=4,
    )  # fmt: skip
    _check_layout(out, files_per_window, 4)
    context = get_source("tecd").context
    expected = _expected("tecd", tecd_raw, 86400, 7)
    got = _read_shards(out, context)
    assert got == expected
    total = sum(len(r["item_ids"]) - r["num_history"] for r in expected.values())
    assert (
        report.events
        == total
        == sum(1 for b in iter_events(get_source("tecd"), tecd_raw) for _ in range(b.num_rows))
    )
    assert report.buckets == sequences.bucket_count(report.events, task_mb)  # est = events
    assert (report.buckets > 1) == (task_mb < 1)
    meta = json.load(open(os.path.join(out, schemas.META_FILE)))
    assert meta["windows"] == sorted({w for _, w in expected})
    per_window = Counter()
    for (_, w), r in expected.items():
        per_window[str(w)] += len(r["item_ids"]) - r["num_history"]
    assert meta["events_per_window"] == dict(per_window)
    assert meta["rows_per_window"] == dict(Counter(str(w) for _, w in expected))
    assert meta["num_users"] == len({u for u, _ in expected}) == report.users
    assert meta["context"] == list(context) and meta["max_len"] == 7
    items = pq.read_table(os.path.join(out, schemas.ITEMS_FILE))
    assert items.schema == schemas.ITEMS
    counts = Counter()
    for r in expected.values():
        counts.update(r["item_ids"][r["num_history"] :])
    assert dict(zip(items["item_id"].to_pylist(), items["count"].to_pylist())) == dict(counts)
    assert meta["num_items"] == len(counts) == report.items
    assert not os.path.exists(os.path.join(out, sequences.TMP_DIR))


def test_prepare_vk_windows_are_weeks(ray_local, tmp_path):
    raw = str(tmp_path / "raw")
    generate("vk_lsvd", raw, users=40, events=3000, items=120, seed=1)
    out = str(tmp_path / "prepared")
    report = sequences.prepare("vk_lsvd", raw, out, window="day", max_len=5)
    assert report.windows == list(range(8))
    assert _read_shards(out, get_source("vk_lsvd").context) == _expected("vk_lsvd", raw, None, 5)
    meta = json.load(open(os.path.join(out, schemas.META_FILE)))
    assert meta["timestamps"] == "order" and meta["window_seconds"] is None


def test_prepare_recbole_real_every_event_once(ray_local, shared_data, tmp_path):
    out = str(tmp_path / "prepared")
    report = sequences.prepare(
        "recbole", str(shared_data / "ml-100k"), out, window="week", max_len=20
    )
    assert report.events == 100_000 and report.users == 943 and report.items == 1682
    targets = Counter()
    for path in glob.glob(os.path.join(out, "window=*", "*.parquet")):
        t = pq.read_table(path, columns=["user_id", "item_ids", "num_history"])
        for u, items, h in zip(*(t[c].to_pylist() for c in t.column_names)):
            assert h <= 20
            targets.update((u, i) for i in items[h:])
    # ml-100k has one rating per (user, item): every pair is a target exactly once
    assert len(targets) == 100_000 and set(targets.values()) == {1}


def test_window_spec():
    assert sequences.window_seconds("day") == 86400
    assert sequences.window_seconds("week") == 604800
    assert sequences.window_seconds("3600") == 3600
    with pytest.raises(ValueError, match="window"):
        sequences.window_seconds("month")


def _split_days(raw: str, dest: str, days: range) -> str:
    """A copy of `raw` with only the daily event files `days` (item tables kept)."""
    shutil.copytree(raw, dest, ignore=shutil.ignore_patterns("*.pq"))
    for path in glob.glob(os.path.join(raw, "**", "*.pq"), recursive=True):
        rel = os.path.relpath(path, raw)
        day = re.search(r"events/(\d+)\.pq$", rel)
        if day is None or int(day.group(1)) in days:
            shutil.copy(path, os.path.join(dest, rel))
    return dest


def test_append_equals_full_prepare(ray_local, tecd_raw, tmp_path):
    kw = dict(window="day", max_len=7, task_mb=0.2, files_per_window=3, row_group_rows=4)
    full = str(tmp_path / "full")
    sequences.prepare("tecd", tecd_raw, full, **kw)
    old = _split_days(tecd_raw, str(tmp_path / "old_days"), range(0, 10))
    new = _split_days(tecd_raw, str(tmp_path / "new_days"), range(10, 14))
    out = str(tmp_path / "appended")
    sequences.prepare("tecd", old, out, **kw)
    shutil.rmtree(old)  # the append cannot read the old days: they are gone
    report = sequences.prepare("tecd", new, out, append=True, **kw)
    context = get_source("tecd").context
    assert _read_shards(out, context) == _read_shards(full, context)  # row for row
    _check_layout(out, 3, 4)
    m_full, m_out = (json.load(open(os.path.join(d, schemas.META_FILE))) for d in (full, out))
    for key in ("windows", "rows_per_window", "events_per_window", "num_rows", "num_events",
                "num_users", "num_items"):  # fmt: skip
        assert m_out[key] == m_full[key], key
    assert report.users == m_full["num_users"] and len(m_out["in_dirs"]) == 2
    items = [pq.read_table(os.path.join(d, schemas.ITEMS_FILE)).to_pydict() for d in (full, out)]
    counts = [dict(zip(i["item_id"], i["count"])) for i in items]
    assert counts[0] == counts[1] and sum(counts[0].values()) == m_full["num_events"]
    with pytest.raises(DataError, match="windows <= "):  # days already prepared
        sequences.prepare("tecd", new, out, append=True, **kw)
