"""Source adapters: every raw layout mapped onto the canonical events schema.

    source = get_source("tecd")
    for batch in iter_events(source, "data/raw/tecd"):   # pyarrow RecordBatches
        ...

Each source plans its input into `Fragment`s (checked early from footers/headers) and reads
a fragment batch by batch (`source.read(fragment, bad)`); `prepare` runs fragments as Ray
tasks. Bad input raises `DataError` or, with on_bad_rows="skip", is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from genrec.data_pipeline import schemas
from genrec.data_pipeline.sources.base import (
    NAMESPACE_SHIFT,
    ORDER_SHIFT,
    FileKind,
    Fragment,
    ParquetSource,
)
from genrec.data_pipeline.sources.parquet import NAME as PARQUET
from genrec.data_pipeline.sources.parquet import PREFIX as PARQUET_PREFIX
from genrec.data_pipeline.sources.parquet import parquet_source, source_spec
from genrec.data_pipeline.sources.recbole import RECBOLE
from genrec.data_pipeline.sources.tecd import DOMAINS as TECD_DOMAINS
from genrec.data_pipeline.sources.tecd import TECD
from genrec.data_pipeline.sources.text import TEXT
from genrec.data_pipeline.sources.vk_lsvd import VK_LSVD
from genrec.data_pipeline.sources.yambda import YAMBDA
from genrec.data_pipeline.validation import BadRows

SOURCES = {s.name: s for s in (TECD, VK_LSVD, YAMBDA, TEXT, RECBOLE)}


def get_source(name: str):
    """A source by name; `parquet` / `parquet:{mapping}` is built from its column mapping."""
    if name == PARQUET or name.startswith(PARQUET_PREFIX):
        return parquet_source(name)
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known: {sorted(SOURCES)} and {PARQUET!r}")
    return SOURCES[name]


def batch_features(name: str) -> tuple[str, ...]:
    """The sparse features (KJT keys) every batch of source `name` carries: "item_id",
    "action", then its integer context columns (a float context column such as watch_time
    is carried into the shards but is not a feature). Config checks at load read this."""
    context = get_source(name).context
    ints = [c for c in context if pa.types.is_integer(schemas.CONTEXT_FIELDS[c])]
    return ("item_id", "action", *ints)


def iter_events(
    source, in_dir: str, on_bad_rows: str = "error", bad: BadRows | None = None
) -> Iterator[pa.RecordBatch]:
    """Every canonical event batch of a source, fragment by fragment, in plan order."""
    bad = bad if bad is not None else BadRows(on_bad_rows)
    for frag in source.plan(in_dir, bad):
        yield from source.read(frag, bad)


__all__ = [
    "NAMESPACE_SHIFT",
    "ORDER_SHIFT",
    "SOURCES",
    "TECD_DOMAINS",
    "BadRows",
    "batch_features",
    "FileKind",
    "Fragment",
    "ParquetSource",
    "get_source",
    "iter_events",
    "source_spec",
]
