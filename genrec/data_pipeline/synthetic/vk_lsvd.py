"""Synthetic VK-LSVD: weekly short-video interaction files with no time column.

Rows are written in time order (the only order key VK-LSVD has). Watch time is long for
items of the user's clusters and short otherwise; likes, shares and bookmarks follow long
watches of such items, dislikes follow short watches of others. The last two weeks are the
validation and test splits.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from genrec.data_pipeline.synthetic.world import SliceEvents, World
from genrec.data_pipeline.synthetic.writers import ParquetSink, write_table

WEEKS = 8
FLAGS = ("like", "dislike", "share", "bookmark", "click_on_author", "open_comments")
INTERACTIONS = pa.schema(
    [
        ("user_id", pa.uint32()),
        ("item_id", pa.uint32()),
        ("place", pa.uint8()),
        ("platform", pa.uint8()),
        ("agent", pa.uint8()),
        ("timespent", pa.uint8()),
    ]
    + [(f, pa.bool_()) for f in FLAGS]
)


def split_of(week: int) -> str:
    return "test" if week == WEEKS - 1 else "validation" if week == WEEKS - 2 else "train"


class VkLsvdWriter:
    seconds = WEEKS * 7 * 86400
    expansion = 1.0

    def __init__(self, world: World, out_dir: str) -> None:
        self.world, self.out = world, out_dir
        rng, n = world.rng, world.num_items
        self.item_id = rng.permutation(n).astype(np.int64) + 1
        self.duration = rng.integers(5, 180, n)
        per = max(1, n // 40 // world.num_clusters)
        self.author = world.item_cluster * per + rng.integers(0, per, n)
        self.platform = rng.integers(0, 3, world.num_users)
        self.agent = rng.integers(0, 6, world.num_users)
        self.sink: ParquetSink | None = None
        self.week = -1
        self.files: list[str] = []

    def expand(self, sl: SliceEvents) -> dict[str, dict[str, np.ndarray]]:
        rng, n, aff = self.world.rng, len(sl), sl.affinity
        frac = np.where(aff, rng.beta(5.0, 2.0, n), rng.beta(1.5, 4.0, n))
        spent = np.minimum(255, np.round(frac * self.duration[sl.item])).astype(np.int64)
        r = {f: rng.random(n) for f in FLAGS}
        cols = {
            "_t": sl.time,
            "user_id": sl.user + 1,
            "item_id": self.item_id[sl.item],
            "place": rng.choice(4, size=n, p=(0.7, 0.1, 0.1, 0.1)),
            "platform": self.platform[sl.user],
            "agent": self.agent[sl.user],
            "timespent": spent,
            "like": r["like"] < 0.02 + 0.3 * aff * frac,
            "dislike": r["dislike"] < 0.08 * ~aff * (frac < 0.2),
            "share": r["share"] < 0.005 + 0.05 * aff * frac,
            "bookmark": r["bookmark"] < 0.01 + 0.04 * aff * frac,
            "click_on_author": r["click_on_author"] < 0.02 + 0.03 * aff,
            "open_comments": r["open_comments"] < 0.03,
        }
        return {"interactions": cols}

    def write(self, streams: dict[str, dict[str, np.ndarray]], t0: float) -> None:
        week = min(WEEKS - 1, int(t0 // (7 * 86400)))  # a whole slice goes to one week
        if week != self.week:
            if self.sink is not None:
                self.files.append(self.sink.close())
            path = os.path.join(
                self.out, "interactions", split_of(week), f"week_{week:02d}.parquet"
            )
            self.sink, self.week = ParquetSink(path, INTERACTIONS), week
        self.sink.write({k: v for k, v in streams["interactions"].items() if k != "_t"})

    def close(self) -> list[str]:
        if self.sink is not None:
            self.files.append(self.sink.close())
        w = self.world
        order = np.argsort(self.item_id)
        meta = write_table(
            os.path.join(self.out, "metadata", "items_metadata.parquet"),
            {
                "item_id": self.item_id[order],
                "author_id": self.author[order],
                "duration": self.duration[order],
            },
            pa.schema(
                [("item_id", pa.uint32()), ("author_id", pa.uint32()), ("duration", pa.uint16())]
            ),
        )
        emb_path = os.path.join(self.out, "metadata", "item_embeddings.npz")
        np.savez(
            emb_path,
            item_id=self.item_id[order].astype(np.uint32),
            embedding=w.item_embedding[order].astype(np.float16),
        )
        return self.files + [meta, emb_path]
