"""The adapter engine: a declarative `FileKind` per kind of file, read batch by batch.

A source is planned into `Fragment`s (a Parquet file, or a run of its row groups; a text
file), and each fragment is read with pyarrow.dataset in bounded batches that come out in
the canonical events schema (`schemas.events_schema(source.context)`). Nothing ever holds a
whole data set in memory.

Order keys. Sources with real time write seconds into `timestamp`. Sources whose files are
in time order but carry no time (VK-LSVD weeks, text sequences) set
`timestamp = (window << ORDER_SHIFT) | row`, where `row` counts rows inside the natural
window in file order, and every event of such a fragment belongs to `fragment.window`.

Item namespacing. A source with several item domains (T-ECD) stores
`item_id = (domain << NAMESPACE_SHIFT) | raw_item_id`; raw ids must be below 2**56 (checked),
so ids of different domains can never collide and `item_id >> 56` recovers the domain.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from genrec.data_pipeline import schemas
from genrec.data_pipeline.validation import (
    EMPTY,
    UNKNOWN_ACTION,
    UNREADABLE,
    BadRows,
    DataError,
    check_ids,
    check_schema,
)

ORDER_SHIFT = 40  # row-ordered sources: timestamp = window << 40 | row in window
NAMESPACE_SHIFT = 56  # multi-domain sources: item_id = domain << 56 | raw item id
MAX_RAW_ID = (1 << NAMESPACE_SHIFT) - 1
ROWS_PER_FRAGMENT = 1_000_000
BATCH_ROWS = 65_536

# a context value: a source column name, a constant, or a function of the raw batch
ContextSpec = str | int | float | Callable[[pa.RecordBatch], np.ndarray]


@dataclass(frozen=True)
class Fragment:
    """A unit of reading work: a file, or a run of a Parquet file's row groups."""

    path: str
    index: int  # position in the plan: breaks timestamp ties in file order
    kind: int = 0  # which FileKind of the source
    row_groups: tuple[int, ...] | None = None  # None: the whole file
    first_row: int = 0  # row number (inside the file) of the fragment's first row
    num_rows: int = -1  # -1: unknown until read
    window: int = 0  # row-ordered fragments: their natural window
    order_base: int = 0  # row-ordered fragments: rows before this one in its window
    row_ordered: bool = False  # True: timestamp is an order key, window is `window`


@dataclass
class FileKind:
    """How one kind of file of a source maps onto canonical events (the declarative part)."""

    glob: str  # relative to the source directory, e.g. "marketplace/events/*.pq"
    types: dict[str, str]  # required source columns -> kind (int, float, bool, str, time)
    user: str  # source column with the user id
    item: str  # source column with the item id
    time: str | None = None  # source column with time; None: row order (see module doc)
    time_scale: int = 1  # integer time * time_scale = seconds (Yambda: 5-second bins)
    action: str | None = None  # string column mapped through `actions` (named in errors)
    actions: dict[str, str] = field(default_factory=dict)  # source value -> ACTIONS name
    action_fn: Callable[[pa.RecordBatch], np.ndarray] | None = None  # overrides `action`
    constant_action: str = "view"  # when neither action nor action_fn is given
    context: dict[str, ContextSpec] = field(default_factory=dict)  # canonical -> spec
    domain: int = 0  # item namespace (only used when the source namespaces items)
    window_pattern: str = ""  # row-ordered kinds: regex whose group 1 is the window ("": 0)


@dataclass
class ParquetSource:
    """A source made of Parquet files of one or more `FileKind`s."""

    name: str
    kinds: list[FileKind]
    context: tuple[str, ...] = ()
    namespaced: bool = False  # item_id = domain << 56 | raw id
    rows_per_fragment: int = ROWS_PER_FRAGMENT
    batch_rows: int = BATCH_ROWS

    @property
    def schema(self) -> pa.Schema:
        return schemas.events_schema(self.context)

    # ------------------------------------------------------------------ planning
    def resolve_dir(self, in_dir: str) -> str:
        if not os.path.isdir(in_dir):
            raise DataError(in_dir, "is not a directory", fix=f"pass the {self.name} root")
        return in_dir

    def kind_files(self, root: str) -> list[tuple[int, str]]:
        """(kind index, path) of every file of the layout, in a stable order."""
        out = []
        for k, kind in enumerate(self.kinds):
            out += [(k, p) for p in sorted(glob.glob(os.path.join(root, kind.glob)))]
        return out

    def plan(self, in_dir: str, bad: BadRows) -> list[Fragment]:
        """Footers only: check every file early, split big ones into row-group runs."""
        root = self.resolve_dir(in_dir)
        files = self.kind_files(root)
        if not files:
            globs = [k.glob for k in self.kinds]
            raise DataError(
                root,
                f"no {self.name} files found (looked for {globs})",
                fix="point --in at the source's root directory",
            )
        found = []
        for k, path in files:
            kind = self.kinds[k]
            meta = _open_footer(path, bad)
            if meta is None:
                continue
            if not check_schema(
                meta.schema.to_arrow_schema(), kind.types, path, bad, meta.num_rows
            ):
                continue
            window = 0
            if kind.time is None and kind.window_pattern:  # no pattern: all in window 0
                m = re.search(kind.window_pattern, os.path.basename(path))
                if not m:
                    raise DataError(
                        path,
                        f"file name does not match {kind.window_pattern!r}",
                        fix="keep the source's file naming",
                    )
                window = int(m.group(1))
            found.append((window, path, k, meta))
        # row-ordered files: order inside a window follows the path order
        found.sort(key=lambda f: (f[0], f[1]) if self.kinds[f[2]].time is None else (-1, ""))
        frags: list[Fragment] = []
        window_rows: dict[int, int] = {}
        for window, path, k, meta in found:
            row_ordered = self.kinds[k].time is None
            first, run, run_rows = 0, [], 0
            groups = [(g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
            for i, (g, n) in enumerate(groups):
                run.append(g)
                run_rows += n
                if run_rows >= self.rows_per_fragment or i == len(groups) - 1:
                    base = window_rows.get(window, 0)
                    frags.append(
                        Fragment(
                            path,
                            len(frags),
                            k,
                            tuple(run),
                            first,
                            run_rows,
                            window,
                            base,
                            row_ordered,
                        )
                    )
                    if row_ordered:
                        window_rows[window] = base + run_rows
                    first += run_rows
                    run, run_rows = [], 0
        return frags

    # ------------------------------------------------------------------ reading
    def read(self, frag: Fragment, bad: BadRows) -> Iterator[pa.RecordBatch]:
        """Canonical event batches of one fragment (bad rows raise or are skipped)."""
        kind = self.kinds[frag.kind]
        row = frag.first_row
        try:
            pfrag = next(iter(ds.dataset(frag.path, format="parquet").get_fragments()))
            if frag.row_groups is not None:
                pfrag = pfrag.subset(row_group_ids=list(frag.row_groups))
            batches = pfrag.to_batches(columns=list(kind.types), batch_size=self.batch_rows)
            for raw in batches:
                out = self._convert(raw, kind, frag, row, bad)
                row += raw.num_rows
                if out.num_rows:
                    yield out
        except (pa.ArrowInvalid, OSError) as e:
            read = row - frag.first_row
            bad.file_problem(
                UNREADABLE,
                frag.path,
                f"cannot be read past row {read}: {e}",
                fix="re-download or rewrite the file",
                num_rows=max(0, frag.num_rows - read),
            )

    def _convert(
        self, raw: pa.RecordBatch, kind: FileKind, frag: Fragment, row: int, bad: BadRows
    ) -> pa.RecordBatch:
        n = raw.num_rows
        ids = {kind.user: raw.column(kind.user), kind.item: raw.column(kind.item)}
        if kind.time is not None:
            ids[kind.time] = raw.column(kind.time)
        keep = check_ids(
            ids, frag.path, row, bad, max_value=MAX_RAW_ID if self.namespaced else 2**63 - 1
        )
        user = _to_int64(raw.column(kind.user))
        item = _to_int64(raw.column(kind.item))
        if self.namespaced:
            item = item | np.int64(kind.domain << NAMESPACE_SHIFT)
        if kind.time is not None:
            ts = _to_seconds(raw.column(kind.time), kind.time_scale)
        else:
            ts = (
                (np.int64(frag.window) << ORDER_SHIFT)
                + frag.order_base
                + (row - frag.first_row + np.arange(n, dtype=np.int64))
            )
        action = self._actions(raw, kind)
        bad_action = action < 0
        if keep is not None:
            bad_action &= keep  # rows already counted under another reason
        if bad_action.any():
            first = int(np.argmax(bad_action))
            value = raw.column(kind.action)[first].as_py() if kind.action else None
            bad.problem(
                UNKNOWN_ACTION,
                frag.path,
                f"unknown action {value!r} (known: {sorted(kind.actions)})",
                column=kind.action or "action",
                row=row + first,
                fix="map it in the source's FileKind.actions",
                count=int(bad_action.sum()),
            )
            keep = (np.ones(n, bool) if keep is None else keep) & ~bad_action
        cols = [user, item, ts, action.astype(np.int32)]
        for name in self.context:
            cols.append(_context(raw, kind, name, n))
        out = pa.RecordBatch.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(cols, self.schema)], schema=self.schema
        )
        return out if keep is None else out.filter(pa.array(keep))

    def _actions(self, raw: pa.RecordBatch, kind: FileKind) -> np.ndarray:
        if kind.action_fn is not None:
            return kind.action_fn(raw)
        if kind.action is None:
            return np.full(raw.num_rows, schemas.ACTIONS[kind.constant_action], np.int32)
        return map_actions(raw.column(kind.action), kind.actions)


# --------------------------------------------------------------------------- helpers


def _open_footer(path: str, bad: BadRows) -> pq.FileMetaData | None:
    size = os.path.getsize(path)
    if size == 0:
        bad.file_problem(EMPTY, path, "is empty (0 bytes)", fix="re-download or remove it")
        return None
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as e:
        bad.file_problem(
            UNREADABLE,
            path,
            f"is not a readable Parquet file ({e})",
            fix="re-download or rewrite the file (truncated or not Parquet?)",
        )
        return None
    if meta.num_rows == 0:
        bad.file_problem(EMPTY, path, "has no rows", fix="remove it or write its events")
        return None
    return meta


def map_actions(col: pa.Array, mapping: dict[str, str]) -> np.ndarray:
    """Source action values -> ACTIONS codes; unknown or null values become -1."""
    enc = pc.dictionary_encode(col) if not pa.types.is_dictionary(col.type) else col
    names = enc.dictionary.to_pylist()
    lut = np.array([schemas.ACTIONS.get(mapping.get(v, ""), -1) for v in names] + [-1], np.int32)
    return lut[pc.fill_null(enc.indices, len(names)).to_numpy(zero_copy_only=False)]


def _to_int64(arr: pa.Array) -> np.ndarray:
    return pc.fill_null(arr, 0).cast(pa.int64(), safe=False).to_numpy(zero_copy_only=False)


_UNIT_PER_SECOND = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}


def _to_seconds(arr: pa.Array, scale: int) -> np.ndarray:
    if pa.types.is_timestamp(arr.type):
        return _to_int64(arr.cast(pa.int64())) // _UNIT_PER_SECOND[arr.type.unit]
    return _to_int64(arr) * scale


def _context(raw: pa.RecordBatch, kind: FileKind, name: str, n: int) -> np.ndarray:
    dtype = schemas.CONTEXT_FIELDS[name].to_pandas_dtype()
    spec = kind.context.get(name, 0)
    if callable(spec):
        return np.asarray(spec(raw), dtype=dtype)
    if isinstance(spec, str):
        col = pc.fill_null(raw.column(spec), 0)
        return col.cast(schemas.CONTEXT_FIELDS[name], safe=False).to_numpy(zero_copy_only=False)
    return np.full(n, spec, dtype=dtype)


def bool_col(raw: pa.RecordBatch, name: str) -> np.ndarray:
    return pc.fill_null(raw.column(name), False).to_numpy(zero_copy_only=False).astype(bool)


def num_col(raw: pa.RecordBatch, name: str) -> np.ndarray:
    return pc.fill_null(raw.column(name), 0).to_numpy(zero_copy_only=False).astype(np.float64)
