"""The index of a prepared directory: which files and row groups hold each window's rows.

    PREPARED/_meta.json                  windows, rows per window (the stream reads this at open)
    PREPARED/window=00017/_index.json    files in name order, rows per file, row_group_rows,
                                         integer context columns, the window's first event
    PREPARED/window=00017/part-00000.parquet ...

Every file's row groups hold exactly `row_group_rows` rows except its last, so the index
places every row group (a "unit" of the stream's order) without reading a footer.
`open_stream` reads `_meta.json` and the first window's index; a window's index is read
when the stream reaches that window; a rank opens a file's footer only when it reads one of
the file's row groups, and checks it against the index then (`check_file`).

Cost at T-ECD scale (1,300 daily windows, <= 256 files each): the indexes hold ~333k
file entries in all, read one window at a time; nothing at open grows with the file count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genrec.data_pipeline.batch import SequenceRows
from genrec.data_pipeline.schemas import CONTEXT_FIELDS, META_FILE, SEQUENCES, window_dir

INDEX_FILE = "_index.json"
INDEX_FORMAT = 1
FIX = "re-run `genrec prepare`"


@dataclass(frozen=True)
class WindowIndex:
    """One window's shard files and how their rows fall into row groups (units).

    Example: files of 12 and 5 rows with row_group_rows=5 give units (file, group, rows)
    (0, 0, 5) (0, 1, 5) (0, 2, 2) (1, 0, 5): unit ids 0..3 in file order.
    """

    window: int
    directory: str
    files: tuple[str, ...]  # names inside `directory`, name order
    file_rows: tuple[int, ...]
    row_group_rows: int
    context: tuple[str, ...] = ()  # integer context list columns (extra KJT keys)
    filler: dict = field(default_factory=dict)  # the window's first event (filler batches)

    @property
    def num_rows(self) -> int:
        return sum(self.file_rows)

    @property
    def path(self) -> str:
        return str(Path(self.directory) / INDEX_FILE)

    def units(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file index, row group, rows) of every unit, in file order."""
        g = self.row_group_rows
        groups = [math.ceil(n / g) for n in self.file_rows]
        file_of = np.repeat(np.arange(len(self.files)), groups)
        group = np.concatenate([np.arange(k) for k in groups]) if groups else np.zeros(0, int)
        rows = np.minimum(g, np.repeat(np.asarray(self.file_rows), groups) - group * g)
        return file_of, group.astype(np.int64), rows.astype(np.int64)

    def to_dict(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "window": self.window,
            "row_group_rows": self.row_group_rows,
            "files": list(self.files),
            "file_rows": list(self.file_rows),
            "context": list(self.context),
            "filler": self.filler,
        }


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
        raise ValueError(f"{path}: needs a 'windows' list; {FIX}")
    return meta


def list_windows(prepared_dir: str) -> list[int]:
    """The prepared windows in time order (from _meta.json)."""
    raw = read_meta(prepared_dir)["windows"]
    return sorted(int(w["window"] if isinstance(w, dict) else w) for w in raw)


def window_rows(meta: dict, prepared_dir: str) -> dict[int, int]:
    """Rows per window from _meta.json (the stream's step counts come from here)."""
    rows = meta.get("rows_per_window")
    if not isinstance(rows, dict):
        raise ValueError(
            f"{Path(prepared_dir) / META_FILE}: no 'rows_per_window' (written by an older "
            f"genrec); {FIX}"
        )
    return {int(w): int(n) for w, n in rows.items()}


def load_window_index(prepared_dir: str, window: int, num_rows: int | None = None) -> WindowIndex:
    """Read window=W/_index.json; its row count must match _meta.json's."""
    wdir = Path(prepared_dir) / window_dir(window)
    path = wdir / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the stream reads its index; {FIX}")
    d = json.loads(path.read_text())
    if d.get("format") != INDEX_FORMAT or int(d.get("window", -1)) != window:
        raise ValueError(f"{path}: format {d.get('format')} / window {d.get('window')}; {FIX}")
    index = WindowIndex(
        window=window,
        directory=str(wdir),
        files=tuple(d["files"]),
        file_rows=tuple(int(n) for n in d["file_rows"]),
        row_group_rows=int(d["row_group_rows"]),
        context=tuple(d["context"]),
        filler=d["filler"],
    )
    if num_rows is not None and index.num_rows != num_rows:
        raise ValueError(f"{path}: {index.num_rows} rows, but {META_FILE} says {num_rows}; {FIX}")
    return index


def check_schema(path: str, schema: pa.Schema, context: tuple[str, ...] = ()) -> None:
    for want in SEQUENCES:
        if want.name not in schema.names:
            raise ValueError(
                f"{path}: column {want.name!r} is missing; sequence shards follow "
                f"schemas.SEQUENCES ({FIX})"
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
                f"(schemas.SEQUENCES); {FIX}"
            )
    if int_context_columns(schema) != tuple(context):
        raise ValueError(
            f"{path}: context columns {list(int_context_columns(schema))} differ from the "
            f"index's {list(context)}; every shard needs the same columns ({FIX})"
        )


def check_file(path: str, meta: pq.FileMetaData, index: WindowIndex, file_i: int) -> None:
    """A shard's footer against the index: schema, rows, fixed row-group layout."""
    check_schema(path, meta.schema.to_arrow_schema(), index.context)
    g, rows = index.row_group_rows, index.file_rows[file_i]
    want = [min(g, rows - k * g) for k in range(math.ceil(rows / g))]
    got = [meta.row_group(k).num_rows for k in range(meta.num_row_groups)]
    if got != want:
        raise ValueError(
            f"{path}: row groups of {got[:4]}... rows, but {index.path} says {rows} rows in "
            f"groups of {g}; the file changed after prepare ({FIX})"
        )


def int_context_columns(schema: pa.Schema) -> tuple[str, ...]:
    """Integer context list columns of a shard: they become extra KJT keys of the Batch."""
    return tuple(
        c
        for c in CONTEXT_FIELDS
        if c in schema.names
        and pa.types.is_list(schema.field(c).type)
        and pa.types.is_integer(schema.field(c).type.value_type)
    )


# --------------------------------------------------------------------------- writing


def write_window_index(
    prepared_dir: str,
    window: int,
    files: list[tuple[str, int, dict | None]],
    row_group_rows: int,
    context: tuple[str, ...],
) -> WindowIndex:
    """Write window=W/_index.json from (file name, rows, its first event or None), name order;
    the filler is the first file's first event."""
    wdir = Path(prepared_dir) / window_dir(window)
    files = sorted(files)
    tokens = [t for _, _, t in files if t is not None]
    zero = {"item_ids": 0, "actions": 0, "timestamps": 0, "user_id": 0}
    filler = tokens[0] if tokens else {**zero, "context": dict.fromkeys(context, 0)}
    index = WindowIndex(
        window,
        str(wdir),
        tuple(f for f, _, _ in files),
        tuple(int(n) for _, n, _ in files),
        row_group_rows,
        tuple(context),
        filler,
    )
    tmp = wdir / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index.to_dict()))
    tmp.replace(wdir / INDEX_FILE)
    return index


def index_window(prepared_dir: str, window: int, row_group_rows: int) -> WindowIndex:
    """Build window=W/_index.json from its files' footers (shards written outside prepare)."""
    wdir = Path(prepared_dir) / window_dir(window)
    names = sorted(p.name for p in wdir.glob("part-*.parquet"))
    if not names:
        raise FileNotFoundError(f"{wdir}: no part-*.parquet files; {FIX}")
    metas = [pq.read_metadata(wdir / f) for f in names]
    context = int_context_columns(metas[0].schema.to_arrow_schema())
    index = WindowIndex(
        window, str(wdir), tuple(names), tuple(m.num_rows for m in metas), row_group_rows, context
    )
    for i, (f, m) in enumerate(zip(names, metas)):
        check_file(str(wdir / f), m, index, i)
    files = [(f, n, _first_event(wdir / f, context)) for f, n in zip(names, index.file_rows)]
    return write_window_index(prepared_dir, window, files, row_group_rows, context)


def _first_event(path: Path, context: tuple[str, ...]) -> dict | None:
    """The first event of a file's first usable row (None if it has none)."""
    pf = pq.ParquetFile(path)
    for g in range(pf.metadata.num_row_groups):
        rows = SequenceRows(pf.read_row_group(g), 1, context, skip_bad=True)
        tok = rows.first_token(0, rows.num_rows)
        if tok is not None:
            return tok
    return None


def write_meta(prepared_dir: str, meta: dict) -> None:
    """Write _meta.json atomically (last: a directory with it is complete)."""
    out = Path(prepared_dir)
    (out / (META_FILE + ".tmp")).write_text(json.dumps(meta, indent=1))
    (out / (META_FILE + ".tmp")).replace(out / META_FILE)


def write_sequence_shards(
    prepared_dir: str, rows: pa.Table, rows_per_file: int = 1 << 16, row_group_rows: int = 8192
) -> list[int]:
    """Write sequence-schema rows as prepared shards + indexes + _meta.json (tests, benchmarks).

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
        index_window(prepared_dir, w, row_group_rows)
        counts[str(w)] = part.num_rows
    context = list(int_context_columns(rows.schema))
    write_meta(
        prepared_dir,
        {
            "windows": windows,
            "rows_per_window": counts,
            "context": context,
            "source": "write_sequence_shards",
        },
    )
    return windows
