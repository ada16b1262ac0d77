"""Batch assembly: chunking keeps every target exactly once, nothing padded, nothing lost."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from genrec.data_pipeline.batch import (
    BadRowError,
    SequenceRows,
    concat_rows,
    filler_batch,
    sequences_from_rows,
)
from genrec.data_pipeline.schemas import SEQUENCES, sequences_schema


def table(rows: list[tuple[int, list[int], int]], window: int = 7, context: bool = False):
    """(user, item ids, num_history) rows; timestamps = 10 * item, actions = item % 8."""
    d = {
        "user_id": [u for u, _, _ in rows],
        "window": [window] * len(rows),
        "item_ids": [it for _, it, _ in rows],
        "timestamps": [[10 * i for i in it] for _, it, _ in rows],
        "actions": [[i % 8 for i in it] for _, it, _ in rows],
        "num_history": [h for _, _, h in rows],
    }
    if context:
        d["category"] = [[i % 5 for i in it] for _, it, _ in rows]
        return pa.table(d, schema=sequences_schema(["category"]))
    return pa.table(d, schema=SEQUENCES)


def split(batch, values: torch.Tensor) -> list[list[int]]:
    return [v.tolist() for v in torch.split(values, batch.lengths.tolist())]


def test_hand_computed_chunks():
    t = table([(1, [1, 2, 3, 4, 5], 2), (2, [10, 11, 12, 13], 4), (3, list(range(20, 29)), 1)])
    b = sequences_from_rows(t, max_len=4)
    # row 1: 3 targets fit, history trimmed to 1; row 2: no targets; row 3: 8 targets cut
    # into blocks of max_len // 2 = 2, each with as much history as fits in 4
    assert split(b, b.item_ids) == [
        [2, 3, 4, 5],
        [20, 21, 22],
        [21, 22, 23, 24],
        [23, 24, 25, 26],
        [25, 26, 27, 28],
    ]
    assert b.num_targets.tolist() == [3, 2, 2, 2, 2]
    assert b.user_ids.tolist() == [1, 3, 3, 3, 3]
    assert b.windows.tolist() == [7] * 5
    assert b.timestamps.tolist() == [10 * i for i in b.item_ids.tolist()]
    assert b.actions.tolist() == [i % 8 for i in b.item_ids.tolist()]
    assert b.features.keys() == ["item_id", "action"]


def reference_chunks(n: int, hist: int, max_len: int) -> list[tuple[int, int, int]]:
    """The obvious per-row loop the vectorized plan must match."""
    targets = n - hist
    if targets <= 0:
        return []
    if targets <= max_len:
        return [(max(0, n - max_len), n, targets)]
    step, out = max(1, max_len // 2), []
    for t0 in range(hist, n, step):
        t1 = min(n, t0 + step)
        out.append((max(0, t1 - max_len), t1, t1 - t0))
    return out


@pytest.mark.parametrize("max_len", [1, 2, 5, 16])
def test_random_rows_every_target_once(max_len):
    rng = np.random.default_rng(max_len)
    rows, nxt = [], 0
    for u in range(60):
        n = int(rng.integers(0, 40))
        rows.append((u, list(range(nxt, nxt + n)), int(rng.integers(0, n + 1))))
        nxt += n
    b = sequences_from_rows(table(rows), max_len)
    seqs = split(b, b.item_ids)
    want = [
        (u, items[s:e], tgt)
        for u, items, h in rows
        for s, e, tgt in reference_chunks(len(items), h, max_len)
    ]
    assert [(u, s, t) for u, s, t in zip(b.user_ids.tolist(), seqs, b.num_targets.tolist())] == [
        (u, s, t) for u, s, t in want
    ]
    targets = [i for s, t in zip(seqs, b.num_targets.tolist()) for i in s[len(s) - t :]]
    all_targets = [i for _, items, h in rows for i in items[h:]]
    assert sorted(targets) == all_targets  # each target exactly once
    assert max(len(s) for s in seqs) <= max_len
    assert b.num_tokens == sum(len(s) for s in seqs) == b.lengths.sum()


def test_sliced_and_chunked_tables_match_fresh_ones():
    rows = [(u, list(range(10 * u, 10 * u + u % 7)), min(u % 3, u % 7)) for u in range(30)]
    whole = table(rows)
    fresh = sequences_from_rows(table(rows[5:20]), 4)
    sliced = sequences_from_rows(whole.slice(5, 15), 4)
    multi = sequences_from_rows(pa.concat_tables([whole.slice(5, 6), whole.slice(11, 9)]), 4)
    pieces = SequenceRows(whole, 4)
    for b in (sliced, multi, concat_rows([(pieces, 5, 9), (pieces, 9, 20)])):
        assert b.item_ids.tolist() == fresh.item_ids.tolist()
        assert b.lengths.tolist() == fresh.lengths.tolist()
        assert b.num_targets.tolist() == fresh.num_targets.tolist()
        assert b.user_ids.tolist() == fresh.user_ids.tolist()


def test_context_keys_to_and_pin_memory():
    t = table([(1, [3, 4, 5], 1), (2, [6, 7], 0)], context=True)
    b = sequences_from_rows(t, 8, ("category",))
    assert b.features.keys() == ["item_id", "action", "category"]
    assert b.features["category"].values().tolist() == [i % 5 for i in b.item_ids.tolist()]
    moved = b.to("cpu", non_blocking=True)
    assert torch.equal(moved.features.values(), b.features.values())
    assert torch.equal(moved.num_targets, b.num_targets)
    pinned = b.pin_memory()
    if torch.cuda.is_available():
        assert pinned.timestamps.is_pinned() and pinned.features.values().is_pinned()
    else:
        assert pinned is b
    assert not b.is_filler


def test_filler_batch_has_one_token_and_no_targets():
    f = filler_batch(42, 3, 1000, 9, 5, {"category": 2})
    assert f.batch_size == 1 and f.num_tokens == 1 and f.is_filler
    assert f.item_ids.tolist() == [42] and f.features["category"].values().tolist() == [2]
    assert f.windows.tolist() == [5] and f.user_ids.tolist() == [9]


def test_bad_rows_fail_or_are_skipped_and_counted():
    t = table([(1, [1, 2, 3], 1), (2, [4, 5], 1), (3, [6, 7, 8], 5), (4, [9, 10], 0)])
    ts = t.column("timestamps").to_pylist()
    ts[1] = [40]  # user 2: timestamps shorter than item_ids
    t = t.set_column(3, "timestamps", pa.array(ts, pa.list_(pa.int64())))
    with pytest.raises(BadRowError, match="user_id 2"):
        SequenceRows(t, 8)
    rows = SequenceRows(t, 8, skip_bad=True)
    assert rows.num_bad == 2  # user 2 (lengths), user 3 (num_history 5 > 3 events)
    b = rows.batch()
    assert b.user_ids.tolist() == [1, 4]
    assert b.item_ids.tolist() == [1, 2, 3, 9, 10]
    assert b.timestamps.tolist() == [10, 20, 30, 90, 100]  # later rows still aligned
