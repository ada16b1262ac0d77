"""`prepare`: the Ray job that turns a source's events into per-user sequence shards.

    report = prepare("tecd", "data/raw", "data/prepared", window="day", max_len=50)

Stages of Ray tasks (prepare_tasks.py), each writing to disk so nothing large crosses the
object store, each task's memory bounded by `task_mb`, and each keeping one writer open:

1. partition (one task per source fragment): canonical events through the adapter, the
   window id, users hashed into B buckets, B = events x BYTES_PER_EVENT / task_mb;
2. cut (one task per bucket): sort the bucket by (user, time, file order), cut one row per
   (user, window): that window's events are the targets, preceded by up to `max_len`
   earlier events of the user as history;
3. write (one task per file slot, at most `files_per_window`): each window's rows of the
   slot's buckets into window=W/part-fffff.parquet, row groups of `row_group_rows`;
4. items (one task per item bucket): summed counts; the driver appends them to items.parquet.

Then window=W/_index.json (files, rows, row-group size, first event: shard_index) and
`_meta.json`, written last, so a directory with it is complete. Grouping by user is the
one blocking shuffle; doing it as explicit hash buckets on disk (rather than Ray Data's
groupby) keeps the memory of a 2-core, 24 GB machine flat for any input size.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from genrec.data_pipeline import schemas
from genrec.data_pipeline.prepare_tasks import (
    BYTES_PER_EVENT,
    cut_task,
    item_task,
    partition_task,
    write_task,
)
from genrec.data_pipeline.shard_index import (
    int_context_columns,
    read_meta,
    write_meta,
    write_window_index,
)
from genrec.data_pipeline.sources import get_source
from genrec.data_pipeline.validation import BadRows, DataError

WINDOW_SECONDS = {"day": 86_400, "week": 7 * 86_400}
ITEMS_FILE = schemas.ITEMS_FILE
TMP_DIR = "_prepare_tmp"
TAIL_DIR = "_tail"  # per user bucket: each user's last max_len events (the --append state)


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


def bucket_count(events: int, task_mb: float) -> int:
    """User buckets so that one cut task holds about `task_mb` MiB (not a fixed events/bucket)."""
    return max(1, math.ceil(events * BYTES_PER_EVENT / (task_mb * 2**20)))


def prepare(
    source: str,
    in_dir: str,
    out_dir: str,
    window: str,
    max_len: int,
    on_bad_rows: str = "error",
    ray_address: str = "",
    task_mb: float = 512,
    files_per_window: int = 4,
    row_group_rows: int = 64,
    append: bool = False,
) -> PrepareReport:
    """Events of `source` under `in_dir` -> sequence shards under `out_dir` (see module doc).

    `append`: `in_dir` holds only new days, after the windows `out_dir` already has; their
    windows are added, reading the users' stored tails (_tail/) instead of the old days.
    The result equals preparing all days at once, row for row."""
    from genrec.ray_runtime import ray_session

    start = time.perf_counter()
    seconds = window_seconds(window)
    if max_len < 0 or task_mb <= 0 or files_per_window < 1 or row_group_rows < 1:
        raise ValueError(
            "need max_len >= 0, task_mb > 0, files_per_window >= 1, row_group_rows >= 1; got "
            f"{max_len}, {task_mb}, {files_per_window}, {row_group_rows}"
        )
    src = get_source(source)
    bad = BadRows(on_bad_rows)
    frags = src.plan(in_dir, bad)  # footers only: fails early on unreadable files
    if not frags:
        raise DataError(
            in_dir,
            "no readable events (every file was skipped)",
            fix="check the files listed in the skip report",
        )
    old = _append_base(out_dir, source, window, max_len, row_group_rows) if append else None
    est = sum(f.num_rows if f.num_rows >= 0 else os.path.getsize(f.path) // 8 for f in frags)
    buckets = old["buckets"] if old else bucket_count(est, task_mb)
    slots = min(files_per_window, buckets)
    first_fragment = old["fragments"] if old else 0
    after = old["windows"][-1] if old and old["windows"] else None
    tail_in = os.path.join(out_dir, TAIL_DIR) if old else ""
    row_ordered = any(f.row_ordered for f in frags)
    if row_ordered and str(window) != "week" and source == "vk_lsvd":
        print(f"prepare: {source} has no timestamps; windows are its weeks", file=sys.stderr)
    if old is None:
        _clear_outputs(out_dir)
    tmp = os.path.join(out_dir, TMP_DIR)
    shutil.rmtree(tmp, ignore_errors=True)
    ctx = tuple(src.context)
    schema = schemas.sequences_schema(ctx)
    try:
        with ray_session(address=ray_address):
            import ray

            part, cut, write, count = (
                ray.remote(num_cpus=1)(t) for t in (partition_task, cut_task, write_task, item_task)
            )
            results = _run(
                [
                    part.remote(
                        source, f, on_bad_rows, seconds, buckets, tmp, task_mb, first_fragment
                    )
                    for f in frags
                ],
                "prepare: partition",
                len(frags),
            )
            for r in results:
                bad.merge(BadRows(on_bad_rows, rows=r["bad_rows"], files=r["bad_files"]))
            stats = _run(
                [
                    cut.remote(b, buckets, tmp, max_len, ctx, buckets, tail_in, after)
                    for b in range(buckets)
                ],
                "prepare: sequences",
                buckets,
            )
            shutil.rmtree(os.path.join(tmp, "part"), ignore_errors=True)
            written = _run(
                [write.remote(f, slots, tmp, out_dir, ctx, row_group_rows) for f in range(slots)],
                "prepare: write",
                slots,
            )
            refs = [count.remote(k, buckets, buckets, tmp) for k in range(buckets)]
            items_path = os.path.join(out_dir, ITEMS_FILE)
            old_items = pq.read_table(items_path) if old else None
            num_items = _write_items(refs, items_path, old_items)
        shutil.rmtree(os.path.join(out_dir, TAIL_DIR), ignore_errors=True)
        os.replace(os.path.join(tmp, "tail"), os.path.join(out_dir, TAIL_DIR))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows_w = {int(w): n for w, n in (old or {}).get("rows_per_window", {}).items()}
    events_w = {int(w): n for w, n in (old or {}).get("events_per_window", {}).items()}
    for s in stats:
        for w, (r, e) in s["windows"].items():
            rows_w[w] = rows_w.get(w, 0) + r
            events_w[w] = events_w.get(w, 0) + e
    for w in sorted({w for s in stats for w in s["windows"]}):
        files = [(f"part-{f:05d}.parquet", *written[f][w]) for f in range(slots) if w in written[f]]
        write_window_index(out_dir, w, files, row_group_rows, int_context_columns(schema))
    windows = sorted(rows_w)
    if old:
        bad.merge(BadRows(on_bad_rows, rows=old["bad_rows"], files=old["skipped_files"]))
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
        "format": 2,
        "source": source,
        "in_dirs": (old or {}).get("in_dirs", []) + [os.path.abspath(in_dir)],
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
        "fragments": first_fragment + len(frags),
        "task_mb": task_mb,
        "files_per_window": slots,
        "row_group_rows": row_group_rows,
        "seconds": round(report.seconds, 3),
    }
    write_meta(out_dir, meta)
    return report


def _append_base(out_dir: str, source: str, window: str, max_len: int, group: int) -> dict:
    """The prepared set an append extends; its settings must match this run's."""
    meta = read_meta(out_dir)
    want = {"source": source, "window": str(window), "max_len": max_len, "row_group_rows": group}
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if meta.get("format") != 2 or not os.path.isdir(os.path.join(out_dir, TAIL_DIR)):
        raise DataError(
            out_dir,
            "has no user tails (_tail/) to append to",
            fix="prepare all days once without --append (this genrec writes the tails)",
        )
    if diff:
        raise DataError(
            out_dir,
            f"was prepared with other settings {{key: (prepared, now)}} {diff}",
            fix="append with the prepared settings, or prepare all days afresh",
        )
    return meta


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


def _write_items(refs: list, path: str, old: pa.Table | None = None) -> int:
    """items.parquet from the item tasks' tables (plus the old counts on append)."""
    import ray

    tables = [old] if old is not None else []
    if old is None:
        writer = pq.ParquetWriter(path, schemas.ITEMS)
    total = 0
    try:
        for ref in tqdm(refs, desc="prepare: items", file=sys.stderr, disable=None):
            table = ray.get(ref)
            if old is None:
                writer.write_table(table)
                total += table.num_rows
            else:
                tables.append(table)
    finally:
        if old is None:
            writer.close()
    if old is None:
        return total
    summed = pa.concat_tables(tables).group_by("item_id").aggregate([("count", "sum")])
    out = pa.table(
        {"item_id": summed.column("item_id"), "count": summed.column("count_sum")},
        schema=schemas.ITEMS,
    ).sort_by("item_id")
    pq.write_table(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    return out.num_rows


def _clear_outputs(out_dir: str) -> None:
    """Remove a previous run's outputs (the meta file first: never a stale complete dir)."""
    os.makedirs(out_dir, exist_ok=True)
    for name in (schemas.META_FILE, ITEMS_FILE):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    extra = [os.path.join(out_dir, TMP_DIR), os.path.join(out_dir, TAIL_DIR)]
    for d in glob.glob(os.path.join(out_dir, "window=*")) + extra:
        shutil.rmtree(d, ignore_errors=True)
