"""`prepare`: the Ray job that turns a source's events into per-user sequence shards.

    report = prepare("tecd", "data/raw", "data/prepared", window="day", max_len=50)

Three stages of Ray tasks, each writing to disk so nothing large crosses the object store
and every task's memory is bounded by one bucket:

1. partition (one task per source fragment): read canonical events through the adapter,
   compute the window id, hash users into B buckets, write Arrow IPC files per bucket.
2. cut (one task per bucket): sort the bucket by (user, time, file order), cut one row per
   (user, window): that window's events are the targets, preceded by up to `max_len`
   earlier events of the user as history, and write `window=W/part-BBBBB.parquet`
   (rows sorted by user). Item counts go to I item buckets.
3. items (one task per item bucket): sum counts; the driver appends them to items.parquet.

`_meta.json` is written last, so a directory with it is complete. Grouping by user is the
one blocking shuffle; doing it as explicit hash buckets on disk (rather than Ray Data's
groupby) keeps the memory of a 2-core, 24 GB machine flat for any input size.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from tqdm import tqdm

from genrec.data_pipeline import schemas
from genrec.data_pipeline.shard_index import index_window
from genrec.data_pipeline.sources import get_source
from genrec.data_pipeline.validation import BadRows, DataError

WINDOW_SECONDS = {"day": 86_400, "week": 7 * 86_400}
ROWS_PER_BUCKET = 1_000_000  # events per user bucket (bounds a cut task's memory)
ROW_GROUP_ROWS = 8192
ITEMS_FILE = schemas.ITEMS_FILE
TMP_DIR = "_prepare_tmp"
SEQ_SHIFT = 40  # tie-break key: fragment index << 40 | row inside the fragment


@dataclass
class PrepareReport:
    source: str
    out_dir: str
    window: str
    max_len: int
    windows: list[int] = field(default_factory=list)
    rows: int = 0
    events: int = 0
    users: int = 0
    items: int = 0
    bad_rows: dict = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    buckets: int = 0

    def summary(self) -> str:
        bad = sum(self.bad_rows.values())
        span = f"{self.windows[0]}..{self.windows[-1]}" if self.windows else "none"
        text = (
            f"prepared {self.source} -> {self.out_dir}: {self.events:,} events as "
            f"{self.rows:,} (user, window) rows in {len(self.windows)} windows ({span}), "
            f"{self.users:,} users, {self.items:,} items, {self.buckets} buckets, "
            f"{self.seconds:.1f} s ({self.events / max(self.seconds, 1e-9):,.0f} events/s)"
        )
        if bad or self.skipped_files:
            reasons = ", ".join(f"{k}={v:,}" for k, v in sorted(self.bad_rows.items()))
            text += f"; skipped {bad:,} bad rows ({reasons}), {len(self.skipped_files)} files"
        return text


def window_seconds(window: str | int) -> int:
    """'day' | 'week' | a positive number of seconds -> seconds per window."""
    spec = str(window).strip().lower()
    if spec in WINDOW_SECONDS:
        return WINDOW_SECONDS[spec]
    if spec.isdigit() and int(spec) > 0:
        return int(spec)
    raise ValueError(
        f"window must be 'day', 'week' or a positive number of seconds, got {window!r}"
    )


def prepare(
    source: str,
    in_dir: str,
    out_dir: str,
    window: str,
    max_len: int,
    on_bad_rows: str = "error",
    ray_address: str = "",
) -> PrepareReport:
    """Events of `source` under `in_dir` -> sequence shards under `out_dir` (see module doc)."""
    from genrec.ray_runtime import ray_session

    start = time.perf_counter()
    seconds = window_seconds(window)
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    src = get_source(source)
    bad = BadRows(on_bad_rows)
    frags = src.plan(in_dir, bad)  # footers only: fails early on unreadable files
    if not frags:
        raise DataError(
            in_dir,
            "no readable events (every file was skipped)",
            fix="check the files listed in the skip report",
        )
    est = sum(f.num_rows if f.num_rows >= 0 else os.path.getsize(f.path) // 8 for f in frags)
    buckets = max(1, math.ceil(est / ROWS_PER_BUCKET))
    row_ordered = any(f.row_ordered for f in frags)
    if row_ordered and str(window) != "week" and source == "vk_lsvd":
        print(f"prepare: {source} has no timestamps; windows are its weeks", file=sys.stderr)
    _clear_outputs(out_dir)
    tmp = os.path.join(out_dir, TMP_DIR)
    try:
        with ray_session(address=ray_address):
            import ray

            part = ray.remote(num_cpus=1)(_partition_task)
            cut = ray.remote(num_cpus=1)(_cut_task)
            count = ray.remote(num_cpus=1)(_item_task)
            results = _run(
                [part.remote(source, f, on_bad_rows, seconds, buckets, tmp) for f in frags],
                "prepare: partition",
                len(frags),
            )
            for r in results:
                bad.merge(BadRows(on_bad_rows, rows=r["bad_rows"], files=r["bad_files"]))
            stats = _run(
                [
                    cut.remote(b, tmp, out_dir, max_len, src.context, buckets)
                    for b in range(buckets)
                ],
                "prepare: sequences",
                buckets,
            )
            refs = [count.remote(k, tmp) for k in range(buckets)]
            num_items = _write_items(refs, os.path.join(out_dir, ITEMS_FILE))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows_w: dict[int, int] = {}
    events_w: dict[int, int] = {}
    for s in stats:
        for w, (r, e) in s["windows"].items():
            rows_w[w] = rows_w.get(w, 0) + r
            events_w[w] = events_w.get(w, 0) + e
    windows = sorted(rows_w)
    for w in windows:
        index_window(out_dir, w, ROW_GROUP_ROWS)
    report = PrepareReport(
        source=source,
        out_dir=out_dir,
        window=str(window),
        max_len=max_len,
        windows=windows,
        rows=sum(rows_w.values()),
        events=sum(events_w.values()),
        users=sum(s["users"] for s in stats),
        items=num_items,
        bad_rows=dict(sorted(bad.rows.items())),
        skipped_files=list(bad.files),
        seconds=time.perf_counter() - start,
        buckets=buckets,
    )
    meta = {
        "format": 1,
        "source": source,
        "in_dir": os.path.abspath(in_dir),
        "window": str(window),
        "window_seconds": None if row_ordered else seconds,
        "timestamps": "order" if row_ordered else "seconds",
        "max_len": max_len,
        "context": list(src.context),
        "windows": windows,
        "rows_per_window": {str(w): rows_w[w] for w in windows},
        "events_per_window": {str(w): events_w[w] for w in windows},
        "num_rows": report.rows,
        "num_events": report.events,
        "num_users": report.users,
        "num_items": report.items,
        "items_file": ITEMS_FILE,
        "bad_rows": report.bad_rows,
        "skipped_files": report.skipped_files,
        "buckets": buckets,
        "seconds": round(report.seconds, 3),
    }
    with open(os.path.join(out_dir, schemas.META_FILE + ".tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(
        os.path.join(out_dir, schemas.META_FILE + ".tmp"), os.path.join(out_dir, schemas.META_FILE)
    )
    return report


# --------------------------------------------------------------------------- driver helpers


def _run(refs: list, desc: str, total: int) -> list:
    """Results of Ray tasks in submission order, with progress; a DataError re-raised clean."""
    import ray

    done: dict = {}
    pending = list(refs)
    with tqdm(total=total, desc=desc, file=sys.stderr, disable=None, mininterval=1.0) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                done[ready[0]] = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                for r in pending:
                    ray.cancel(r)
                if isinstance(e.cause, DataError):
                    raise e.cause from None
                raise
            bar.update(1)
    return [done[r] for r in refs]


def _write_items(refs: list, path: str) -> int:
    import ray

    writer = pq.ParquetWriter(path, schemas.ITEMS)
    total = 0
    try:
        for ref in tqdm(refs, desc="prepare: items", file=sys.stderr, disable=None):
            table = ray.get(ref)
            writer.write_table(table)
            total += table.num_rows
    finally:
        writer.close()
    return total


def _clear_outputs(out_dir: str) -> None:
    """Remove a previous run's outputs (the meta file first: never a stale complete dir)."""
    os.makedirs(out_dir, exist_ok=True)
    for name in (schemas.META_FILE, ITEMS_FILE):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for d in glob.glob(os.path.join(out_dir, "window=*")) + [os.path.join(out_dir, TMP_DIR)]:
        shutil.rmtree(d, ignore_errors=True)


def _mix(values: np.ndarray, salt: int) -> np.ndarray:
    """A well-mixed 32-bit hash of int64 ids (bucket choice independent of id patterns)."""
    h = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    return (h >> np.uint64(32)).astype(np.int64)


# --------------------------------------------------------------------------- Ray tasks


def _partition_task(source: str, frag, mode: str, seconds: int, buckets: int, tmp: str) -> dict:
    src = get_source(source)
    bad = BadRows(mode)
    schema = src.schema.append(pa.field("window", pa.int64())).append(pa.field("seq", pa.int64()))
    writers: dict[int, ipc.RecordBatchFileWriter] = {}
    seen = 0
    try:
        for batch in src.read(frag, bad):
            n = batch.num_rows
            ts = batch.column("timestamp").to_numpy()
            win = np.full(n, frag.window, np.int64) if frag.row_ordered else ts // seconds
            seq = (np.int64(frag.index) << SEQ_SHIFT) + seen + np.arange(n, dtype=np.int64)
            seen += n
            full = pa.RecordBatch.from_arrays(
                [*batch.columns, pa.array(win), pa.array(seq)], schema=schema
            )
            b = _mix(batch.column("user_id").to_numpy(), 1) % buckets
            order = np.argsort(b, kind="stable")
            b_sorted = b[order]
            cuts = np.flatnonzero(np.diff(b_sorted)) + 1
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n]):
                k = int(b_sorted[lo])
                if k not in writers:
                    path = os.path.join(tmp, f"b={k:05d}", f"f-{frag.index:06d}.arrow")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    writers[k] = ipc.new_file(path, schema)
                writers[k].write_batch(full.take(pa.array(order[lo:hi])))
    finally:
        for w in writers.values():
            w.close()
    return {"events": seen, "bad_rows": dict(bad.rows), "bad_files": list(bad.files)}


def _read_ipc(paths: list[str]) -> pa.Table | None:
    tables = [ipc.open_file(pa.memory_map(p)).read_all() for p in sorted(paths)]
    return pa.concat_tables(tables) if tables else None


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


def _cut_task(
    bucket: int, tmp: str, out_dir: str, max_len: int, context: tuple, num_item_buckets: int
) -> dict:
    table = _read_ipc(glob.glob(os.path.join(tmp, f"b={bucket:05d}", "*.arrow")))
    if table is None:
        return {"windows": {}, "users": 0}
    cols = {c: table.column(c).to_numpy() for c in table.column_names}
    del table
    order = np.lexsort((cols["seq"], cols["timestamp"], cols["user_id"]))
    cols = {c: v[order] for c, v in cols.items()}
    start, end, hist = cut_rows(cols["user_id"], cols["window"], max_len)
    row_window = cols["window"][start]
    schema = schemas.sequences_schema(context)
    stats: dict[int, tuple[int, int]] = {}
    for w in np.unique(row_window):
        rows = np.flatnonzero(row_window == w)  # already sorted by user
        s, e, h = start[rows], end[rows], hist[rows]
        lengths = e - h
        offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
        idx = np.arange(int(lengths.sum())) - np.repeat(offsets[:-1] - h, lengths)
        arrays = [
            pa.array(cols["user_id"][s]),
            pa.array(np.full(rows.size, w, np.int64)),
            *[
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(cols[c][idx]))
                for c in ("item_id", "timestamp", "action")
            ],
            pa.array((s - h).astype(np.int32)),
            *[pa.ListArray.from_arrays(pa.array(offsets), pa.array(cols[c][idx])) for c in context],
        ]
        path = os.path.join(out_dir, schemas.window_dir(int(w)), f"part-{bucket:05d}.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(
            pa.Table.from_arrays(arrays, schema=schema), path, row_group_size=ROW_GROUP_ROWS
        )
        stats[int(w)] = (int(rows.size), int((e - s).sum()))
    items, counts = np.unique(cols["item_id"], return_counts=True)
    k = _mix(items, 2) % num_item_buckets
    for kk in np.unique(k):
        m = k == kk
        path = os.path.join(tmp, "items", f"k={kk:05d}", f"b-{bucket:05d}.arrow")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with ipc.new_file(path, schemas.ITEMS) as w:
            w.write_table(
                pa.table(
                    {"item_id": items[m], "count": counts[m].astype(np.int64)}, schema=schemas.ITEMS
                )
            )
    users = int(np.count_nonzero(np.r_[True, np.diff(cols["user_id"]) != 0]))
    return {"windows": stats, "users": users}


def _item_task(k: int, tmp: str) -> pa.Table:
    table = _read_ipc(glob.glob(os.path.join(tmp, "items", f"k={k:05d}", "*.arrow")))
    if table is None:
        return schemas.ITEMS.empty_table()
    summed = table.group_by("item_id").aggregate([("count", "sum")])
    out = pa.table(
        {"item_id": summed.column("item_id"), "count": summed.column("count_sum")},
        schema=schemas.ITEMS,
    )
    return out.sort_by("item_id")
