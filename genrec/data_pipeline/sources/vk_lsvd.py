"""VK-LSVD (short videos): weekly interaction files without a time column.

Layout:
    interactions/{train,validation,test}/week_NN.parquet   user_id, item_id (uint32), place,
        platform, agent (uint8), timespent (uint8 seconds), like, dislike, share, bookmark,
        click_on_author, open_comments (bool)
    metadata/items_metadata.parquet (item_id, author_id, duration), item_embeddings.npz

Row order inside a week file is time order, so the order key is
`timestamp = week << 40 | row`, where row counts the week's rows in file order (a week
split over several files is read in path order). Windows are weeks whatever the window
spec: `prepare` uses the week number as the window id.

Actions, strongest signal first: dislike -> skip, share -> share, like or bookmark -> like,
click_on_author or open_comments -> click, otherwise view. Context: `surface` = place,
`watch_time` = timespent seconds.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from genrec.data_pipeline.schemas import ACTIONS
from genrec.data_pipeline.sources.base import FileKind, ParquetSource, bool_col

FLAGS = ("like", "dislike", "share", "bookmark", "click_on_author", "open_comments")
TYPES = {
    "user_id": "int",
    "item_id": "int",
    "place": "int",
    "timespent": "int",
    **dict.fromkeys(FLAGS, "bool"),
}


def flags_to_action(raw: pa.RecordBatch) -> np.ndarray:
    f = {name: bool_col(raw, name) for name in FLAGS}
    out = np.full(raw.num_rows, ACTIONS["view"], np.int32)
    # assign weakest first so stronger signals overwrite
    out[f["click_on_author"] | f["open_comments"]] = ACTIONS["click"]
    out[f["like"] | f["bookmark"]] = ACTIONS["like"]
    out[f["share"]] = ACTIONS["share"]
    out[f["dislike"]] = ACTIONS["skip"]
    return out


VK_LSVD = ParquetSource(
    name="vk_lsvd",
    kinds=[
        FileKind(
            glob="interactions/*/week_*.parquet",
            types=TYPES,
            user="user_id",
            item="item_id",
            time=None,
            action_fn=flags_to_action,
            context={"surface": "place", "watch_time": "timespent"},
            window_pattern=r"week_(\d+)",
        )
    ],
    context=("surface", "watch_time"),
)
