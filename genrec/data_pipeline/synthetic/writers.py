"""Parquet sinks that write row group by row group (memory bounded by one row group)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROWS_PER_GROUP = 65_536


class ParquetSink:
    """Appends column chunks; flushes a row group every `rows_per_group` rows."""

    def __init__(self, path: str, schema: pa.Schema, rows_per_group: int = ROWS_PER_GROUP):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.schema, self.rows_per_group = path, schema, rows_per_group
        self._writer = pq.ParquetWriter(path, schema)
        self._parts: list[pa.Table] = []
        self._pending = 0
        self.rows = 0

    def write(self, columns: dict[str, np.ndarray | pa.Array]) -> None:
        table = pa.table(
            {f.name: _arrow(columns[f.name], f.type) for f in self.schema}, schema=self.schema
        )
        if table.num_rows == 0:
            return
        self._parts.append(table)
        self._pending += table.num_rows
        self.rows += table.num_rows
        if self._pending >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(
                pa.concat_tables(self._parts), row_group_size=self.rows_per_group
            )
            self._parts, self._pending = [], 0

    def close(self) -> str:
        self._flush()
        self._writer.close()
        return self.path


def _arrow(values: np.ndarray | pa.Array, dtype: pa.DataType) -> pa.Array:
    return values.cast(dtype) if isinstance(values, pa.Array) else pa.array(values, type=dtype)


def list_array(matrix: np.ndarray) -> pa.Array:
    """Rows of a 2-D float matrix as list<float32> (embeddings)."""
    n, d = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.astype(np.float32).ravel()))


def take(columns: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in columns.items()}


def write_table(path: str, columns: dict, schema: pa.Schema) -> str:
    """A small catalog file in one go (catalogs are O(items), not O(events))."""
    sink = ParquetSink(path, schema)
    sink.write(columns)
    return sink.close()
