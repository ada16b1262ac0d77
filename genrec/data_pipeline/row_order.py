"""A window's global row order, defined over units (row groups) so any range is computable.

Units are the window's row groups (shard_index.WindowIndex.units); all of them hold
G = row_group_rows rows except each file's last ("short" units). The order is the same on
every rank and for every world size:

- `shuffle_buffer = 0`: the full units in file order, then the short units in file order;
  rows in file order;
- `shuffle_buffer = S > 0`: the full units are cut into consecutive blocks of
  K = max(1, S // G) units, each block permuted by a generator seeded with
  (seed, window, 0, block); the short units follow in file order; each unit's rows are
  permuted by a generator seeded with (seed, window, 1, unit).

Short units go last so that every full unit starts at a multiple of G: when G divides the
batch size, each rank's slice of a step is whole units and no unit is shared by two ranks
(only the window's last few steps, over the short units, can share). No state is needed to
find the row at any position.

`pieces(lo, hi)` names the units and in-unit ranges that hold global positions [lo, hi),
so a rank reads only the row groups under its own positions.

    order = WindowOrder(index, shuffle_buffer=0, seed=0)
    order.pieces(8, 14)   # [(unit, a, b), ...]: rows a..b-1 of the unit in its row order
"""

from __future__ import annotations

import numpy as np

from genrec.data_pipeline.shard_index import WindowIndex

Piece = tuple[int, int, int]  # (unit id in file order, first row, end row) in the unit's order


class WindowOrder:
    """Global positions -> (unit, rows) for one window (see module doc)."""

    def __init__(self, index: WindowIndex, shuffle_buffer: int, seed: int):
        self.index, self.seed, self.shuffled = index, seed, shuffle_buffer > 0
        self.unit_file, self.unit_group, self.unit_rows = index.units()
        full = self.unit_rows == index.row_group_rows
        full_ids, short_ids = np.flatnonzero(full), np.flatnonzero(~full)
        if self.shuffled:
            k = max(1, shuffle_buffer // index.row_group_rows)
            blocks = [full_ids[b : b + k] for b in range(0, full_ids.size, k)]
            full_ids = np.concatenate(
                [self._rng(0, i).permutation(u) for i, u in enumerate(blocks)]
                or [np.zeros(0, np.int64)]
            )
        self.order = np.r_[full_ids, short_ids].astype(np.int64)
        self.starts = np.r_[0, np.cumsum(self.unit_rows[self.order])]

    def _rng(self, kind: int, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.index.window, kind, int(i)])

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def pieces(self, lo: int, hi: int) -> list[Piece]:
        """Units and in-unit ranges of global positions [lo, hi), in order."""
        out: list[Piece] = []
        j = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while lo < hi:
            start, end = int(self.starts[j]), int(self.starts[j + 1])
            b = min(hi, end)
            out.append((int(self.order[j]), lo - start, b - start))
            lo, j = b, j + 1
        return out

    def row_perm(self, unit: int) -> np.ndarray | None:
        """The order of a unit's rows (None: file order)."""
        if not self.shuffled:
            return None
        return self._rng(1, unit).permutation(int(self.unit_rows[unit]))
