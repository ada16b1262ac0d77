"""`Batch`: what a training rank consumes. Jagged end to end, nothing padded.

A batch holds B sequences. Sequence b has `lengths[b]` events; its last `num_targets[b]`
events are the targets (this window's events), the ones before are history. Sparse
features are one `KeyedJaggedTensor` whose keys all share the per-sequence lengths:
"item_id" (raw ids, hashed inside the model), "action", then any context features.
Timestamps are jagged values aligned with "item_id".

Rows of the sequence schema become sequences with `sequences_from_rows`: a row longer than
`max_len` is cut into chunks so that every target is a target exactly once and each chunk
keeps as much preceding history as fits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

ITEM_KEY = "item_id"
ACTION_KEY = "action"


@dataclass
class Batch:
    features: KeyedJaggedTensor  # keys: item_id, action, context...; lengths per sequence
    timestamps: torch.Tensor  # int64 [num_tokens], aligned with features["item_id"]
    num_targets: torch.Tensor  # int64 [B]
    user_ids: torch.Tensor  # int64 [B]
    windows: torch.Tensor  # int64 [B]

    @property
    def lengths(self) -> torch.Tensor:
        return self.features[ITEM_KEY].lengths()

    @property
    def offsets(self) -> torch.Tensor:
        return self.features[ITEM_KEY].offsets()

    @property
    def item_ids(self) -> torch.Tensor:
        return self.features[ITEM_KEY].values()

    @property
    def actions(self) -> torch.Tensor:
        return self.features[ACTION_KEY].values()

    @property
    def batch_size(self) -> int:
        return int(self.user_ids.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.timestamps.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            features=self.features.to(torch.device(device), non_blocking=non_blocking),
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
                if f.name != "features"
            },
        )

    def pin_memory(self) -> Batch:
        kjt = self.features
        return Batch(
            features=KeyedJaggedTensor(
                keys=kjt.keys(),
                values=kjt.values().pin_memory(),
                lengths=kjt.lengths().pin_memory(),
            ),
            **{
                f.name: getattr(self, f.name).pin_memory()
                for f in fields(self)
                if f.name != "features"
            },
        )


def _chunks(n: int, num_history: int, max_len: int) -> list[tuple[int, int, int]]:
    """(start, end, num_targets) slices of a row of n events, each at most max_len long."""
    targets = n - num_history
    if targets <= 0:
        return []
    if targets <= max_len:
        return [(max(0, n - max_len), n, targets)]
    step = max(1, max_len // 2)
    out = []
    for t0 in range(num_history, n, step):
        t1 = min(n, t0 + step)
        out.append((max(0, t1 - max_len), t1, t1 - t0))
    return out


def sequences_from_rows(table: pa.Table, max_len: int, context: tuple[str, ...] = ()) -> Batch:
    """Turn sequence-schema rows into a Batch (rows longer than max_len are chunked)."""
    n_rows = table.num_rows
    list_cols = ["item_ids", "timestamps", "actions", *context]
    offs = table.column("item_ids").combine_chunks().offsets.to_numpy()
    flat = {c: table.column(c).combine_chunks().flatten().to_numpy() for c in list_cols}
    num_history = table.column("num_history").to_numpy().astype(np.int64)
    users = table.column("user_id").to_numpy()
    windows = table.column("window").to_numpy()

    starts, ends, n_tgt, rows = [], [], [], []
    for r in range(n_rows):
        base, n = int(offs[r]), int(offs[r + 1] - offs[r])
        for s, e, t in _chunks(n, int(num_history[r]), max_len):
            starts.append(base + s)
            ends.append(base + e)
            n_tgt.append(t)
            rows.append(r)
    starts_a = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(ends, dtype=np.int64) - starts_a
    # gather index of every token, chunk by chunk (vectorized ragged arange)
    if lengths.size:
        seg_start = np.repeat(starts_a - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        idx = np.arange(int(lengths.sum()), dtype=np.int64) + seg_start
    else:
        idx = np.zeros(0, dtype=np.int64)
    rows_a = np.asarray(rows, dtype=np.int64)
    return make_batch(
        item_ids=flat["item_ids"][idx],
        actions=flat["actions"][idx],
        timestamps=flat["timestamps"][idx],
        lengths=lengths,
        num_targets=np.asarray(n_tgt, dtype=np.int64),
        user_ids=users[rows_a] if rows_a.size else np.zeros(0, np.int64),
        windows=windows[rows_a] if rows_a.size else np.zeros(0, np.int64),
        context={c: flat[c][idx] for c in context},
    )


def make_batch(
    item_ids: np.ndarray | torch.Tensor,
    actions: np.ndarray | torch.Tensor,
    timestamps: np.ndarray | torch.Tensor,
    lengths: np.ndarray | torch.Tensor,
    num_targets: np.ndarray | torch.Tensor,
    user_ids: np.ndarray | torch.Tensor,
    windows: np.ndarray | torch.Tensor,
    context: dict[str, np.ndarray | torch.Tensor] | None = None,
) -> Batch:
    """Assemble a Batch from flat token arrays and per-sequence lengths."""

    def t(x, dtype=torch.int64):
        return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(dtype)

    lengths_t = t(lengths)
    keys = [ITEM_KEY, ACTION_KEY]
    values = [t(item_ids), t(actions)]
    for name, col in (context or {}).items():
        keys.append(name)
        values.append(t(col))  # context ids; float context goes through its own path
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
        lengths=lengths_t.repeat(len(keys)),
    )
    return Batch(
        features=kjt,
        timestamps=t(timestamps),
        num_targets=t(num_targets),
        user_ids=t(user_ids),
        windows=t(windows),
    )
