"""Your own event log: any Parquet files with user, item, time and action columns.

    data:
      source: parquet
      raw_dir: data/my_events          # the files: raw_dir/parquet.files
      parquet:
        user: customer                 # integer ids
        item: sku
        timestamp: ts                  # a timestamp column, or integers in timestamp_unit;
        timestamp_unit: ms             #   empty: row order is time (window 0)
        action: event
        action_values: {view: view, add_to_cart: cart, purchase: order}
        context: {price: unit_price}   # genrec context feature -> your column

The mapping (`ParquetColumnsConfig`) becomes a `FileKind` of the adapter engine in
sources/base.py, so these files are planned, read and validated exactly like the built-in
layouts: a missing column or wrong type names the file and column; null or negative ids and
action values missing from `action_values` name file, column and row, or are skipped and
counted with `--on-bad-rows skip`.

The source travels as a string, `parquet:{mapping as JSON}` (`source_spec`): prepare's Ray
tasks rebuild it by name like any other source, on any node, and `_meta.json` records the
mapping the shards were made with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from genrec.config import ConfigError, ParquetColumnsConfig, _build, check_parquet_columns
from genrec.data_pipeline import schemas
from genrec.data_pipeline.sources.base import FileKind, Fragment, ParquetSource, map_actions
from genrec.data_pipeline.validation import BadRows

NAME = "parquet"
PREFIX = f"{NAME}:"


def source_spec(cols: ParquetColumnsConfig) -> str:
    """The source name prepare takes for this mapping: `parquet:{...}`."""
    return PREFIX + json.dumps(dataclasses.asdict(cols), sort_keys=True, separators=(",", ":"))


def _kind_of(field_type: pa.DataType) -> str:
    return "float" if pa.types.is_floating(field_type) else "int"


@dataclass
class ColumnMappedSource(ParquetSource):
    """A ParquetSource of one FileKind built from a column mapping."""

    timestamp_unit: str = "s"

    def _convert(
        self, raw: pa.RecordBatch, kind: FileKind, frag: Fragment, row: int, bad: BadRows
    ) -> pa.RecordBatch:
        if kind.time is not None and self.timestamp_unit != "s":
            i = raw.schema.get_field_index(kind.time)
            col = raw.column(i)
            if pa.types.is_integer(col.type):  # integers in ms/us/ns: a timestamp of that unit
                ts = pc.cast(col, pa.int64()).cast(pa.timestamp(self.timestamp_unit))
                raw = raw.set_column(i, kind.time, ts)
        return super()._convert(raw, kind, frag, row, bad)


def parquet_source(spec: str = NAME) -> ColumnMappedSource:
    """The source of `spec`: `parquet` (default column names) or `parquet:{mapping JSON}`."""
    try:
        data = json.loads(spec[len(PREFIX) :]) if spec.startswith(PREFIX) else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"source {spec!r}: the mapping is not valid JSON ({e})") from None
    cols: ParquetColumnsConfig = _build(ParquetColumnsConfig, data, "data.parquet")
    check_parquet_columns(cols)
    types = {cols.user: "int", cols.item: "int"}
    if cols.timestamp:
        types[cols.timestamp] = "time"
    if cols.action:
        types[cols.action] = "str_or_int"
    for name, column in cols.context.items():
        types[column] = _kind_of(schemas.CONTEXT_FIELDS[name])
    mapping = dict(cols.action_values)
    kind = FileKind(
        glob=cols.files,
        types=types,
        user=cols.user,
        item=cols.item,
        time=cols.timestamp or None,
        action=cols.action or None,
        actions=mapping,
        # integer or string action values, matched against the map's (string) keys
        action_fn=(lambda raw: map_actions(pc.cast(raw.column(cols.action), pa.string()), mapping))
        if cols.action
        else None,
        constant_action=cols.default_action,
        context=dict(cols.context),
        window_pattern="",  # without a time column every event is in window 0
    )
    return ColumnMappedSource(
        name=NAME, kinds=[kind], context=tuple(cols.context), timestamp_unit=cols.timestamp_unit
    )
