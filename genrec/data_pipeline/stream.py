"""Stream prepared sequence shards into per-rank jagged Batches: time order, one pass, resumable.

    stream = open_stream(cfg.data, prepared_dir, rank, world_size, batch_size=128, max_len=50)
    for batch in stream:            # windows in time order, each exactly once
        ...
        save(stream.position.to_dict())

Order. Inside a window there is ONE global row order, the same on every rank and for every
world size, defined over the window's row groups ("units", listed in window=W/_index.json):
full units in file order, then each file's short last unit, rows in file order; with
`shuffle_buffer = S > 0` blocks of ~S rows of full units are permuted and each unit's rows
too, all by generators seeded with (seed, window, ...), so any position is recomputed
without state (row_order.WindowOrder).

Steps. A global step consumes the next `world_size * batch_size` rows of that order; rank
r gets rows [r * batch_size, (r + 1) * batch_size) of them. Every rank therefore yields
exactly ceil(remaining rows / (world_size * batch_size)) batches per window. A rank whose
slice of a step is empty (or holds no targets) yields a *filler* batch: one sequence of
one real token (the window's first event, kept in its index) with num_targets=0, which
adds no loss and no metrics but keeps collectives in lockstep. A batch never mixes windows.

Reading. Rank r reads and decodes only the row groups under its own positions, ahead of
the step in `cfg.read_threads` threads (shard_reader.read_ahead). When row_group_rows
divides batch_size every full unit is decoded by exactly one rank (only the window's last
steps, over the short units, may share one); otherwise a row group that straddles two
ranks' slices is decoded by both (`stats["decoded_rows"]` counts what this rank decoded).

Position. `StreamPosition(window, offset)` counts rows of `window` consumed by all ranks
together, so it does not depend on the world size: a stream saved at 2 ranks resumes at 1
(or 4) rank(s) without skipping or repeating a row. After the last step of a window the
offset equals the window's row count.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from genrec.config import DataConfig
from genrec.data_pipeline.batch import (
    BadRowError,
    Batch,
    SequenceRows,
    concat_rows,
    filler_batch,
)
from genrec.data_pipeline.row_order import WindowOrder
from genrec.data_pipeline.schemas import SEQUENCES, sequences_schema, window_dir
from genrec.data_pipeline.shard_index import (  # noqa: F401 - the stream's public names
    WindowIndex,
    list_windows,
    load_window_index,
    read_meta,
    window_rows,
    write_sequence_shards,
)
from genrec.data_pipeline.shard_reader import RowGroupReader, read_ahead


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


@dataclass
class _Step:
    """One global step as this rank sees it: its own pieces of the window's order."""

    order: WindowOrder
    offset: int  # position of the step's first row
    size: int  # rows of the step (all ranks)
    mine_at: int  # position of this rank's first row
    pieces: list  # [(unit, a, b)] of this rank's rows

    @property
    def keys(self) -> list[tuple[int, int]]:
        return [(self.order.index.window, u) for u, _, _ in self.pieces]


class SequenceStream:
    """One rank's view of the prepared windows; iterate it to get Batches (see module doc)."""

    def __init__(
        self,
        cfg: DataConfig,
        rows: dict[int, int],
        rank: int,
        world_size: int,
        batch_size: int,
        max_len: int,
        position: StreamPosition,
        prepared_dir: str,
        context: tuple[str, ...] = (),
    ):
        if not 0 <= rank < world_size or batch_size < 1 or max_len < 1:
            raise ValueError(
                f"need 0 <= rank < world_size, batch_size >= 1, max_len >= 1; got rank={rank} "
                f"world_size={world_size} batch_size={batch_size} max_len={max_len}"
            )
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch_size, self.max_len = batch_size, max_len
        self._rows = dict(rows)
        self.windows = sorted(rows)
        self.position = position
        self.prepared_dir = prepared_dir
        self.context = tuple(context)
        self.columns = [f.name for f in SEQUENCES] + list(self.context)
        self._schema = sequences_schema(self.context)
        self._reader = RowGroupReader(self.columns)
        # per rank: rows, their events, sequences/tokens/targets yielded, fillers, rows
        # without targets, skipped bad rows (of this rank's rows); decoded_rows: rows this
        # rank decoded (its own, plus others' in row groups it shares with them)
        keys = "rows row_events sequences tokens targets fillers no_target_rows bad_rows"
        self.stats = dict.fromkeys(keys.split() + ["decoded_rows"], 0)

    # ---- sizes
    def window_rows(self, window: int) -> int:
        return self._rows[window]

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
        """Nothing to release (the reader threads end with the iteration); kept for callers."""

    def _index(self, window: int) -> WindowIndex:
        index = load_window_index(self.prepared_dir, window, self.window_rows(window))
        if index.context != self.context:
            raise ValueError(
                f"{index.path}: context columns {list(index.context)} differ from "
                f"{list(self.context)} of the first streamed window; re-run `genrec prepare`"
            )
        return index

    def _plan(self, start: StreamPosition) -> Iterator[_Step]:
        """This rank's pieces of every remaining global step, in order."""
        todo = [w for w in self.windows if w >= start.window]
        offset = start.offset if todo and todo[0] == start.window else 0
        per_step, b = self.world_size * self.batch_size, self.batch_size
        for w in todo:
            n = self.window_rows(w)
            if offset >= n:
                offset = 0
                continue
            order = WindowOrder(self._index(w), self.cfg.shuffle_buffer, self.cfg.seed)
            while offset < n:
                size = min(per_step, n - offset)
                lo = offset + self.rank * b
                hi = min(lo + b, offset + size)
                yield _Step(order, offset, size, lo, order.pieces(lo, hi) if lo < hi else [])
                offset += size
            offset = 0

    def _load(self, key: tuple[int, int], order: WindowOrder) -> SequenceRows:
        """Read, order and decode one unit (runs in a reader thread)."""
        unit = key[1]
        table = self._reader.read(
            order.index, int(order.unit_file[unit]), int(order.unit_group[unit])
        )
        perm = order.row_perm(unit)
        if perm is not None:
            table = table.take(pa.array(perm))
        return self._decode(table)

    def _decode(self, table: pa.Table) -> SequenceRows:
        if table.schema != self._schema:
            table = table.select(self.columns).cast(self._schema)
        try:
            return SequenceRows(
                table, self.max_len, self.context, skip_bad=self.cfg.on_bad_rows == "skip"
            )
        except BadRowError as e:
            raise BadRowError(
                f"{e}. Fix the shards in {self.prepared_dir or 'the prepared dir'} (re-run "
                "`genrec prepare`) or set data.on_bad_rows=skip to skip and count such rows"
            ) from None

    def _steps(self, start: StreamPosition) -> Iterator[tuple[Batch, StreamPosition]]:
        orders: dict[int, WindowOrder] = {}

        def units_of(step: _Step) -> list:
            orders[step.order.index.window] = step.order
            return step.keys

        def load(key: tuple[int, int]) -> SequenceRows:
            return self._load(key, orders[key[0]])

        g = max(1, self.cfg.read_threads)
        depth = 2 * g + 2 * math.ceil(self.batch_size / 64)
        seen: set = set()
        for step, loaded in read_ahead(self._plan(start), units_of, load, g, depth):
            for k in step.keys:
                if k not in seen:
                    self.stats["decoded_rows"] += loaded[k].num_rows
            seen = set(step.keys)
            for w in list(orders):
                if w < step.order.index.window:
                    del orders[w]
            pieces = [(loaded[k], a, b) for k, (_, a, b) in zip(step.keys, step.pieces)]
            w = step.order.index.window
            yield self._rank_batch(step, pieces), StreamPosition(w, step.offset + step.size)

    def _rank_batch(self, step: _Step, mine: list) -> Batch:
        """This rank's slice of one global step (each rank checks its own rows)."""
        window, at = step.order.index.window, step.mine_at
        s = self.stats
        for rows, lo, hi in mine:
            wrong = np.flatnonzero(rows.windows[lo:hi] != window)
            if wrong.size:
                i = int(wrong[0])
                raise ValueError(
                    f"{window_dir(window)}: stream row {at + i} (user_id "
                    f"{rows.user_ids[lo + i]}) has window {rows.windows[lo + i]}; a shard sits "
                    "in the wrong window directory: re-run `genrec prepare`"
                )
            at += hi - lo
            s["rows"] += hi - lo
            s["row_events"] += int(rows.n[lo:hi].sum())
            s["bad_rows"] += int(rows.bad[lo:hi].sum())
            s["no_target_rows"] += int(((rows.chunks_per_row[lo:hi] == 0) & ~rows.bad[lo:hi]).sum())
        batch = concat_rows(mine) if mine else None
        if batch is None or batch.batch_size == 0:
            s["fillers"] += 1
            tok = step.order.index.filler
            return filler_batch(
                tok["item_ids"],
                tok["actions"],
                tok["timestamps"],
                tok["user_id"],
                window,
                {c: tok["context"][c] for c in self.context},
            )
        s["sequences"] += batch.batch_size
        s["tokens"] += batch.num_tokens
        s["targets"] += int(batch.num_targets.numpy().sum())
        return batch


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
    """Rank `rank`'s stream over `windows` (default: cfg.windows, else all prepared ones).

    Reads _meta.json and the first window's index only: no footers (see shard_index)."""
    meta = read_meta(prepared_dir)
    prepared = sorted(int(w) for w in meta["windows"])
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
    rows = window_rows(meta, prepared_dir)
    uncounted = [w for w in wanted if w not in rows]
    if uncounted:
        raise ValueError(
            f"{prepared_dir}/_meta.json: windows {uncounted} have no rows_per_window entry; "
            "re-run `genrec prepare`"
        )
    context = load_window_index(prepared_dir, wanted[0]).context if wanted else ()
    return SequenceStream(
        cfg,
        {w: rows[w] for w in wanted},
        rank,
        world_size,
        batch_size,
        max_len,
        position,
        prepared_dir,
        context,
    )
