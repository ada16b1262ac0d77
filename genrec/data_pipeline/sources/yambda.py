"""Yambda (Yandex music): flat event files, timestamps in 5-second bins.

Layout:
    flat/{50m,500m,5b}/{listens,likes,dislikes,unlikes,undislikes,multi_event}.parquet
    columns: uid, timestamp (relative, 5-second bins), item_id, is_organic, and for
    listens played_ratio_pct, track_length_seconds; multi_event adds event_type.

`multi_event.parquet` holds every event, so when present it is the only file read;
otherwise the per-type files are read. `in_dir` may be the data set root (exactly one
size under flat/) or a size directory. timestamp seconds = bins * 5.

Actions: listen -> view (skip when played_ratio_pct < 30), like -> like, dislike -> skip,
unlike/undislike -> other. Context: `surface` = is_organic, `watch_time` =
played_ratio_pct / 100 * track_length_seconds (0 for non-listens).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from genrec.data_pipeline.schemas import ACTIONS
from genrec.data_pipeline.sources.base import FileKind, ParquetSource, map_actions, num_col
from genrec.data_pipeline.validation import DataError

TIME_BIN_SECONDS = 5
SKIP_BELOW_PCT = 30
EVENT_ACTIONS = {
    "listen": "view",
    "like": "like",
    "dislike": "skip",
    "unlike": "other",
    "undislike": "other",
}
BASE_TYPES = {"uid": "int", "timestamp": "int", "item_id": "int", "is_organic": "int"}
LISTEN_TYPES = {**BASE_TYPES, "played_ratio_pct": "float", "track_length_seconds": "float"}


def _listen_actions(raw: pa.RecordBatch) -> np.ndarray:
    played = num_col(raw, "played_ratio_pct")
    return np.where(played < SKIP_BELOW_PCT, ACTIONS["skip"], ACTIONS["view"]).astype(np.int32)


def _watch_time(raw: pa.RecordBatch) -> np.ndarray:
    played = num_col(raw, "played_ratio_pct")
    return (played / 100.0 * num_col(raw, "track_length_seconds")).astype(np.float32)


def _multi_actions(raw: pa.RecordBatch) -> np.ndarray:
    out = map_actions(raw.column("event_type"), EVENT_ACTIONS)
    listen = out == ACTIONS["view"]
    out[listen & (num_col(raw, "played_ratio_pct") < SKIP_BELOW_PCT)] = ACTIONS["skip"]
    return out


def _kind(name: str, types: dict, action: str = "view", **kw) -> FileKind:
    return FileKind(
        glob=f"{name}.parquet",
        types=types,
        user="uid",
        item="item_id",
        time="timestamp",
        time_scale=TIME_BIN_SECONDS,
        constant_action=action,
        context=kw.pop("context", {"surface": "is_organic", "watch_time": 0.0}),
        **kw,
    )


MULTI = _kind(
    "multi_event",
    {**LISTEN_TYPES, "event_type": "str"},
    action="event_type",
    actions=EVENT_ACTIONS,
    action_fn=_multi_actions,
    context={"surface": "is_organic", "watch_time": _watch_time},
)
PER_TYPE = [
    _kind(
        "listens",
        LISTEN_TYPES,
        action_fn=_listen_actions,
        context={"surface": "is_organic", "watch_time": _watch_time},
    ),
    _kind("likes", BASE_TYPES, "like"),
    _kind("dislikes", BASE_TYPES, "skip"),
    _kind("unlikes", BASE_TYPES, "other"),
    _kind("undislikes", BASE_TYPES, "other"),
]


@dataclass
class YambdaSource(ParquetSource):
    def resolve_dir(self, in_dir: str) -> str:
        if glob.glob(os.path.join(in_dir, "*.parquet")):
            return in_dir
        sizes = sorted(glob.glob(os.path.join(in_dir, "flat", "*", "")))
        if len(sizes) != 1:
            raise DataError(
                in_dir,
                f"expected exactly one flat/<size>/ directory, found "
                f"{[os.path.basename(s.rstrip('/')) for s in sizes]}",
                fix="point --in at the size directory, e.g. flat/50m",
            )
        return sizes[0]

    def kind_files(self, root: str) -> list[tuple[int, str]]:
        files = super().kind_files(root)
        multi = [(k, p) for k, p in files if k == 0]
        return multi if multi else [(k, p) for k, p in files if k != 0]


YAMBDA = YambdaSource(
    name="yambda",
    kinds=[MULTI, *PER_TYPE],
    context=("surface", "watch_time"),
)
