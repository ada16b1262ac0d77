"""Synthetic Yambda: music listens with likes/dislikes (and their undos), flat files.

Writes `flat/50m/` (the size folder is a label only) with the per-type files and
`multi_event.parquet`. Timestamps are relative 5-second bins; listens of items from the
user's clusters are played longer and liked more often.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from genrec.data_pipeline.synthetic.world import SliceEvents, World
from genrec.data_pipeline.synthetic.writers import ParquetSink

DAYS = 30
SIZE = "50m"
BIN = 5
TYPES = ("listen", "like", "dislike", "unlike", "undislike")
FILES = {
    "listen": "listens",
    "like": "likes",
    "dislike": "dislikes",
    "unlike": "unlikes",
    "undislike": "undislikes",
}
BASE = [
    ("uid", pa.uint32()),
    ("timestamp", pa.uint32()),
    ("item_id", pa.uint32()),
    ("is_organic", pa.uint8()),
]
LISTEN = [("played_ratio_pct", pa.uint16()), ("track_length_seconds", pa.uint32())]
SCHEMAS = {
    "listen": pa.schema(BASE + LISTEN),
    **{t: pa.schema(BASE) for t in TYPES[1:]},
    "multi": pa.schema(BASE + LISTEN + [("event_type", pa.string())]),
}


class YambdaWriter:
    seconds = DAYS * 86400
    expansion = 1.08

    def __init__(self, world: World, out_dir: str) -> None:
        self.world = world
        self.root = os.path.join(out_dir, "flat", SIZE)
        rng, n = world.rng, world.num_items
        self.item_id = rng.permutation(n).astype(np.int64)
        self.length = rng.integers(90, 420, n)
        self.sinks = {
            t: ParquetSink(os.path.join(self.root, f"{FILES[t]}.parquet"), SCHEMAS[t])
            for t in TYPES
        }
        self.sinks["multi"] = ParquetSink(
            os.path.join(self.root, "multi_event.parquet"), SCHEMAS["multi"]
        )

    def expand(self, sl: SliceEvents) -> dict[str, dict[str, np.ndarray]]:
        rng, n, aff = self.world.rng, len(sl), sl.affinity
        played = np.where(aff, rng.normal(85, 15, n), rng.normal(45, 30, n)).clip(0, 100)
        like = rng.random(n) < (0.03 + 0.2 * aff * (played >= 80))
        dislike = ~like & (rng.random(n) < 0.08 * ~aff * (played < 30))
        unlike = like & (rng.random(n) < 0.08)
        undislike = dislike & (rng.random(n) < 0.1)
        masks = (np.ones(n, bool), like, dislike, unlike, undislike)
        idx = np.concatenate([np.nonzero(m)[0] for m in masks])
        kind = np.concatenate([np.full(int(m.sum()), k) for k, m in enumerate(masks)])
        delay = np.select([kind == 0, kind <= 2], [0.0, 1.0], 60.0) * rng.uniform(1, 20, idx.size)
        organic = (rng.random(n) < 0.35).astype(np.int64)
        listen = kind == 0
        return {
            "events": {
                "_t": sl.time[idx] + delay,
                "_kind": kind,
                "uid": sl.user[idx],
                "item_id": self.item_id[sl.item[idx]],
                "is_organic": organic[idx],
                "played_ratio_pct": np.where(listen, np.round(played[idx]), 0).astype(np.int64),
                "track_length_seconds": self.length[sl.item[idx]],
            }
        }

    def write(self, streams: dict[str, dict[str, np.ndarray]], t0: float) -> None:
        cols = streams["events"]
        kind = cols["_kind"]
        cols["timestamp"] = (cols["_t"] // BIN).astype(np.int64)
        listen = kind == 0
        multi = {k: v for k, v in cols.items() if not k.startswith("_")}
        multi["played_ratio_pct"] = pa.array(multi["played_ratio_pct"], mask=~listen)
        multi["track_length_seconds"] = pa.array(multi["track_length_seconds"], mask=~listen)
        multi["event_type"] = np.array(TYPES)[kind]
        self.sinks["multi"].write(multi)
        for k, t in enumerate(TYPES):
            m = kind == k
            self.sinks[t].write(
                {name: v[m] for name, v in cols.items() if name in SCHEMAS[t].names}
            )

    def close(self) -> list[str]:
        return [s.close() for s in self.sinks.values()]
