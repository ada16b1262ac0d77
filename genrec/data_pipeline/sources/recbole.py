"""RecBole atomic `.inter` files: tab separated with a typed header.

    user_id:token	item_id:token	rating:float	timestamp:float

Tokens that are non-negative integers are used as ids; other tokens map to a stable
63-bit BLAKE2b hash. `timestamp` (float seconds) is floored to int seconds; without a
timestamp column the row number is the order key and every event is in window 0.
`rating` >= 4 becomes the action `like`, anything else `view`. `in_dir` may be the
`.inter` file or a directory holding exactly one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from genrec.data_pipeline import schemas
from genrec.data_pipeline.sources.base import Fragment
from genrec.data_pipeline.sources.text import empty_file, single_input
from genrec.data_pipeline.validation import (
    BAD_TOKEN,
    MISSING_COLUMN,
    UNREADABLE,
    BadRows,
    check_ids,
)

LIKE_RATING = 4.0
BLOCK_BYTES = 4 << 20


def token_id(token: str) -> int:
    if token.isdigit() and len(token) < 19:
        return int(token)
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little") >> 1


def header_columns(path: str) -> list[str]:
    with open(path) as f:
        return [h.split(":")[0] for h in f.readline().rstrip("\n\r").split("\t")]


@dataclass
class RecBoleSource:
    name: str = "recbole"
    context: tuple[str, ...] = ()

    @property
    def schema(self) -> pa.Schema:
        return schemas.events_schema(self.context)

    def plan(self, in_dir: str, bad: BadRows) -> list[Fragment]:
        path = single_input(in_dir, "*.inter", "RecBole")
        if empty_file(path, bad, min_lines=2):
            return []
        names = header_columns(path)
        for col in ("user_id", "item_id"):
            if col not in names:
                bad.file_problem(
                    MISSING_COLUMN,
                    path,
                    f"missing from the header {names}",
                    column=col,
                    fix="write a RecBole header: user_id:token ...",
                )
                return []
        return [Fragment(path, 0, row_ordered="timestamp" not in names)]

    def read(self, frag: Fragment, bad: BadRows) -> Iterator[pa.RecordBatch]:
        names = header_columns(frag.path)
        wanted = [c for c in ("user_id", "item_id", "timestamp", "rating") if c in names]
        invalid: list[pacsv.InvalidRow] = []

        def on_invalid(row: pacsv.InvalidRow) -> str:
            if bad.mode == "error":  # raised below: exceptions cannot leave this callback
                invalid.append(row)
                return "error"
            bad.problem(BAD_TOKEN, frag.path, "malformed line", count=1)
            return "skip"

        row = 0
        try:  # the first block is parsed on open: bad lines may surface there
            reader = pacsv.open_csv(
                frag.path,
                read_options=pacsv.ReadOptions(
                    skip_rows=1, column_names=names, block_size=BLOCK_BYTES
                ),
                parse_options=pacsv.ParseOptions(delimiter="\t", invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(
                    include_columns=wanted, column_types=dict.fromkeys(wanted, pa.string())
                ),
            )
            for raw in reader:
                out = self._convert(raw, frag, row, bad)
                row += raw.num_rows
                if out.num_rows:
                    yield out
        except pa.ArrowInvalid as e:
            if invalid:
                bad_row = invalid[0]
                bad.problem(
                    BAD_TOKEN,
                    frag.path,
                    f"malformed line {bad_row.text!r} ({bad_row.actual_columns} fields, "
                    f"expected {bad_row.expected_columns})",
                    row=_data_row(frag.path, bad_row.text),
                    fix="write one tab separated value per header column",
                )
            bad.file_problem(
                UNREADABLE,
                frag.path,
                f"cannot be parsed past row {row}: {e}",
                fix="rewrite it as a tab separated RecBole file",
            )

    def _convert(self, raw: pa.RecordBatch, frag: Fragment, row: int, bad: BadRows):
        n = raw.num_rows
        user = _tokens(raw.column("user_id"))
        item = _tokens(raw.column("item_id"))
        keep = np.ones(n, bool)
        for col in ("timestamp", "rating"):
            if col in raw.schema.names:
                vals = _floats(raw.column(col))
                nan = np.isnan(vals)
                if nan.any():
                    first = int(np.argmax(nan))
                    bad.problem(
                        BAD_TOKEN,
                        frag.path,
                        f"value {raw.column(col)[first].as_py()!r} is not a number",
                        column=col,
                        row=row + first,
                        count=int((nan & keep).sum()),
                        fix="write numbers",
                    )
                    keep &= ~nan
        ids = {"user_id": pa.array(user), "item_id": pa.array(item)}
        if "timestamp" in raw.schema.names:
            ts = np.floor(np.nan_to_num(_floats(raw.column("timestamp")))).astype(np.int64)
            ids["timestamp"] = pa.array(ts)
        else:
            ts = row + np.arange(n, dtype=np.int64)
        mask = check_ids(ids, frag.path, row, bad)
        if mask is not None:
            keep &= mask
        action = np.full(n, schemas.ACTIONS["view"], np.int32)
        if "rating" in raw.schema.names:
            action[np.nan_to_num(_floats(raw.column("rating"))) >= LIKE_RATING] = schemas.ACTIONS[
                "like"
            ]
        out = pa.RecordBatch.from_arrays([user, item, ts, action], schema=self.schema)
        return out if keep.all() else out.filter(pa.array(keep))


def _data_row(path: str, text: str) -> int | None:
    """0-based data row of the first line equal to `text` (error messages only)."""
    with open(path) as f:
        next(f, None)
        for i, line in enumerate(f):
            if line.rstrip("\r\n") == text:
                return i
    return None


def _tokens(col: pa.Array) -> np.ndarray:
    enc = pc.dictionary_encode(pc.fill_null(col, ""))
    lut = np.array([token_id(t) if t else -1 for t in enc.dictionary.to_pylist()], np.int64)
    return lut[enc.indices.to_numpy(zero_copy_only=False)]


def _floats(col: pa.Array) -> np.ndarray:
    try:
        return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:

        def parse(s: str | None) -> float:
            try:
                return float(s)
            except (TypeError, ValueError):
                return float("nan")

        return np.array([parse(s) for s in col.to_pylist()], np.float64)


RECBOLE = RecBoleSource()
