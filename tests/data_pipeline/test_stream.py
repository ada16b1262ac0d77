"""The stream: time order, per-rank slices in lockstep, resumable at any world size, each row
decoded by one rank only."""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from itertools import islice

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from genrec.config import DataConfig
from genrec.data_pipeline.batch import BadRowError, Batch
from genrec.data_pipeline.schemas import META_FILE, sequences_schema
from genrec.data_pipeline.shard_index import load_window_index
from genrec.data_pipeline.stream import (
    StreamPosition,
    list_windows,
    open_stream,
    write_sequence_shards,
)

USERS = {3: 37, 5: 50, 8: 21}  # window -> rows; 50 % 8 == 2: rank 1 of 2 gets a filler
MAX_LEN, B = 6, 4


def make_rows(all_have_targets: bool = False, seed: int = 0) -> pa.Table:
    """Rows in file order; item ids are unique event ids, so each target can be traced."""
    rng = np.random.default_rng(seed)
    d: dict[str, list] = {c: [] for c in sequences_schema(["category"]).names}
    event = 0
    for w, users in USERS.items():
        for u in range(users):
            n = int(rng.integers(1, 16))
            h = int(rng.integers(0, n if all_have_targets else n + 1))
            items = list(range(event, event + n))
            event += n
            d["user_id"].append(1000 * w + u)
            d["window"].append(w)
            d["item_ids"].append(items)
            d["timestamps"].append([10 * i for i in items])
            d["actions"].append([i % 8 for i in items])
            d["category"].append([i % 97 for i in items])
            d["num_history"].append(h)
    return pa.table(d, schema=sequences_schema(["category"]))


def all_targets(rows: pa.Table) -> list[int]:
    return [i for it, h in zip(rows["item_ids"].to_pylist(), rows["num_history"].to_pylist())
            for i in it[h:]]  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[str, pa.Table]:
    rows = make_rows()
    d = str(tmp_path_factory.mktemp("prepared"))
    write_sequence_shards(d, rows, rows_per_file=16, row_group_rows=5)  # many files/groups
    return d, rows


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def stream_all(c: DataConfig, d: str, world: int = 1, rank: int = 0, **kw) -> list[Batch]:
    return list(open_stream(c, d, rank, world, B, MAX_LEN, **kw))


def targets(batches: list[Batch]) -> list[int]:
    out = []
    for b in batches:
        for seq, t in zip(torch.split(b.item_ids, b.lengths.tolist()), b.num_targets.tolist()):
            out += seq[len(seq) - t :].tolist()
    return out


def row_users(batches: list[Batch]) -> list[int]:
    """Users in stream order, one entry per row (chunks of a row are adjacent)."""
    out: list[int] = []
    for b in batches:
        for u, t in zip(b.user_ids.tolist(), b.num_targets.tolist()):
            if t and (not out or out[-1] != u):
                out.append(u)
    return out


def same(a: Batch, b: Batch) -> bool:
    return (
        a.features.keys() == b.features.keys()
        and torch.equal(a.features.values(), b.features.values())
        and torch.equal(a.features.lengths(), b.features.lengths())
        and all(
            torch.equal(getattr(a, f), getattr(b, f))
            for f in ("timestamps", "num_targets", "user_ids", "windows")
        )
    )


def assert_same(xs: list[Batch], ys: list[Batch]) -> None:
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert same(x, y), f"batch {i} differs"


def unshuffled_order(d: str, rows: pa.Table) -> list[int]:
    """Users with targets in the global order without shuffling: per window, its full row
    groups in file order, then the short ones (file ends) in file order."""
    users = rows["user_id"].to_pylist()
    has = [
        len(it) > h for it, h in zip(rows["item_ids"].to_pylist(), rows["num_history"].to_pylist())
    ]
    out, at = [], 0
    for w, n in USERS.items():
        index = load_window_index(d, w)
        _, _, unit_rows = index.units()
        bounds = np.r_[0, np.cumsum(unit_rows)] + at
        full = unit_rows == index.row_group_rows
        for u in [*np.flatnonzero(full), *np.flatnonzero(~full)]:
            out += [users[i] for i in range(bounds[u], bounds[u + 1]) if has[i]]
        at += n
    return out


def test_windows_and_position_round_trip(prepared):
    d, _ = prepared
    assert list_windows(d) == [3, 5, 8]
    p = StreamPosition(5, 24)
    assert StreamPosition.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="window"):
        StreamPosition.from_dict({"offset": 3})


def test_one_rank_streams_every_target_once_in_time_order(prepared):
    d, rows = prepared
    s = open_stream(cfg(), d, 0, 1, B, MAX_LEN)
    assert s.windows == [3, 5, 8] and s.context == ("category",)
    assert [s.num_batches(w) for w in s.windows] == [math.ceil(n / B) for n in USERS.values()]
    batches = list(s)
    assert sorted(targets(batches)) == sorted(all_targets(rows))
    assert len(targets(batches)) == len(all_targets(rows))  # no target twice
    windows = [b.windows.unique().tolist() for b in batches]
    assert all(len(w) == 1 for w in windows)  # a batch never mixes windows
    per_window = Counter(w[0] for w in windows)
    assert [per_window[w] for w in USERS] == [math.ceil(n / B) for n in USERS.values()]
    assert [w[0] for w in windows] == sorted(w[0] for w in windows)  # time order
    assert row_users(batches) == unshuffled_order(d, rows)
    for b in batches:  # every column stays aligned with item_id
        assert torch.equal(b.timestamps, 10 * b.item_ids)
        assert torch.equal(b.features["category"].values(), b.item_ids % 97)
        assert int(b.lengths.max()) <= MAX_LEN
    assert s.position == StreamPosition(8, USERS[8])
    assert s.stats["rows"] == rows.num_rows
    assert s.stats["fillers"] == sum(b.is_filler for b in batches)  # steps without targets


def test_two_ranks_lockstep_with_fillers(prepared):
    d, rows = prepared
    one = stream_all(cfg(), d)
    streams = [open_stream(cfg(), d, r, 2, B, MAX_LEN) for r in range(2)]
    runs: list[list[Batch]] = [[], []]
    for pair in zip(*streams):  # zip stops at the shorter: check lengths after
        for r, b in enumerate(pair):
            runs[r].append(b)
        assert streams[0].position == streams[1].position  # one global position
    assert [len(r) for r in runs] == [len(list(s)) + len(runs[0]) for s in streams]
    for w, n in USERS.items():
        counts = [sum(int(b.windows[0]) == w for b in r) for r in runs]
        assert counts == [math.ceil(n / (2 * B))] * 2
    fillers = [(r, i) for r in range(2) for i, b in enumerate(runs[r]) if b.is_filler]
    last_of_5 = max(i for i, b in enumerate(runs[1]) if int(b.windows[0]) == 5)
    assert (1, last_of_5) in fillers  # window 5 has 50 rows: its last step has 2
    f = runs[1][last_of_5]
    assert f.batch_size == 1 and f.num_tokens == 1 and int(f.num_targets.sum()) == 0
    assert int(f.windows[0]) == 5
    # rank r holds rows [r*B, (r+1)*B) of each step: together they are the 1-rank order
    interleaved = [b for pair in zip(*runs) for b in pair]
    assert row_users(interleaved) == row_users(one)
    assert sorted(targets(runs[0] + runs[1])) == sorted(all_targets(rows))
    assert streams[0].stats["rows"] + streams[1].stats["rows"] == rows.num_rows


@pytest.mark.parametrize("shuffle,prefetch", [(0, 2), (7, 0)])
def test_stop_and_resume_equals_uninterrupted(prepared, shuffle, prefetch):
    d, _ = prepared
    c = cfg(shuffle_buffer=shuffle, prefetch_batches=prefetch)
    full = stream_all(c, d)
    for stop in (3, math.ceil(USERS[3] / B), len(full) - 1):  # mid-window, boundary, last
        s = open_stream(c, d, 0, 1, B, MAX_LEN)
        head = list(islice(iter(s), stop))
        saved = json.loads(json.dumps(s.position.to_dict()))
        tail = stream_all(c, d, position=StreamPosition.from_dict(saved))
        assert_same(head + tail, full)
        assert_same(head + list(s), full)  # the same object also continues where it stopped
    assert not [t for t in threading.enumerate() if t.name == "genrec-stream-prefetch"]


@pytest.mark.parametrize("shuffle", [0, 7])
def test_two_ranks_resume_on_one(prepared, shuffle):
    d, rows = prepared
    c = cfg(shuffle_buffer=shuffle)
    order = row_users(stream_all(c, d))  # the global order (world-size independent)
    streams = [open_stream(c, d, r, 2, B, MAX_LEN) for r in range(2)]
    steps = 7  # window 3 has 5 steps of 8 rows: stop inside window 5
    head = [list(islice(iter(s), steps)) for s in streams]
    assert streams[0].position == streams[1].position == StreamPosition(5, 16)
    tail = stream_all(c, d, position=streams[0].position)
    got = targets(head[0] + head[1] + tail)
    assert sorted(got) == sorted(all_targets(rows)) and len(got) == len(set(got))
    interleaved = [b for pair in zip(*head) for b in pair]
    assert row_users(interleaved) + row_users(tail) == order


def test_shuffle_is_deterministic_bounded_and_seeded(tmp_path):
    rows = make_rows(all_have_targets=True, seed=1)
    d = str(tmp_path)
    write_sequence_shards(d, rows, rows_per_file=16, row_group_rows=5)
    S = 10  # with row groups of 5: blocks of 2 full groups; each group's rows are permuted too
    file_order = row_users(stream_all(cfg(), d))
    a = row_users(stream_all(cfg(shuffle_buffer=S, seed=3), d))
    assert a == row_users(stream_all(cfg(shuffle_buffer=S, seed=3), d))
    assert a != row_users(stream_all(cfg(shuffle_buffer=S, seed=4), d))
    assert a != file_order and sorted(a) == sorted(file_order)
    at, moved_groups = 0, 0
    for w, n in USERS.items():  # positions of the unshuffled order, unit by unit
        _, _, unit_rows = load_window_index(d, w).units()
        full = int((unit_rows == 5).sum())
        sizes = [10] * (full // 2) + [5] * (full % 2)
        sizes += [int(r) for r in unit_rows[unit_rows < 5]]  # short groups last, file order
        bounds = np.r_[0, np.cumsum(sizes)] + at
        assert bounds[-1] == at + n
        for lo, hi in zip(bounds[:-1], bounds[1:]):  # blocks of 2 full groups, then short ones
            assert sorted(a[lo:hi]) == sorted(file_order[lo:hi])
        groups = np.r_[0, np.cumsum([5] * full)] + at
        for lo, hi in zip(groups[:-1], groups[1:]):
            moved_groups += sorted(a[lo:hi]) != sorted(file_order[lo:hi])
        at += n
    assert moved_groups > 0  # the groups' order changed inside some block


def test_bad_rows_fail_naming_the_row_or_are_skipped(tmp_path):
    rows = make_rows(seed=2)
    ts = rows["timestamps"].to_pylist()
    ts[40] = ts[40][:-1] if len(ts[40]) > 1 else ts[40] + [0]  # window 5, user 5003
    rows = rows.set_column(3, "timestamps", pa.array(ts, pa.list_(pa.int64())))
    d = str(tmp_path)
    write_sequence_shards(d, rows, rows_per_file=16, row_group_rows=5)
    with pytest.raises(BadRowError, match=r"user_id 5003.*on_bad_rows=skip"):
        stream_all(cfg(), d)
    s = open_stream(cfg(on_bad_rows="skip"), d, 0, 1, B, MAX_LEN)
    got = targets(list(s))
    want = all_targets(rows.slice(0, 40)) + all_targets(rows.slice(41))
    assert sorted(got) == sorted(want) and s.stats["bad_rows"] == 1
    assert s.position == StreamPosition(8, USERS[8])


def test_missing_meta_and_unknown_windows_fail_early(tmp_path, prepared):
    with pytest.raises(FileNotFoundError, match="genrec prepare"):
        open_stream(cfg(), str(tmp_path), 0, 1, B, MAX_LEN)
    d, _ = prepared
    with pytest.raises(ValueError, match=r"windows \[4\] are not prepared"):
        open_stream(cfg(), d, 0, 1, B, MAX_LEN, windows=[3, 4])
    only = stream_all(cfg(windows=[8, 3]), d)
    assert [int(b.windows[0]) for b in only] == [3] * 10 + [8] * 6
    (tmp_path / META_FILE).write_text(json.dumps({"windows": [1]}))
    with pytest.raises(ValueError, match="rows_per_window.*genrec prepare"):
        open_stream(cfg(), str(tmp_path), 0, 1, B, MAX_LEN)
    (tmp_path / META_FILE).write_text(json.dumps({"windows": [1], "rows_per_window": {"1": 3}}))
    with pytest.raises(FileNotFoundError, match=r"window=00001/_index.json.*genrec prepare"):
        open_stream(cfg(), str(tmp_path), 0, 1, B, MAX_LEN)


def test_index_mismatch_fails_naming_the_file(tmp_path):
    d = str(tmp_path)
    rows = make_rows()
    write_sequence_shards(d, rows, rows_per_file=16, row_group_rows=4)
    part = tmp_path / "window=00005" / "part-00001.parquet"
    pq.write_table(pq.read_table(part), part, row_group_size=3)  # rewritten after prepare
    with pytest.raises(ValueError, match=r"part-00001.parquet: row groups.*genrec prepare"):
        stream_all(cfg(), d)


def read_groups_per_rank(d: str, world: int, c: DataConfig, monkeypatch) -> list[list]:
    """Stream every rank; record each (window, file, row group) a rank read from disk."""
    from genrec.data_pipeline.shard_reader import RowGroupReader

    seen: dict[int, list] = {}  # id(reader) -> row groups it read
    real_read = RowGroupReader.read

    def counting_read(self, index, file_i, group):
        seen.setdefault(id(self), []).append((index.window, file_i, group))
        return real_read(self, index, file_i, group)

    monkeypatch.setattr(RowGroupReader, "read", counting_read)
    streams = [open_stream(c, d, r, world, B, MAX_LEN) for r in range(world)]
    runs = [(list(s), s.stats) for s in streams]
    return [seen.get(id(s._reader), []) for s in streams], runs


@pytest.mark.parametrize("world,shuffle", [(2, 0), (4, 0), (4, 8)])
def test_each_row_group_is_read_by_one_rank_only(tmp_path, monkeypatch, world, shuffle):
    d = str(tmp_path)
    rows = make_rows()
    write_sequence_shards(d, rows, rows_per_file=8, row_group_rows=2)  # 2 divides B = 4
    groups, runs = read_groups_per_rank(d, world, cfg(shuffle_buffer=shuffle), monkeypatch)
    flat = [g for per_rank in groups for g in per_rank]
    assert len(flat) == len(set(flat))  # no row group read twice, on one rank or two
    every = {(w, f, g) for w, n in USERS.items() for f in range(-(-n // 8))
             for g in range(-(-min(8, n - 8 * f) // 2))}  # fmt: skip
    assert set(flat) == every
    decoded = [st["decoded_rows"] for _, st in runs]
    assert decoded == [st["rows"] for _, st in runs]  # each rank decodes its own rows only
    assert sum(decoded) == rows.num_rows  # amplification 1.0
    got = targets([b for batches, _ in runs for b in batches])
    assert sorted(got) == sorted(all_targets(rows)) and len(got) == len(set(got))
    assert len({len(batches) for batches, _ in runs}) == 1  # equal batch counts per rank


@pytest.mark.parametrize("shuffle", [0, 8])
def test_short_row_groups_at_file_ends_stay_out_of_the_way(tmp_path, monkeypatch, shuffle):
    """Files of 7 rows end in 1-row groups (as prepare's files do): they go last in the
    order, so every full group is still read by one rank only."""
    d = str(tmp_path)
    rows = make_rows()
    write_sequence_shards(d, rows, rows_per_file=7, row_group_rows=2)
    groups, runs = read_groups_per_rank(d, 2, cfg(shuffle_buffer=shuffle), monkeypatch)
    full = {(w, f, g) for w in USERS for f, g, n in zip(*load_window_index(d, w).units())
            if n == 2}  # fmt: skip
    flat = [g for per_rank in groups for g in per_rank]
    assert sorted(g for g in flat if g in full) == sorted(full)  # each full group once
    short_rows = sum(n for w in USERS for n in load_window_index(d, w).units()[2] if n < 2)
    assert rows.num_rows <= sum(st["decoded_rows"] for _, st in runs) <= rows.num_rows + short_rows
    got = targets([b for batches, _ in runs for b in batches])
    assert sorted(got) == sorted(all_targets(rows)) and len(got) == len(set(got))


@pytest.mark.parametrize("shuffle", [0, 8])
def test_one_rank_resumes_on_four(tmp_path, shuffle):
    d = str(tmp_path)
    rows = make_rows()
    write_sequence_shards(d, rows, rows_per_file=8, row_group_rows=2)
    c = cfg(shuffle_buffer=shuffle)
    full = stream_all(c, d)
    s = open_stream(c, d, 0, 1, B, MAX_LEN)
    head = list(islice(iter(s), 13))  # window 3 has 10 steps of 4 rows: stop inside window 5
    assert s.position == StreamPosition(5, 12)
    tails = [stream_all(c, d, 4, r, position=s.position) for r in range(4)]
    assert len({len(t) for t in tails}) == 1
    interleaved = [b for step in zip(*tails) for b in step]
    assert row_users(head) + row_users(interleaved) == row_users(full)
    got = targets(head + interleaved)
    assert sorted(got) == sorted(all_targets(rows)) and len(got) == len(set(got))


def test_ray_reader_is_a_config_error_naming_the_fix():
    from genrec.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match=r"data.reader: 'ray' was removed; set data.reader: local"
    ):
        load_config(None, ["data.reader=ray"])
    assert load_config("tecd").data.reader == "local"


def _stream_on_rank(rank: int, world: int, d: str, shuffle: int) -> dict:
    """One gloo rank: stream its share, then agree with the others on the batch count."""
    import torch.distributed as dist

    stream = open_stream(cfg(shuffle_buffer=shuffle), d, rank, world, B, MAX_LEN)
    batches = list(stream)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(batches)]))
    return {
        "targets": targets(batches),
        "decoded": stream.stats["decoded_rows"],
        "rows": stream.stats["rows"],
        "batch_counts": [int(c) for c in counts],
    }


@pytest.mark.parametrize("world,shuffle", [(2, 0), (4, 8)])
def test_each_row_decoded_once_across_gloo_ranks(tmp_path, world, shuffle):
    """Real ranks in their own processes: together they decode every row exactly once,
    every target comes out once, and all ranks yield the same number of batches."""
    from tests.dist_utils import run_on_ranks

    d = str(tmp_path)
    rows = make_rows()
    write_sequence_shards(d, rows, rows_per_file=8, row_group_rows=2)  # 2 divides B = 4
    out = run_on_ranks(_stream_on_rank, world_size=world, args=(d, shuffle))
    assert sum(r["decoded"] for r in out) == rows.num_rows  # amplification exactly 1
    assert all(r["decoded"] == r["rows"] for r in out)  # a rank decodes only its own rows
    got = [t for r in out for t in r["targets"]]
    assert sorted(got) == sorted(all_targets(rows)) and len(got) == len(set(got))
    assert all(len(set(r["batch_counts"])) == 1 for r in out)
