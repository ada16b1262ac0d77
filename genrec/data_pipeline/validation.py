"""Bad input fails loudly, or is skipped and counted; it is never dropped silently.

Every adapter reports a problem through `BadRows.problem(...)`:

    mode "error"  raise `DataError` naming the file, the column, the row and the fix
    mode "skip"   count the rows under a reason (and remember skipped files) and go on

Row numbers in messages are 0-based positions inside the named file.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ON_BAD_ROWS = ("error", "skip")

# reasons (keys of the skip counters)
UNREADABLE = "unreadable_file"
EMPTY = "empty_file"
MISSING_COLUMN = "missing_column"
WRONG_TYPE = "wrong_type"
NULL_VALUE = "null_value"
NEGATIVE_ID = "negative_value"
ID_OUT_OF_RANGE = "id_out_of_range"
UNKNOWN_ACTION = "unknown_action"
BAD_TOKEN = "bad_token"


class DataError(ValueError):
    """Input that does not fit a source's layout or the canonical schema."""

    def __init__(
        self,
        path: str,
        problem: str,
        column: str | None = None,
        row: int | None = None,
        fix: str = "",
        reason: str = "",
    ) -> None:
        where = path
        if column is not None:
            where += f": column '{column}'"
        if row is not None:
            where += f", row {row}"
        msg = f"{where}: {problem}"
        if fix:
            msg += f". Fix: {fix}"
        if reason:  # a counted kind of bad input (BadRows); a missing directory is not skippable
            msg += " (or pass on_bad_rows='skip' / --on-bad-rows skip to skip and count such input)"
        super().__init__(msg)
        self.path, self.column, self.row, self.reason = path, column, row, reason
        self._args = (path, problem, column, row, fix, reason)

    def __reduce__(self):  # picklable across Ray tasks despite the keyword constructor
        return (type(self), self._args)


@dataclass
class BadRows:
    """Skip counters for one reading pass (mergeable across Ray tasks)."""

    mode: str = "error"
    rows: Counter = field(default_factory=Counter)  # reason -> skipped rows
    files: list[str] = field(default_factory=list)  # "path (reason)" of skipped files

    def __post_init__(self) -> None:
        if self.mode not in ON_BAD_ROWS:
            raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {self.mode!r}")

    def problem(
        self,
        reason: str,
        path: str,
        problem: str,
        column: str | None = None,
        row: int | None = None,
        fix: str = "",
        count: int = 1,
    ) -> None:
        """Raise in error mode; otherwise count `count` skipped rows under `reason`."""
        if self.mode == "error":
            raise DataError(path, problem, column=column, row=row, fix=fix, reason=reason)
        self.rows[reason] += count

    def file_problem(
        self,
        reason: str,
        path: str,
        problem: str,
        column: str | None = None,
        fix: str = "",
        num_rows: int = 0,
    ) -> None:
        """A whole file is unusable: raise, or skip it (its known rows are counted)."""
        self.problem(reason, path, problem, column=column, fix=fix, count=max(0, num_rows))
        self.rows.setdefault(reason, 0)
        self.files.append(f"{path} ({reason})")

    def merge(self, other: BadRows) -> None:
        self.rows.update(other.rows)
        for k in other.rows:
            self.rows.setdefault(k, 0)
        self.files.extend(other.files)

    def as_dict(self) -> dict:
        return {"rows": dict(sorted(self.rows.items())), "files": list(self.files)}

    @property
    def total(self) -> int:
        return int(sum(self.rows.values()))


# --------------------------------------------------------------------------- type kinds

_KIND_CHECKS = {
    "int": pa.types.is_integer,
    "float": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
    "bool": pa.types.is_boolean,
    "str": lambda t: (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))
    ),
    "time": lambda t: pa.types.is_timestamp(t) or pa.types.is_integer(t),
    "str_or_int": lambda t: _KIND_CHECKS["str"](t) or pa.types.is_integer(t),  # labels
}


def type_matches(dtype: pa.DataType, kind: str) -> bool:
    return _KIND_CHECKS[kind](dtype)


def check_schema(
    schema: pa.Schema, required: dict[str, str], path: str, bad: BadRows, num_rows: int
) -> bool:
    """Required columns exist with a usable type; False if the file was skipped."""
    names = set(schema.names)
    for col, kind in required.items():
        if col not in names:
            bad.file_problem(
                MISSING_COLUMN,
                path,
                f"missing (the file has {sorted(names)})",
                column=col,
                fix="point the source at files of its own layout, or rename the column",
                num_rows=num_rows,
            )
            return False
        dtype = schema.field(col).type
        if not type_matches(dtype, kind):
            bad.file_problem(
                WRONG_TYPE,
                path,
                f"has type {dtype}, expected {kind}",
                column=col,
                fix=f"write '{col}' as {kind} values",
                num_rows=num_rows,
            )
            return False
    return True


def check_ids(
    batch_cols: dict[str, pa.Array],
    path: str,
    first_row: int,
    bad: BadRows,
    max_value: int = 2**63 - 1,
) -> np.ndarray | None:
    """Validate id-like columns (no nulls, >= 0, <= max_value); returns a keep-mask or None.

    In error mode the first bad row raises; in skip mode bad rows are counted once each
    (under the first reason that hits them) and the returned mask drops them.
    """
    n = len(next(iter(batch_cols.values()))) if batch_cols else 0
    keep: np.ndarray | None = None
    for col, arr in batch_cols.items():
        checks = []
        if arr.null_count:
            checks.append((NULL_VALUE, "null value", np.asarray(arr.is_null())))
        if pa.types.is_timestamp(arr.type):
            arr = arr.cast(pa.int64())
        vals = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)
        if vals.dtype.kind == "i" and (vals < 0).any():
            checks.append((NEGATIVE_ID, "negative value", vals < 0))
        if vals.dtype.kind in "iu" and (vals > max_value).any():
            checks.append((ID_OUT_OF_RANGE, f"value above {max_value}", vals > max_value))
        for reason, what, mask in checks:
            if keep is None:
                keep = np.ones(n, dtype=bool)
            hit = mask & keep
            if not hit.any():
                continue
            first = int(np.argmax(hit))
            bad.problem(
                reason,
                path,
                what,
                column=col,
                row=first_row + first,
                fix="drop or repair these rows upstream",
                count=int(hit.sum()),
            )
            keep &= ~mask
    return keep
