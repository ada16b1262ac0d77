"""An id -> row vocabulary per feature: frequent ids get a row of their own, the rest share
hashed overflow rows.

    vocab = Vocabulary.from_counts(ids, counts, min_count=2, overflow_rows=1024, feature="item_id")
    rows = vocab.rows(raw_ids)        # int64 numpy, each in [0, vocab.num_rows)
    rows = vocab.rows_torch(raw_ids)  # the same rows from torch ops (traceable for export)
    vocab.write(prepared_dir)         # PREPARED/vocab/item_id.parquet (id, count; row = position)

Rows 0..V-1 hold the V ids counted at least `min_count` times, most frequent first (ties:
smaller id first), at most `max_rows`; rows V..V+O-1 are O overflow rows that every other id,
rare or never seen, reaches through the versioned hash (embeddings.hashing, seed of the
feature), so any int64 id maps to a row and the mapping never changes once written.

Counts come from prepare's Ray item tasks (items.parquet: every item with its event count);
`write_item_vocabulary` builds the item vocabulary from them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from genrec.data_pipeline.schemas import ITEMS_FILE
from genrec.embeddings.hashing import feature_seed, hash_ids, hash_ids_np

VOCAB_DIR = "vocab"
VOCAB_SCHEMA = pa.schema(
    [pa.field("id", pa.int64(), nullable=False), pa.field("count", pa.int64(), nullable=False)]
)


@dataclass(frozen=True)
class Vocabulary:
    """Ids in row order (`ids[r]` owns row r) plus `overflow_rows` hashed rows."""

    feature: str
    ids: np.ndarray  # int64, row order
    counts: np.ndarray  # int64, the count of each id
    overflow_rows: int
    min_count: int
    hash_version: int = 1
    source: str = field(default="", compare=False)  # the file it was read from, if any

    def __post_init__(self):
        if self.overflow_rows < 1:
            raise ValueError(f"overflow_rows must be >= 1, got {self.overflow_rows}")
        order = np.argsort(self.ids, kind="stable")
        object.__setattr__(self, "_sorted", self.ids[order])
        object.__setattr__(self, "_row_of_sorted", order.astype(np.int64))

    @property
    def num_rows(self) -> int:
        return int(self.ids.size) + self.overflow_rows

    def digest(self) -> np.ndarray:
        """sha256 of the mapping (feature, ids in row order, overflow rows, hash version) as
        4 int64: what a checkpoint records to catch a different vocabulary later."""
        h = hashlib.sha256(f"{self.feature}|{self.overflow_rows}|{self.hash_version}|".encode())
        h.update(np.ascontiguousarray(self.ids, dtype="<i8").tobytes())
        return np.frombuffer(h.digest(), dtype="<i8").copy()

    @classmethod
    def from_counts(
        cls,
        ids: np.ndarray,
        counts: np.ndarray,
        min_count: int = 1,
        overflow_rows: int = 1024,
        max_rows: int = 0,
        feature: str = "item_id",
    ) -> Vocabulary:
        """Ids counted >= min_count, most frequent first (ties: smaller id), at most max_rows."""
        ids, counts = np.asarray(ids, np.int64), np.asarray(counts, np.int64)
        keep = counts >= min_count
        ids, counts = ids[keep], counts[keep]
        order = np.lexsort((ids, -counts))
        if max_rows:
            order = order[:max_rows]
        return cls(feature, ids[order], counts[order], overflow_rows, min_count)

    def rows(self, raw: np.ndarray) -> np.ndarray:
        """Raw ids -> rows: own row if in the vocabulary, else a hashed overflow row."""
        raw = np.asarray(raw, np.int64)
        at = np.searchsorted(self._sorted, raw)
        at_c = np.minimum(at, max(self._sorted.size - 1, 0))
        known = (at < self._sorted.size) & (self._sorted[at_c] == raw) if self._sorted.size else (
            np.zeros(raw.shape, bool)
        )  # fmt: skip
        seed = feature_seed(self.feature, 0, self.hash_version)
        over = self.ids.size + hash_ids_np(raw, seed, self.overflow_rows)
        return np.where(known, self._row_of_sorted[at_c] if self._sorted.size else 0, over)

    def rows_torch(self, raw: torch.Tensor) -> torch.Tensor:
        """`rows` in torch ops (searchsorted + the torch hash): the model-side twin that an
        embedding table of kind vocab and the exported program use; tests pin equality."""
        on_device = self.__dict__.setdefault("_on_device", {})  # one copy per device
        if raw.device not in on_device:
            on_device[raw.device] = (
                torch.from_numpy(self._sorted).to(raw.device),
                torch.from_numpy(self._row_of_sorted).to(raw.device),
            )
        sorted_ids, row_of_sorted = on_device[raw.device]
        return vocab_rows_torch(
            raw,
            sorted_ids,
            row_of_sorted,
            self.ids.size,
            self.overflow_rows,
            feature_seed(self.feature, 0, self.hash_version),
        )

    # ---- files
    def path(self, prepared_dir: str) -> Path:
        return vocab_path(prepared_dir, self.feature)

    def write(self, prepared_dir: str) -> Path:
        path = self.path(prepared_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "overflow_rows": self.overflow_rows,
            "min_count": self.min_count,
            "hash_version": self.hash_version,
            "num_rows": self.num_rows,
        }
        table = pa.table({"id": self.ids, "count": self.counts}, schema=VOCAB_SCHEMA)
        table = table.replace_schema_metadata({"genrec.vocab": json.dumps(meta)})
        pq.write_table(table, str(path) + ".tmp")
        Path(str(path) + ".tmp").replace(path)
        return path

    @classmethod
    def read(cls, prepared_dir: str, feature: str, fix: str = "") -> Vocabulary:
        """The vocabulary of `feature` under `prepared_dir` (a prepared dir or an artifact);
        `fix`: what the error of a missing or foreign file tells the user to do."""
        path = vocab_path(prepared_dir, feature)
        fix = fix or (
            "build it with `genrec prepare ... --vocab-min-count N` (or "
            "write_item_vocabulary), or use a hashed table for this feature"
        )
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {fix}")
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"genrec.vocab")
        if raw is None or table.schema.remove_metadata() != VOCAB_SCHEMA:
            raise ValueError(f"{path}: not a genrec vocabulary (id, count + metadata): {fix}")
        meta = json.loads(raw)
        vocab = cls(
            feature,
            table.column("id").to_numpy(),
            table.column("count").to_numpy(),
            int(meta["overflow_rows"]),
            int(meta["min_count"]),
            int(meta["hash_version"]),
            str(path),
        )
        if vocab.num_rows != int(meta["num_rows"]):
            raise ValueError(f"{path}: {vocab.num_rows} rows, metadata says {meta['num_rows']}")
        return vocab


def vocab_path(prepared_dir: str | Path, feature: str) -> Path:
    """Where the vocabulary of `feature` lives: DIR/vocab/FEATURE.parquet (a prepared dir, or
    an artifact, which keeps the same layout)."""
    return Path(prepared_dir) / VOCAB_DIR / f"{feature}.parquet"


def vocab_rows_torch(
    raw: torch.Tensor,
    sorted_ids: torch.Tensor,
    row_of_sorted: torch.Tensor,
    num_own: int,
    overflow_rows: int,
    seed: int,
) -> torch.Tensor:
    """Raw int64 ids (any shape) -> rows: `row_of_sorted[i]` where `sorted_ids[i] == id`,
    else `num_own + hash(id) % overflow_rows`."""
    raw = raw.to(torch.int64)
    over = num_own + hash_ids(raw, seed, overflow_rows)
    if sorted_ids.numel() == 0:
        return over
    at = torch.searchsorted(sorted_ids, raw)
    at_c = at.clamp(max=sorted_ids.numel() - 1)
    known = (at < sorted_ids.numel()) & (sorted_ids[at_c] == raw)
    return torch.where(known, row_of_sorted[at_c], over)


def write_item_vocabulary(
    prepared_dir: str, min_count: int = 1, overflow_rows: int = 1024, max_rows: int = 0
) -> Vocabulary:
    """The item_id vocabulary from prepare's item counts (items.parquet), written beside it."""
    items = pq.read_table(Path(prepared_dir) / ITEMS_FILE)
    vocab = Vocabulary.from_counts(
        items.column("item_id").to_numpy(),
        items.column("count").to_numpy(),
        min_count,
        overflow_rows,
        max_rows,
        "item_id",
    )
    vocab.write(prepared_dir)
    return vocab
