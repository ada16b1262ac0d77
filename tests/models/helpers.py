"""Small configs and batches for the model tests."""

from __future__ import annotations

import torch

from genrec.config import Config, TableConfig
from genrec.data_pipeline.batch import Batch, make_batch


def small_config(**model) -> Config:
    cfg = Config()
    cfg.embeddings.tables = [
        TableConfig(name="item", num_embeddings=512, dim=16, features=["item_id"]),
        TableConfig(name="category", num_embeddings=64, dim=16, features=["category"]),
    ]
    m = cfg.model
    m.dim, m.num_layers, m.num_heads, m.attn_dim, m.linear_dim = 16, 2, 2, 8, 8
    m.dropout, m.max_len, m.num_time_buckets = 0.0, 32, 32
    for k, v in model.items():
        setattr(m, k, v)
    return cfg


def random_batch(lengths, num_targets, seed=0, num_items=50) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    T = int(lengths.sum())
    return make_batch(
        item_ids=torch.randint(0, num_items, (T,), generator=g),
        actions=torch.randint(0, 4, (T,), generator=g),
        timestamps=torch.cumsum(torch.randint(1, 1000, (T,), generator=g), 0),
        lengths=lengths,
        num_targets=torch.tensor(num_targets),
        user_ids=torch.arange(lengths.numel()),
        windows=torch.zeros(lengths.numel(), dtype=torch.int64),
        context={"category": torch.randint(0, 10, (T,), generator=g)},
    )


def edit(
    batch: Batch,
    index: int,
    item: int | None = None,
    action: int | None = None,
    category: int | None = None,
) -> Batch:
    """A copy of `batch` with event `index` (flat) changed."""
    items, actions = batch.item_ids.clone(), batch.actions.clone()
    cats = batch.features["category"].values().clone()
    if item is not None:
        items[index] = item
    if action is not None:
        actions[index] = action
    if category is not None:
        cats[index] = category
    return make_batch(
        items,
        actions,
        batch.timestamps,
        batch.lengths,
        batch.num_targets,
        batch.user_ids,
        batch.windows,
        context={"category": cats},
    )
