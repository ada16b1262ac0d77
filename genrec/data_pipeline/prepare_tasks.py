"""The Ray tasks of `prepare` (sequences.py), each with a bounded fan-out.

Every temporary file is a *bucketed* Arrow IPC file: runs of exactly `num_buckets` record
batches, batch `r * num_buckets + k` holding run r's rows of bucket k (empty ones too), so
a consumer of bucket k reads one batch per run from a memory map and no task ever keeps
more than one writer open:

    partition   one per source fragment -> part/f-FFFFFF.arrow  (user buckets; a run per
                `task_mb` of input)
    cut         one per user bucket     -> cut/b-KKKKK.arrow    (one batch per window it
                touches, window order) + items/b-KKKKK.arrow (item buckets)
    write       one per file slot f     -> window=W/part-fffff.parquet for every window,
                from the cut files of buckets k with k % files_per_window == f; one
                ParquetWriter open at a time, row groups of exactly `row_group_rows` rows
                but the file's last
    items       one per item bucket     -> summed counts (the driver writes items.parquet)

Temporary data is the input once (part/) plus the sequences once (cut/), removed at the end.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from genrec.data_pipeline import schemas
from genrec.data_pipeline.batch import SequenceRows
from genrec.data_pipeline.shard_index import int_context_columns
from genrec.data_pipeline.sources import get_source
from genrec.data_pipeline.validation import BadRows, DataError

SEQ_SHIFT = 40  # tie-break key: fragment index << 40 | row inside the fragment
BYTES_PER_EVENT = 200  # a cut task's peak memory per event (columns, sort, take copies)
WINDOWS_KEY = b"genrec.windows"  # cut files: JSON {window: batch index}


def mix(values: np.ndarray, salt: int) -> np.ndarray:
    """A well-mixed 32-bit hash of int64 ids (bucket choice independent of id patterns)."""
    h = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    return (h >> np.uint64(32)).astype(np.int64)


# --------------------------------------------------------------------------- bucketed IPC


class BucketedWriter:
    """Runs of `num_buckets` batches (see module doc) in one IPC file."""

    def __init__(self, path: str, schema: pa.Schema, num_buckets: int):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.schema, self.num_buckets = schema, num_buckets
        self._w = ipc.new_file(path, schema)

    def write_run(self, table: pa.Table, bucket: np.ndarray) -> None:
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(self.num_buckets + 1))
        table = table.take(pa.array(order)).combine_chunks()
        for k in range(self.num_buckets):
            part = table.slice(int(bounds[k]), int(bounds[k + 1] - bounds[k]))
            self._w.write_batch(pa.RecordBatch.from_arrays(
                [c.combine_chunks() for c in part.columns], schema=self.schema
            ))  # fmt: skip

    def close(self) -> None:
        self._w.close()


def read_bucket(paths: list[str], bucket: int, num_buckets: int) -> pa.Table | None:
    """Bucket `bucket`'s rows of every run of every file, in (file, run) order."""
    batches = []
    for p in sorted(paths):
        with pa.memory_map(p) as src:
            reader = ipc.open_file(src)
            for run in range(reader.num_record_batches // num_buckets):
                b = reader.get_batch(run * num_buckets + bucket)
                if b.num_rows:
                    batches.append(b)
            schema = reader.schema
    return pa.Table.from_batches(batches, schema=schema).combine_chunks() if batches else None


# --------------------------------------------------------------------------- tasks


def partition_task(
    source: str,
    frag,
    mode: str,
    seconds: int,
    buckets: int,
    tmp: str,
    task_mb: float,
    first_fragment: int = 0,
) -> dict:
    """Events of one fragment -> part/f-FFFFFF.arrow, bucketed by user. `first_fragment`
    numbers an append's fragments after the prepared ones (file order breaks time ties)."""
    src = get_source(source)
    bad = BadRows(mode)
    schema = src.schema.append(pa.field("window", pa.int64())).append(pa.field("seq", pa.int64()))
    out = BucketedWriter(os.path.join(tmp, "part", f"f-{frag.index:06d}.arrow"), schema, buckets)
    run: list[pa.RecordBatch] = []
    run_bytes, seen = 0, 0

    def flush() -> None:
        if run:
            t = pa.Table.from_batches(run, schema=schema)
            out.write_run(t, mix(t.column("user_id").to_numpy(), 1) % buckets)
            run.clear()

    try:
        for batch in src.read(frag, bad):
            n = batch.num_rows
            ts = batch.column("timestamp").to_numpy()
            win = np.full(n, frag.window, np.int64) if frag.row_ordered else ts // seconds
            seq = (
                (np.int64(first_fragment + frag.index) << SEQ_SHIFT)
                + seen
                + np.arange(n, dtype=np.int64)
            )
            seen += n
            run.append(
                pa.RecordBatch.from_arrays(
                    [*batch.columns, pa.array(win), pa.array(seq)], schema=schema
                )
            )
            run_bytes += run[-1].nbytes
            if run_bytes * 3 > task_mb * 2**20:  # the sort's copies
                flush()
                run_bytes = 0
        flush()
    finally:
        out.close()
    return {"events": seen, "bad_rows": dict(bad.rows), "bad_files": list(bad.files)}


def cut_rows(user: np.ndarray, window: np.ndarray, max_len: int):
    """Rows of events sorted by (user, time): per (user, window) group, the slice
    [hist, end) whose events from `start` on are targets and before `start` history."""
    n = user.size
    new_user = np.r_[True, user[1:] != user[:-1]]
    start = np.flatnonzero(new_user | np.r_[True, window[1:] != window[:-1]])
    end = np.r_[start[1:], n]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))[start]
    hist = np.maximum(user_start, start - max_len)
    return start, end, hist


def cut_task(
    bucket: int,
    buckets: int,
    tmp: str,
    max_len: int,
    context: tuple,
    item_buckets: int,
    tail_dir: str = "",
    after: int | None = None,
) -> dict:
    """One user bucket -> its (user, window) rows, one batch per window (cut/b-KKKKK.arrow),
    and each user's last `max_len` events (tail/b-KKKKK.arrow, the state `--append` reads).

    With `tail_dir` (append), the bucket's stored tail precedes the new events, only rows of
    windows after `after` are cut, and only the new events are counted as items."""
    table = read_bucket(glob.glob(os.path.join(tmp, "part", "*.arrow")), bucket, buckets)
    tail_path = os.path.join(tail_dir, f"b-{bucket:05d}.arrow") if tail_dir else ""
    old = None
    if tail_path and os.path.exists(tail_path):
        with pa.memory_map(tail_path) as src:
            old = ipc.open_file(src).read_all()
    if table is not None and after is not None:
        early = int(np.count_nonzero(table.column("window").to_numpy() <= after))
        if early:
            raise DataError(
                tail_dir,
                f"{early} new events fall in windows <= {after}, the last prepared one",
                fix="append only days after the prepared ones, or prepare all days afresh",
            )
    n_old = 0 if old is None else old.num_rows
    if old is not None:
        new = None if table is None else table.select(old.column_names)
        table = old if new is None else pa.concat_tables([old.cast(new.schema), new])
    if table is None:
        return {"windows": {}, "users": 0}
    cols = {c: table.column(c).to_numpy() for c in table.column_names}
    is_new = np.arange(table.num_rows) >= n_old
    del table
    order = np.lexsort((cols["seq"], cols["timestamp"], cols["user_id"]))
    cols = {c: v[order] for c, v in cols.items()}
    is_new = is_new[order]
    start, end, hist = cut_rows(cols["user_id"], cols["window"], max_len)
    _write_tail(cols, max(max_len, 1), os.path.join(tmp, "tail", f"b-{bucket:05d}.arrow"))
    if after is not None:
        keep = cols["window"][start] > after
        start, end, hist = start[keep], end[keep], hist[keep]
    row_window = cols["window"][start]
    schema = schemas.sequences_schema(context)
    stats: dict[int, tuple[int, int]] = {}
    batches = []
    for w in np.unique(row_window):
        rows = np.flatnonzero(row_window == w)  # already sorted by user
        s, e, h = start[rows], end[rows], hist[rows]
        lengths = e - h
        offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
        idx = np.arange(int(lengths.sum())) - np.repeat(offsets.to_numpy()[:-1] - h, lengths)
        arrays = [
            pa.array(cols["user_id"][s]),
            pa.array(np.full(rows.size, w, np.int64)),
            *[
                pa.ListArray.from_arrays(offsets, pa.array(cols[c][idx]))
                for c in ("item_id", "timestamp", "action", *context)
            ],
        ]
        arrays.insert(5, pa.array((s - h).astype(np.int32)))  # num_history after the lists
        batches.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
        stats[int(w)] = (int(rows.size), int((e - s).sum()))
    meta = {WINDOWS_KEY: json.dumps({str(w): i for i, w in enumerate(stats)}).encode()}
    path = os.path.join(tmp, "cut", f"b-{bucket:05d}.arrow")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with ipc.new_file(path, schema.with_metadata(meta)) as f:
        for b in batches:
            f.write_batch(b)
    items, counts = np.unique(cols["item_id"][is_new], return_counts=True)
    item_table = pa.table(
        {"item_id": items, "count": counts.astype(np.int64)}, schema=schemas.ITEMS
    )
    out = BucketedWriter(os.path.join(tmp, "items", f"b-{bucket:05d}.arrow"), schemas.ITEMS,
                         item_buckets)  # fmt: skip
    out.write_run(item_table, mix(items, 2) % item_buckets)
    out.close()
    users = int(np.count_nonzero(np.r_[True, np.diff(cols["user_id"]) != 0]))
    return {"windows": stats, "users": users}


def _write_tail(cols: dict, max_len: int, path: str) -> None:
    """Each user's last `max_len` events (cols sorted by user, time) as one IPC file."""
    user = cols["user_id"]
    n = user.size
    new_user = np.r_[True, user[1:] != user[:-1]]
    user_end = np.r_[np.flatnonzero(new_user)[1:], n]
    last = np.repeat(user_end, np.diff(np.r_[np.flatnonzero(new_user), n]))
    keep = np.arange(n) >= last - max_len
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table({c: v[keep] for c, v in cols.items()})
    with ipc.new_file(path, table.schema) as f:
        f.write_table(table)


def write_task(
    slot: int, files_per_window: int, tmp: str, out_dir: str, context: tuple, row_group_rows: int
) -> dict:
    """File slot `slot`: window=W/part-{slot}.parquet for every window its buckets touch.

    Returns {window: (rows, first event or None)}; one writer open at a time."""
    paths = sorted(glob.glob(os.path.join(tmp, "cut", "b-*.arrow")))
    mine = [p for p in paths if int(p[-11:-6]) % files_per_window == slot]
    readers, where = [], {}
    for p in mine:
        r = ipc.open_file(pa.memory_map(p))
        readers.append(r)
        for w, i in json.loads(r.schema.metadata[WINDOWS_KEY]).items():
            where.setdefault(int(w), []).append((len(readers) - 1, i))
    schema = schemas.sequences_schema(context)
    int_context = int_context_columns(schema)
    result: dict[int, tuple[int, dict | None]] = {}
    for w in sorted(where):
        path = os.path.join(out_dir, schemas.window_dir(w), f"part-{slot:05d}.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rows, first, pending = 0, None, []
        with pq.ParquetWriter(path, schema) as writer:
            for ri, bi in where[w]:
                batch = readers[ri].get_batch(bi)
                if first is None:
                    seq = SequenceRows(
                        pa.Table.from_batches([batch]), 1, int_context, skip_bad=True
                    )
                    first = seq.first_token(0, seq.num_rows)
                pending.append(batch)
                rows += batch.num_rows
                if sum(b.num_rows for b in pending) >= row_group_rows:
                    pending = _write_groups(writer, pending, schema, row_group_rows)
            if pending:
                writer.write_table(pa.Table.from_batches(pending, schema=schema))
        result[w] = (rows, first)
    return result


def _write_groups(writer, pending: list, schema: pa.Schema, g: int) -> list:
    """Write the whole row groups of `pending`; return the rest (fewer than g rows)."""
    t = pa.Table.from_batches(pending, schema=schema)
    whole = t.num_rows // g * g
    writer.write_table(t.slice(0, whole), row_group_size=g)
    rest = t.slice(whole)
    return rest.to_batches() if rest.num_rows else []


def item_task(k: int, buckets: int, item_buckets: int, tmp: str) -> pa.Table:
    paths = glob.glob(os.path.join(tmp, "items", "*.arrow"))
    table = read_bucket(paths, k, item_buckets)
    if table is None:
        return schemas.ITEMS.empty_table()
    summed = table.group_by("item_id").aggregate([("count", "sum")])
    out = pa.table(
        {"item_id": summed.column("item_id"), "count": summed.column("count_sum")},
        schema=schemas.ITEMS,
    )
    return out.sort_by("item_id")
