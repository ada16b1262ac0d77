"""`Batch`: what a training rank consumes. Jagged end to end, nothing padded.

A batch holds B sequences. Sequence b has `lengths[b]` events; its last `num_targets[b]`
events are the targets (this window's events), the ones before are history. Sparse
features are one `KeyedJaggedTensor` whose keys all share the per-sequence lengths:
"item_id" (raw ids, hashed inside the model), "action", then any integer context features.
Timestamps are jagged values aligned with "item_id".

Rows of the sequence schema become sequences with `sequences_from_rows`: a row longer than
`max_len` is cut into chunks so that every target is a target exactly once and each chunk
keeps as much preceding history as fits. A row without targets yields no sequence.

A *filler* batch (see `filler_batch`) is one sequence of one real token with
num_targets=0: it contributes no loss and no metrics, and exists only so that every rank
runs the same number of steps (collectives never wait on a rank that ran out of rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

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

    @property
    def is_filler(self) -> bool:
        """True when nothing in the batch is a target (a filler: no loss, no metrics)."""
        return int(self.num_targets.sum()) == 0

    def _dense(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "features"}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        device = torch.device(device)
        return Batch(
            features=self.features.to(device, non_blocking=non_blocking),
            **{k: v.to(device, non_blocking=non_blocking) for k, v in self._dense().items()},
        )

    def pin_memory(self) -> Batch:
        """Page-locked copy for fast async host-to-GPU copies; `self` when there is no CUDA."""
        if not torch.cuda.is_available():
            return self
        kjt = self.features
        return Batch(
            features=KeyedJaggedTensor(
                keys=kjt.keys(),
                values=kjt.values().pin_memory(),
                lengths=kjt.lengths().pin_memory(),
            ),
            **{k: v.pin_memory() for k, v in self._dense().items()},
        )

    def record_stream(self, stream: torch.Stream) -> None:
        """Tell the CUDA caching allocator that `stream` uses these tensors."""
        self.features.record_stream(stream)
        for v in self._dense().values():
            v.record_stream(stream)


@dataclass
class StepBatch(Pipelineable):
    """One training step's model input, prepared on the host (TorchRec's `Pipelineable`).

    The sharded collections' inputs are attributes (`ec_rows`, `mc_rows`: table rows, hashed
    on the host), which is what lets TorchRec's train pipeline start their input
    distribution one step ahead. Sizes the model would otherwise read back from the device
    are Python ints. `step` and `info` are the runner's bookkeeping; `to` carries them along.

    Layout of the lookup: B sequences, plus one more "sample" holding `negatives` in the
    item_id key (every other key has length 0 there): item rows [num_events + n_negatives].
    """

    batch: Batch  # the sequences (dense path: actions, timestamps, lengths, targets)
    ec_rows: KeyedJaggedTensor | None  # rows of the sharded EmbeddingCollection's keys
    mc_rows: KeyedJaggedTensor | None  # raw ids of the managed-collision tables
    dp_rows: KeyedJaggedTensor | None  # rows of the replicated (data-parallel) tables
    negatives: torch.Tensor  # int64 [N] raw ids (empty for ranking)
    neg_log_q: torch.Tensor  # float [N]
    num_events: int  # events in `batch` (the lookup's first num_events item rows)
    num_targets: int  # positions the loss averages over (retrieval) or candidates (ranking)
    tokens: object = None  # the model's token layout sizes (models.tokens.TokenSizes)
    step: int = -1  # the trainer step this batch is for
    info: dict = field(default_factory=dict)  # the runner's (stream position, input wait)

    _KJTS = ("ec_rows", "mc_rows", "dp_rows")

    def _map(self, kjt_fn, tensor_fn, batch_fn) -> StepBatch:
        kjts = {
            k: None if getattr(self, k) is None else kjt_fn(getattr(self, k)) for k in self._KJTS
        }
        return StepBatch(
            batch=batch_fn(self.batch),
            **kjts,
            negatives=tensor_fn(self.negatives),
            neg_log_q=tensor_fn(self.neg_log_q),
            num_events=self.num_events,
            num_targets=self.num_targets,
            tokens=self.tokens,
            step=self.step,
            info=self.info,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StepBatch:
        return self._map(
            lambda k: k.to(device, non_blocking=non_blocking),
            lambda t: t.to(device, non_blocking=non_blocking),
            lambda b: b.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> StepBatch:
        if not torch.cuda.is_available():
            return self
        return self._map(
            lambda k: KeyedJaggedTensor(
                keys=k.keys(),
                values=k.values().pin_memory(),
                lengths=k.lengths().pin_memory(),
                stride=k.stride(),
            ),
            lambda t: t.pin_memory(),
            lambda b: b.pin_memory(),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.batch.record_stream(stream)
        for k in self._KJTS:
            if getattr(self, k) is not None:
                getattr(self, k).record_stream(stream)
        self.negatives.record_stream(stream)
        self.neg_log_q.record_stream(stream)


def _chunk_plan(
    n: np.ndarray, num_history: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per chunk (row, start, end, num_targets) and chunks per row, vectorized over rows.

    A row with t = n - num_history targets: t <= 0 gives no chunk; t <= max_len gives one
    chunk ending at the row's end; a longer row is cut into target blocks of max_len // 2,
    each preceded by as much history as fits in max_len.
    """
    targets = n - num_history
    step = max(1, max_len // 2)
    multi = targets > max_len
    count = np.where(targets <= 0, 0, np.where(multi, -(-targets // step), 1))
    rows = np.repeat(np.arange(n.size, dtype=np.int64), count)
    first = np.cumsum(count) - count
    j = np.arange(rows.size, dtype=np.int64) - np.repeat(first, count)
    t0 = num_history[rows] + j * step
    end = np.where(multi[rows], np.minimum(n[rows], t0 + step), n[rows])
    start = np.maximum(0, end - max_len)
    return rows, start, end, end - t0, count


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = starts - (np.cumsum(lengths) - lengths)
    return np.arange(total, dtype=np.int64) + np.repeat(shift, lengths)


def _numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Zero-copy, read-only numpy view of an integer column (pyarrow's to_numpy imports
    pandas on first use, ~0.4 s, and costs more per call)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if not pa.types.is_integer(col.type) or col.null_count or len(col) == 0:
        return col.to_numpy(zero_copy_only=False)
    kind = "u" if pa.types.is_unsigned_integer(col.type) else "i"
    dt = np.dtype(f"{kind}{col.type.bit_width // 8}")
    return np.frombuffer(col.buffers()[1], dt, len(col), col.offset * dt.itemsize)


def _list_column(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets from 0, flat values, is-null mask) of a list column, however chunked/sliced."""
    if isinstance(col, pa.ChunkedArray):
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    else:
        arr = col
    offsets = _numpy(arr.offsets).astype(np.int64)
    nulls = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
    return offsets - offsets[0], _numpy(arr.flatten()), nulls


class BadRowError(ValueError):
    """A sequence row whose lists disagree in length or whose num_history does not fit."""


class SequenceRows:
    """Sequence-schema rows decoded once and planned into chunks; slice them into Batches.

    Building one over a few thousand rows and cutting many small batches out of it keeps the
    per-batch cost to a handful of numpy gathers. Rows that are bad (list columns of
    different lengths, null lists, num_history outside [0, length]) raise `BadRowError`, or
    with `skip_bad=True` yield nothing and are counted in `num_bad`.
    """

    def __init__(
        self,
        table: pa.Table,
        max_len: int,
        context: tuple[str, ...] = (),
        skip_bad: bool = False,
    ):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.num_rows, self.context = table.num_rows, tuple(context)
        cols = ("item_ids", "actions", "timestamps", *context)
        self.offsets: dict[str, np.ndarray] = {}
        self.flat: dict[str, np.ndarray] = {}
        bad = np.zeros(self.num_rows, dtype=bool)
        for c in cols:
            offs, self.flat[c], nulls = _list_column(table.column(c))
            if nulls is not None:
                bad |= nulls
            if c != "item_ids" and np.array_equal(offs, self.offsets["item_ids"]):
                offs = self.offsets["item_ids"]  # aligned (the normal case): one gather
            else:
                bad |= np.diff(offs) != np.diff(self.offsets.get("item_ids", offs))
            self.offsets[c] = offs
        self.n = np.diff(self.offsets["item_ids"])
        hist = _numpy(table.column("num_history")).astype(np.int64)
        bad |= (hist < 0) | (hist > self.n)
        self.user_ids = _numpy(table.column("user_id"))
        self.windows = _numpy(table.column("window"))
        self.num_bad = int(bad.sum())
        if self.num_bad:
            if not skip_bad:
                i = int(np.argmax(bad))
                lens = {c: int(np.diff(self.offsets[c])[i]) for c in cols}
                raise BadRowError(
                    f"bad sequence row (user_id {self.user_ids[i]}, window {self.windows[i]}, "
                    f"num_history {hist[i]}, list lengths {lens}): list columns must be non-null "
                    "and of equal length, and 0 <= num_history <= length"
                )
            hist = np.where(bad, self.n, hist)  # a bad row keeps its place but has no targets
        self.bad = bad
        self._rows, self._start, self._end, self._tgt, count = _chunk_plan(self.n, hist, max_len)
        self.chunks_per_row = count
        self._first = np.concatenate([[0], np.cumsum(count)])
        # rows that are one chunk spanning the whole row: a run of them is one slice of tokens
        self._whole = np.concatenate([[0], np.cumsum((count == 1) & (self.n <= max_len))])

    def batch(self, lo: int = 0, hi: int | None = None) -> Batch:
        return concat_rows([(self, lo, self.num_rows if hi is None else hi)])

    def _arrays(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Token and per-sequence arrays of rows [lo, hi)."""
        c0, c1 = int(self._first[lo]), int(self._first[hi])
        rows = self._rows[c0:c1]
        start, end = self._start[c0:c1], self._end[c0:c1]
        out = {
            "lengths": end - start,
            "num_targets": self._tgt[c0:c1],
            "user_ids": self.user_ids[rows],
            "windows": self.windows[rows],
        }
        base = self.offsets["item_ids"]
        if self._whole[hi] - self._whole[lo] == hi - lo:
            take = slice(int(base[lo]), int(base[hi]))
        else:
            take = _ragged_arange(base[rows] + start, end - start)
        for c in ("item_ids", "actions", "timestamps", *self.context):
            offs = self.offsets[c]  # its own offsets only around skipped misaligned rows
            own = take if offs is base else _ragged_arange(offs[rows] + start, end - start)
            out[c] = self.flat[c][own]
        return out

    def first_token(self, lo: int, hi: int) -> dict[str, int] | None:
        """The first event of the first usable row in [lo, hi) (for filler batches)."""
        usable = np.flatnonzero((self.n[lo:hi] > 0) & ~self.bad[lo:hi])
        if usable.size == 0:
            return None
        r = lo + int(usable[0])
        tok = {c: int(self.flat[c][self.offsets[c][r]]) for c in ("item_ids", "actions")}
        tok["timestamps"] = int(self.flat["timestamps"][self.offsets["timestamps"][r]])
        tok["user_id"] = int(self.user_ids[r])
        tok["context"] = {c: int(self.flat[c][self.offsets[c][r]]) for c in self.context}
        return tok


def concat_rows(pieces: list[tuple[SequenceRows, int, int]]) -> Batch:
    """One Batch from row ranges of one or more SequenceRows (in order)."""
    parts = [p._arrays(lo, hi) for p, lo, hi in pieces]
    if len(parts) == 1:
        a = parts[0]
    else:
        a = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    context = pieces[0][0].context if pieces else ()
    return make_batch(
        item_ids=a["item_ids"],
        actions=a["actions"],
        timestamps=a["timestamps"],
        lengths=a["lengths"],
        num_targets=a["num_targets"],
        user_ids=a["user_ids"],
        windows=a["windows"],
        context={c: a[c] for c in context},
    )


def sequences_from_rows(table: pa.Table, max_len: int, context: tuple[str, ...] = ()) -> Batch:
    """Turn sequence-schema rows into a Batch (rows longer than max_len are chunked)."""
    return SequenceRows(table, max_len, context).batch()


def _int64(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.to(torch.int64)
    a = np.asarray(x)
    if a.dtype != np.int64 or not a.flags.writeable:
        # own a writable copy: arrow-backed arrays are read-only views into decoded pages
        a = np.array(a, dtype=np.int64)
    return torch.from_numpy(a)


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
    keys = [ITEM_KEY, ACTION_KEY, *(context or {})]
    cols = [item_ids, actions, *(context or {}).values()]  # context ids: integer features
    if any(torch.is_tensor(c) for c in (*cols, lengths)):
        values = torch.cat([_int64(c) for c in cols])
        kjt_lengths = _int64(lengths).repeat(len(keys))
    else:  # one copy each, straight into the KJT's buffers
        values = torch.from_numpy(np.concatenate(cols, dtype=np.int64))
        kjt_lengths = torch.from_numpy(np.concatenate([lengths] * len(keys), dtype=np.int64))
    return Batch(
        features=KeyedJaggedTensor(keys=keys, values=values, lengths=kjt_lengths),
        timestamps=_int64(timestamps),
        num_targets=_int64(num_targets),
        user_ids=_int64(user_ids),
        windows=_int64(windows),
    )


def filler_batch(
    item_id: int, action: int, timestamp: int, user_id: int, window: int, context: dict[str, int]
) -> Batch:
    """One sequence of one real token with num_targets=0: a step with nothing to learn."""
    one = np.ones(1, dtype=np.int64)
    return make_batch(
        item_ids=one * item_id,
        actions=one * action,
        timestamps=one * timestamp,
        lengths=one,
        num_targets=one * 0,
        user_ids=one * user_id,
        windows=one * window,
        context={k: one * v for k, v in context.items()},
    )
