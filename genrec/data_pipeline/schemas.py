"""The canonical schemas every arrow of the data flow speaks.

events     one row per interaction, any source mapped onto it by data_pipeline.sources
sequences  one row per (user, window): that window's events as targets, preceded by up to
           `max_len` earlier events of the same user as history (`num_history` of them)

Sequence shards live under a prepared directory:

    PREPARED/_meta.json                    written last: windows, counts, source, max_len
    PREPARED/window=00017/_index.json      the window's files, rows, row-group size (shard_index)
    PREPARED/window=00017/part-00000.parquet
    PREPARED/window=00017/part-00001.parquet
    PREPARED/items.parquet                 every item with its event count
    PREPARED/_tail/b-00000.arrow           per user bucket: each user's last max_len events
    PREPARED/vocab/item_id.parquet         optional id -> row vocabulary (vocabulary.py)

Windows are integers that grow with time (day or week number, or timestamp // seconds).
Inside a shard rows come in user-bucket runs, each sorted by user_id; a user has one row per
window; list columns are aligned element by element.
"""

from __future__ import annotations

import pyarrow as pa

# Action codes shared by every source (a source maps its own event types onto these).
ACTIONS = {
    "view": 0,
    "click": 1,
    "cart": 2,
    "order": 3,
    "like": 4,
    "share": 5,
    "skip": 6,
    "other": 7,
}
NUM_ACTIONS = len(ACTIONS)

EVENT_COLUMNS = ("user_id", "item_id", "timestamp", "action")
EVENTS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),  # seconds (or an order key)
        pa.field("action", pa.int32(), nullable=False),
    ]
)

# Optional context columns an adapter may add to events (and prepare carries into lists).
CONTEXT_FIELDS = {
    "domain": pa.int32(),
    "surface": pa.int32(),
    "category": pa.int64(),
    "brand": pa.int64(),
    "author": pa.int64(),
    "price": pa.float32(),
    "watch_time": pa.float32(),
}

SEQUENCE_COLUMNS = ("user_id", "window", "item_ids", "timestamps", "actions", "num_history")
SEQUENCES = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("window", pa.int64(), nullable=False),
        pa.field("item_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("timestamps", pa.list_(pa.int64()), nullable=False),
        pa.field("actions", pa.list_(pa.int32()), nullable=False),
        pa.field("num_history", pa.int32(), nullable=False),  # leading history events
    ]
)

META_FILE = "_meta.json"


def window_dir(window: int) -> str:
    return f"window={window:05d}"


def events_schema(context: list[str] | tuple[str, ...] = ()) -> pa.Schema:
    return pa.schema(list(EVENTS) + [pa.field(c, CONTEXT_FIELDS[c]) for c in context])


def sequences_schema(context: list[str] | tuple[str, ...] = ()) -> pa.Schema:
    return pa.schema(list(SEQUENCES) + [pa.field(c, pa.list_(CONTEXT_FIELDS[c])) for c in context])


# The item catalog of a prepared directory: every distinct item id with its event count
# (the trainer samples negatives from it, export builds the item index from it).
ITEMS_FILE = "items.parquet"
ITEMS = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
    ]
)
