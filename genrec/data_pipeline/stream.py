"""Stream prepared sequence shards into per-rank jagged Batches: time order, one pass, resumable.

    stream = open_stream(cfg.data, prepared_dir, rank, world_size, batch_size=128, max_len=50)
    for batch in stream:            # windows in time order, each exactly once
        ...
        save(stream.position.to_dict())

Order. Inside a window there is ONE global row order, the same on every rank: the shard
files in name order, rows in file order; with `shuffle_buffer = S > 0` the window is cut
into consecutive blocks of S rows and each block is permuted by a generator seeded with
(seed, window, block). So a row moves less than S places, memory stays at one block, and
any position can be recomputed without state.

Steps. A global step consumes the next `world_size * batch_size` rows of that order; rank
r gets rows [r * batch_size, (r + 1) * batch_size) of them. Every rank therefore yields
exactly ceil(remaining rows / (world_size * batch_size)) batches per window. A rank whose
slice of the last step is empty (or holds no targets) yields a *filler* batch: one
sequence of one real token (the step's first event) with num_targets=0, which adds no loss
and no metrics but keeps collectives in lockstep. A batch never mixes windows.

Position. `StreamPosition(window, offset)` counts rows of `window` consumed by all ranks
together, so it does not depend on the world size: a stream saved at 2 ranks resumes at 1
(or 4) rank(s) without skipping or repeating a row. After the last step of a window the
offset equals the window's row count.

Readers (`cfg.reader`). "local": pyarrow reads the shards in a background thread.
"ray": Ray Data reads them (`read_parquet`, order preserved, object store capped at
`cfg.object_store_mb`) in Ray workers that run ahead of the consumer. Both feed the same
stepper, so they yield identical Batches. Each rank reads every row of a window (a rank's
rows are interleaved with the others' to keep one global order) but turns only its own
rows into tensors; decoding is the cheap part.
"""

from __future__ import annotations

import json
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genrec.config import DataConfig
from genrec.data_pipeline.batch import (
    BadRowError,
    Batch,
    SequenceRows,
    concat_rows,
    filler_batch,
)
from genrec.data_pipeline.schemas import CONTEXT_FIELDS, META_FILE, SEQUENCES, window_dir

READ_BATCH_ROWS = 8192  # rows per table the local reader hands over


@dataclass
class StreamPosition:
    """Where a stream stands: `offset` rows of `window` consumed by all ranks together."""

    window: int
    offset: int = 0

    def to_dict(self) -> dict:
        return {"window": int(self.window), "offset": int(self.offset)}

    @classmethod
    def from_dict(cls, d: dict) -> StreamPosition:
        if not isinstance(d, dict) or set(d) != {"window", "offset"}:
            raise ValueError(f"a stream position is {{'window': int, 'offset': int}}, got {d!r}")
        if int(d["offset"]) < 0:
            raise ValueError(f"stream position offset must be >= 0, got {d!r}")
        return cls(window=int(d["window"]), offset=int(d["offset"]))


@dataclass(frozen=True)
class WindowShards:
    """One window's shard files (name order) and their row counts (from the footers)."""

    window: int
    files: tuple[str, ...]
    file_rows: tuple[int, ...]
    context: tuple[str, ...] = ()  # integer context list columns (extra KJT keys)

    @property
    def num_rows(self) -> int:
        return sum(self.file_rows)


# --------------------------------------------------------------------------- metadata


def read_meta(prepared_dir: str) -> dict:
    path = Path(prepared_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run `genrec prepare` first (it writes {META_FILE} last, so "
            "a directory without it holds an unfinished prepare)"
        )
    meta = json.loads(path.read_text())
    if not isinstance(meta.get("windows"), list):
        raise ValueError(f"{path}: needs a 'windows' list; re-run `genrec prepare`")
    return meta


def list_windows(prepared_dir: str) -> list[int]:
    """The prepared windows in time order (from _meta.json)."""
    raw = read_meta(prepared_dir)["windows"]
    return sorted(int(w["window"] if isinstance(w, dict) else w) for w in raw)


def _check_schema(path: str, schema: pa.Schema) -> None:
    for want in SEQUENCES:
        if want.name not in schema.names:
            raise ValueError(
                f"{path}: column {want.name!r} is missing; sequence shards follow "
                "schemas.SEQUENCES (re-run `genrec prepare`)"
            )
        got = schema.field(want.name).type
        same = (
            pa.types.is_list(got) and got.value_type == want.type.value_type
            if pa.types.is_list(want.type)
            else got == want.type
        )
        if not same:
            raise ValueError(
                f"{path}: column {want.name!r} is {got}, expected {want.type} "
                "(schemas.SEQUENCES); re-run `genrec prepare`"
            )


def window_shards(prepared_dir: str, window: int) -> WindowShards:
    """List and check one window's shard files; row counts come from the Parquet footers."""
    wdir = Path(prepared_dir) / window_dir(window)
    files = sorted(str(p) for p in wdir.glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{wdir}: no part-*.parquet files; re-run `genrec prepare`")
    rows, context = [], None
    for f in files:
        meta = pq.read_metadata(f)
        schema = meta.schema.to_arrow_schema()
        _check_schema(f, schema)
        rows.append(meta.num_rows)
        if context is None:
            context = int_context_columns(schema)
        elif int_context_columns(schema) != context:
            raise ValueError(
                f"{f}: context columns {list(int_context_columns(schema))} differ from "
                f"{list(context)} in {files[0]}; every shard needs the same columns"
            )
    return WindowShards(window, tuple(files), tuple(rows), context or ())


def int_context_columns(schema: pa.Schema) -> tuple[str, ...]:
    """Integer context list columns of a shard: they become extra KJT keys of the Batch."""
    return tuple(
        c
        for c in CONTEXT_FIELDS
        if c in schema.names
        and pa.types.is_list(schema.field(c).type)
        and pa.types.is_integer(schema.field(c).type.value_type)
    )


def write_sequence_shards(
    prepared_dir: str, rows: pa.Table, rows_per_file: int = 1 << 16, row_group_rows: int = 8192
) -> list[int]:
    """Write sequence-schema rows as prepared shards + _meta.json (tests, benchmarks, demos).

    Rows are grouped by their window column, kept in their given order inside a window and
    split into part files of `rows_per_file` rows. Returns the windows written.
    """
    out = Path(prepared_dir)
    windows = sorted(int(w) for w in pc.unique(rows.column("window")).to_pylist())
    counts = {}
    for w in windows:
        part = rows.filter(pc.equal(rows.column("window"), w))
        (out / window_dir(w)).mkdir(parents=True, exist_ok=True)
        for i, start in enumerate(range(0, max(part.num_rows, 1), rows_per_file)):
            piece = part.slice(start, rows_per_file)
            path = out / window_dir(w) / f"part-{i:05d}.parquet"
            pq.write_table(piece, path, row_group_size=row_group_rows)
        counts[str(w)] = part.num_rows
    meta = {"windows": windows, "rows": counts, "source": "write_sequence_shards"}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return windows


# --------------------------------------------------------------------------- readers


def local_tables(files: list[str], skip: int, columns: list[str]) -> Iterator[pa.Table]:
    """Rows of `files` in order, starting `skip` rows into the first file (pyarrow)."""
    for path in files:
        pf = pq.ParquetFile(path)
        first = 0  # whole leading row groups are skipped without decoding them
        while first < pf.metadata.num_row_groups and skip >= pf.metadata.row_group(first).num_rows:
            skip -= pf.metadata.row_group(first).num_rows
            first += 1
        groups = list(range(first, pf.metadata.num_row_groups))
        for rb in pf.iter_batches(READ_BATCH_ROWS, row_groups=groups, columns=columns):
            if skip >= rb.num_rows:
                skip -= rb.num_rows
                continue
            yield pa.Table.from_batches([rb.slice(skip)])
            skip = 0


def ray_tables(
    files: list[str], skip: int, columns: list[str], num_rows: int, cfg: DataConfig
) -> Iterator[pa.Table]:
    """Rows of `files` in order via Ray Data: reads run ahead in Ray workers, bounded memory.

    Tuned on a 2-core box (10M events): the V1 Parquet datasource with about one block
    per READ_BATCH_ROWS rows and the executor's metric/poll/issue-detector threads off ran
    ~6x faster than the defaults (V2 made 3 blocks of up to 130 MB and read them serially).
    """
    from ray.data import DataContext, read_parquet

    ctx = DataContext.get_current()
    saved, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = read_parquet(
            files,
            columns=columns,
            partitioning=None,
            file_extensions=None,
            override_num_blocks=max(len(files), math.ceil(num_rows / READ_BATCH_ROWS)),
        )
    finally:
        ctx.use_datasource_v2 = saved
    c = ds.context  # this dataset's own copy
    c.execution_options.preserve_order = True
    limits = c.execution_options.resource_limits
    c.execution_options.resource_limits = limits.copy(
        object_store_memory=cfg.object_store_mb * 2**20
    )
    c.enable_per_node_metrics = c.enable_stats_summary_collection = False
    c.enable_get_object_locations_for_metrics = c.enable_auto_log_stats = False
    c.memory_usage_poll_interval_s = None
    c.issue_detectors_config.detectors = []
    batches = ds.iter_batches(
        batch_size=None, batch_format="pyarrow", prefetch_batches=max(1, cfg.prefetch_batches)
    )
    for t in batches:
        if skip >= t.num_rows:
            skip -= t.num_rows
            continue
        yield t.slice(skip)
        skip = 0


# --------------------------------------------------------------------------- ordering

Pieces = list[tuple[SequenceRows, int, int]]  # row ranges [lo, hi) of decoded blocks, in order


class _Fifo:
    """FIFO of rows over an iterator of row containers: `pop(n)` gives the next n rows."""

    def __init__(self, items: Iterator):
        self._items = items
        self._buf: deque = deque()  # [container, lo, hi]
        self._size = 0

    def pop(self, n: int) -> list[tuple]:
        while self._size < n:
            item = next(self._items, None)
            if item is None:
                raise RuntimeError("shard files ended before their footers' row counts")
            if item.num_rows:
                self._buf.append([item, 0, item.num_rows])
                self._size += item.num_rows
        out, need = [], n
        while need:
            item, lo, hi = self._buf[0]
            take = min(need, hi - lo)
            out.append((item, lo, lo + take))
            if take == hi - lo:
                self._buf.popleft()
            else:
                self._buf[0][1] = lo + take
            need -= take
        self._size -= n
        return out


def shuffle_block(seed: int, window: int, block: int, size: int) -> np.ndarray:
    """The permutation applied to rows [block * S, block * S + size) of a window."""
    return np.random.default_rng([seed, window, block]).permutation(size)


class _WindowOrder:
    """A window's rows in the stream's global order, popped as pieces from `offset` on.

    Without shuffling the input blocks pass straight through; with a buffer of S rows each
    block of S input rows is permuted (`shuffle_block`) and decoded as one SequenceRows.
    """

    def __init__(self, source: _Fifo, num_rows: int, offset: int, buffer: int, seed: int, w: int):
        self._src, self._n, self._buffer, self._seed, self._w = source, num_rows, buffer, seed, w
        if buffer > 0:  # the reader starts at the block holding `offset`
            self._next = offset // buffer
            self._block: SequenceRows | None = None
            self._pos, self._drop = 0, offset - self._next * buffer

    def pop(self, n: int, decode: Callable[[pa.Table], SequenceRows]) -> Pieces:
        if self._buffer <= 0:
            return self._src.pop(n)
        out: Pieces = []
        while n:
            if self._block is None or self._pos == self._block.num_rows:
                size = min(self._buffer, self._n - self._next * self._buffer)
                pieces = self._src.pop(size)
                rows = pa.concat_tables([t.slice(lo, hi - lo) for t, lo, hi in pieces])
                perm = shuffle_block(self._seed, self._w, self._next, size)
                self._block = decode(rows.take(pa.array(perm)))
                self._next += 1
                self._pos, self._drop = self._drop, 0
            take = min(n, self._block.num_rows - self._pos)
            out.append((self._block, self._pos, self._pos + take))
            self._pos += take
            n -= take
        return out


def _subrange(pieces: Pieces, a: int, b: int) -> Pieces:
    """Rows [a, b) of the concatenation of `pieces`."""
    out, at = [], 0
    for rows, lo, hi in pieces:
        s, e = max(a - at, 0), min(b - at, hi - lo)
        if s < e:
            out.append((rows, lo + s, lo + e))
        at += hi - lo
    return out


# --------------------------------------------------------------------------- the stream


class SequenceStream:
    """One rank's view of the prepared windows; iterate it to get Batches (see module doc)."""

    def __init__(
        self,
        cfg: DataConfig,
        shards: list[WindowShards],
        rank: int,
        world_size: int,
        batch_size: int,
        max_len: int,
        position: StreamPosition,
        prepared_dir: str = "",
    ):
        if not 0 <= rank < world_size or batch_size < 1 or max_len < 1:
            raise ValueError(
                f"need 0 <= rank < world_size, batch_size >= 1, max_len >= 1; got rank={rank} "
                f"world_size={world_size} batch_size={batch_size} max_len={max_len}"
            )
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch_size, self.max_len = batch_size, max_len
        self._shards = {s.window: s for s in shards}
        self.windows = [s.window for s in shards]
        self.position = position
        self.prepared_dir = prepared_dir
        self.context = shards[0].context if shards else ()
        for s in shards:
            if s.context != self.context:
                raise ValueError(
                    f"{s.files[0]}: context columns {list(s.context)} differ from "
                    f"{list(self.context)} in {shards[0].files[0]}"
                )
        self.columns = [f.name for f in SEQUENCES] + list(self.context)
        schema = pq.read_schema(shards[0].files[0]) if shards else SEQUENCES
        self._schema = pa.schema([schema.field(c) for c in self.columns])
        # per rank: rows, their events, sequences/tokens/targets yielded, fillers, rows
        # without targets; bad_rows: skipped bad rows seen by this reader (all ranks' rows)
        keys = "rows row_events sequences tokens targets fillers no_target_rows bad_rows"
        self.stats = dict.fromkeys(keys.split(), 0)
        self._owns_ray = False

    # ---- sizes
    def window_rows(self, window: int) -> int:
        return self._shards[window].num_rows

    def num_batches(self, window: int) -> int:
        """Batches this stream still yields for `window` (the same on every rank)."""
        pos = self.position
        if window < pos.window:
            return 0
        done = pos.offset if window == pos.window else 0
        left = max(0, self.window_rows(window) - done)
        return math.ceil(left / (self.world_size * self.batch_size))

    # ---- iteration
    def __iter__(self) -> Iterator[Batch]:
        depth = self.cfg.prefetch_batches
        steps = self._steps(self.position)
        items = steps if depth <= 0 else _prefetched(steps, depth)
        try:
            for batch, pos in items:
                self.position = pos
                yield batch
        finally:
            items.close()

    def close(self) -> None:
        """Shut Ray down if this stream started it (open_stream with reader=ray)."""
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    def _decode(self, table: pa.Table) -> SequenceRows:
        if table.schema != self._schema:
            table = table.select(self.columns).cast(self._schema)
        try:
            rows = SequenceRows(
                table, self.max_len, self.context, skip_bad=self.cfg.on_bad_rows == "skip"
            )
        except BadRowError as e:
            raise BadRowError(
                f"{e}. Fix the shards in {self.prepared_dir or 'the prepared dir'} (re-run "
                "`genrec prepare`) or set data.on_bad_rows=skip to skip and count such rows"
            ) from None
        self.stats["bad_rows"] += rows.num_bad
        return rows

    def _steps(self, start: StreamPosition) -> Iterator[tuple[Batch, StreamPosition]]:
        todo = [w for w in self.windows if w >= start.window]
        offset = start.offset if todo and todo[0] == start.window else 0
        if todo and offset >= self.window_rows(todo[0]):
            todo, offset = todo[1:], 0
        if not todo:
            return
        buffer = self.cfg.shuffle_buffer
        skip = offset if buffer <= 0 else offset // buffer * buffer
        files = [f for w in todo for f in self._shards[w].files]
        before = np.cumsum((0, *self._shards[todo[0]].file_rows))
        fi = int(np.searchsorted(before, skip, side="right")) - 1
        skip -= int(before[fi])
        if self.cfg.reader == "ray":
            rows_left = sum(self.window_rows(w) for w in todo)
            tables = ray_tables(files[fi:], skip, self.columns, rows_left, self.cfg)
        else:
            tables = local_tables(files[fi:], skip, self.columns)
        source = _Fifo(tables if buffer > 0 else map(self._decode, tables))
        per_step = self.world_size * self.batch_size
        for w in todo:
            n = self.window_rows(w)
            order = _WindowOrder(source, n, offset, buffer, self.cfg.seed, w)
            while offset < n:
                size = min(per_step, n - offset)
                step = order.pop(size, self._decode)
                yield self._rank_batch(step, w, offset), StreamPosition(w, offset + size)
                offset += size
            offset = 0

    def _rank_batch(self, step: Pieces, window: int, offset: int) -> Batch:
        """This rank's slice of one global step; every rank checks the whole step."""
        at = offset
        for rows, lo, hi in step:
            wrong = np.flatnonzero(rows.windows[lo:hi] != window)
            if wrong.size:
                i = int(wrong[0])
                raise ValueError(
                    f"{window_dir(window)}: stream row {at + i} (user_id "
                    f"{rows.user_ids[lo + i]}) has window {rows.windows[lo + i]}; a shard sits "
                    "in the wrong window directory: re-run `genrec prepare`"
                )
            at += hi - lo
        lo = self.rank * self.batch_size
        mine = _subrange(step, lo, lo + self.batch_size)
        s = self.stats
        for rows, a, b in mine:
            s["rows"] += b - a
            s["row_events"] += int(rows.n[a:b].sum())
            s["no_target_rows"] += int(((rows.chunks_per_row[a:b] == 0) & ~rows.bad[a:b]).sum())
        batch = concat_rows(mine) if mine else None
        if batch is None or batch.batch_size == 0:
            s["fillers"] += 1
            return self._filler(step, window)
        s["sequences"] += batch.batch_size
        s["tokens"] += batch.num_tokens
        s["targets"] += int(batch.num_targets.numpy().sum())
        return batch

    def _filler(self, step: Pieces, window: int) -> Batch:
        """One real token (the step's first event) with num_targets=0: see the module doc."""
        for rows, lo, hi in step:
            tok = rows.first_token(lo, hi)
            if tok is not None:
                return filler_batch(
                    tok["item_ids"],
                    tok["actions"],
                    tok["timestamps"],
                    tok["user_id"],
                    window,
                    tok["context"],
                )
        return filler_batch(0, 0, 0, 0, window, dict.fromkeys(self.context, 0))


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Run `items` in a background thread, at most `depth` ahead (DataLoader-style)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put(x):
                    break
            else:
                put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failure(e))
        finally:
            items.close()

    thread = threading.Thread(target=work, name="genrec-stream-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is end:
                return
            if isinstance(x, _Failure):
                raise x.error
            yield x
    finally:
        stop.set()
        thread.join()


@dataclass
class _Failure:
    error: BaseException


def open_stream(
    cfg: DataConfig,
    prepared_dir: str,
    rank: int,
    world_size: int,
    batch_size: int,
    max_len: int,
    position: StreamPosition | None = None,
    windows: list[int] | None = None,
) -> SequenceStream:
    """Rank `rank`'s stream over `windows` (default: cfg.windows, else all prepared ones)."""
    prepared = list_windows(prepared_dir)
    wanted = sorted(set(windows or cfg.windows or prepared))
    missing = [w for w in wanted if w not in prepared]
    if missing:
        raise ValueError(
            f"windows {missing} are not prepared in {prepared_dir} (it has {prepared}); "
            "fix data.windows or re-run `genrec prepare`"
        )
    if position is None:
        position = StreamPosition(wanted[0] if wanted else 0, 0)
    elif position.offset > 0 and position.window not in wanted:
        raise ValueError(
            f"resume position {position.to_dict()} is inside window {position.window}, "
            f"which is not among the streamed windows {wanted}"
        )
    shards = [window_shards(prepared_dir, w) for w in wanted]
    stream = SequenceStream(
        cfg, shards, rank, world_size, batch_size, max_len, position, prepared_dir
    )
    if cfg.reader == "ray":
        from genrec.ray_runtime import init_ray

        stream._owns_ray = init_ray(cfg.num_cpus, cfg.object_store_mb, cfg.ray_address)
    return stream
