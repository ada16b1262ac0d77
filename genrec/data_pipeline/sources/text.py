"""Text sequences (S3-Rec / SASRec preprocessing): one line per user, `user item1 item2 ...`.

Items are in chronological order but carry no time, so the order key is the position in
the line (`timestamp = position`) and every event belongs to window 0. `in_dir` may be a
file or a directory holding exactly one `*.txt` file. Ids must be non-negative integers.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from genrec.data_pipeline import schemas
from genrec.data_pipeline.sources.base import BATCH_ROWS, Fragment
from genrec.data_pipeline.validation import (
    BAD_TOKEN,
    EMPTY,
    NEGATIVE_ID,
    BadRows,
    DataError,
)


def single_input(in_dir: str, pattern: str, what: str) -> str:
    """The one data file named by `in_dir` (a file, or a directory with one match)."""
    if os.path.isfile(in_dir):
        return in_dir
    files = sorted(glob.glob(os.path.join(in_dir, pattern)))
    if len(files) != 1:
        raise DataError(
            in_dir,
            f"expected exactly one {pattern} {what} file, found "
            f"{[os.path.basename(f) for f in files]}",
            fix="point --in at one file",
        )
    return files[0]


def empty_file(path: str, bad: BadRows, min_lines: int = 1) -> bool:
    """True (after raising or counting) when the file has fewer than `min_lines` lines."""
    with open(path, "rb") as f:
        lines = sum(1 for _, line in zip(range(min_lines), f) if line.strip())
    if lines < min_lines:
        what = "is empty (0 bytes)" if os.path.getsize(path) == 0 else "has no data rows"
        bad.file_problem(EMPTY, path, what, fix="remove it or write its events")
        return True
    return False


@dataclass
class TextSource:
    name: str = "text"
    context: tuple[str, ...] = ()
    batch_rows: int = BATCH_ROWS

    @property
    def schema(self) -> pa.Schema:
        return schemas.events_schema(self.context)

    def plan(self, in_dir: str, bad: BadRows) -> list[Fragment]:
        path = single_input(in_dir, "*.txt", "text-sequence")
        if empty_file(path, bad):
            return []
        return [Fragment(path, 0, row_ordered=True, num_rows=-1)]

    def read(self, frag: Fragment, bad: BadRows) -> Iterator[pa.RecordBatch]:
        users: list[np.ndarray] = []
        items: list[np.ndarray] = []
        pos: list[np.ndarray] = []
        pending = 0
        with open(frag.path) as f:
            for lineno, line in enumerate(f):
                toks = line.split()
                if not toks:
                    continue
                try:
                    ids = np.array(toks, dtype=np.int64)
                except (ValueError, OverflowError):
                    bad_tok = next(t for t in toks if not t.lstrip("-").isdigit())
                    bad.problem(
                        BAD_TOKEN,
                        frag.path,
                        f"token {bad_tok!r} is not an integer id",
                        column="item_id" if toks[0] != bad_tok else "user_id",
                        row=lineno,
                        fix="write integer ids",
                        count=len(toks) - 1,
                    )
                    continue
                if (ids < 0).any():
                    col = "user_id" if ids[0] < 0 else "item_id"
                    bad.problem(
                        NEGATIVE_ID,
                        frag.path,
                        "negative id",
                        column=col,
                        row=lineno,
                        fix="write non-negative ids",
                        count=len(toks) - 1,
                    )
                    continue
                n = ids.size - 1
                users.append(np.full(n, ids[0], np.int64))
                items.append(ids[1:])
                pos.append(np.arange(n, dtype=np.int64))
                pending += n
                if pending >= self.batch_rows:
                    yield self._batch(users, items, pos)
                    users, items, pos, pending = [], [], [], 0
        if pending:
            yield self._batch(users, items, pos)

    def _batch(self, users: list, items: list, pos: list) -> pa.RecordBatch:
        u, i, t = np.concatenate(users), np.concatenate(items), np.concatenate(pos)
        a = np.full(u.size, schemas.ACTIONS["view"], np.int32)
        return pa.RecordBatch.from_arrays([u, i, t, a], schema=self.schema)


TEXT = TextSource()
