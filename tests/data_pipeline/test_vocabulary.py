"""Vocabulary: frequent ids own rows by frequency, the rest share hashed overflow rows; the
file round-trips to the same rows; a missing file fails naming it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from genrec.data_pipeline.schemas import ITEMS, ITEMS_FILE
from genrec.data_pipeline.vocabulary import Vocabulary, write_item_vocabulary
from genrec.embeddings.hashing import feature_seed, hash_ids_np


def test_rows_by_frequency_min_count_and_overflow(tmp_path):
    ids = np.array([50, 7, 9, 1 << 60, 3, 11], np.int64)
    counts = np.array([5, 9, 5, 2, 1, 9], np.int64)
    pq.write_table(pa.table({"item_id": ids, "count": counts}, schema=ITEMS), tmp_path / ITEMS_FILE)
    v = write_item_vocabulary(str(tmp_path), min_count=2, overflow_rows=4)
    assert v.ids.tolist() == [7, 11, 9, 50, 1 << 60]  # by count, ties by smaller id; 3 < 2
    assert v.num_rows == 5 + 4
    raw = np.array([11, 7, 1 << 60, 3, -5, 123456789], np.int64)
    rows = v.rows(raw)
    over = 5 + hash_ids_np(raw[3:], feature_seed("item_id", 0), 4)
    assert rows.tolist() == [1, 0, 4, *over.tolist()]  # rare (3) and unseen ids: overflow
    assert ((rows >= 0) & (rows < v.num_rows)).all()
    again = Vocabulary.read(str(tmp_path), "item_id")  # what training/export/serving load
    assert np.array_equal(again.rows(raw), rows) and again.num_rows == v.num_rows
    assert again.rows_torch(torch.from_numpy(raw)).tolist() == rows.tolist()  # model side


def test_torch_rows_equal_numpy_rows_on_many_ids():
    rng = np.random.default_rng(0)
    ids = rng.choice(1 << 62, 5000, replace=False).astype(np.int64)
    v = Vocabulary.from_counts(ids, rng.zipf(1.3, ids.size), min_count=2, overflow_rows=97)
    raw = np.r_[ids, rng.integers(-(1 << 62), 1 << 62, 5000)]
    assert np.array_equal(v.rows_torch(torch.from_numpy(raw)).numpy(), v.rows(raw))


def test_missing_or_foreign_vocabulary_fails_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocab/user_id.parquet is missing.*hashed"):
        Vocabulary.read(str(tmp_path), "user_id")
    (tmp_path / "vocab").mkdir()
    pq.write_table(pa.table({"id": [1]}), tmp_path / "vocab" / "item_id.parquet")
    with pytest.raises(ValueError, match="item_id.parquet: not a genrec vocabulary"):
        Vocabulary.read(str(tmp_path), "item_id")
