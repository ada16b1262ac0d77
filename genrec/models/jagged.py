"""Index arithmetic on jagged batches: B sequences stored back to back as flat rows.

Sequence b owns flat rows offsets[b]:offsets[b+1] (offsets int64 [B+1], offsets[0] = 0).

Example::

    lengths = [2, 0, 3]            offsets = [0, 2, 2, 5]
    segment_ids(lengths)         = [0, 0, 2, 2, 2]   sequence of each flat row
    positions(lengths)           = [0, 1, 0, 1, 2]   index of each row within its sequence
    padded_rows(offsets, [0, 2], L=3)
        rows  = [[0, 1, 0], [2, 3, 4]]   flat row of each padded slot (padding: first row)
        valid = [[T, T, F], [T, T, T]]

`length_groups` groups sequences by length bucket so that each group is padded only to its
own longest sequence (the jagged ops' memory is then O(sum_b n_b^2), not O(B * L_max^2)).
"""

from __future__ import annotations

import torch

GROUP_SCORE_ELEMS = 1 << 23  # max G * H * L * L scores materialized at once per group chunk


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """int64 [B+1] offsets of int [B] lengths."""
    lengths = lengths.to(torch.int64)
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def lengths_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """int64 [B] lengths of int64 [B+1] offsets."""
    return offsets[1:] - offsets[:-1]


def segment_ids(lengths: torch.Tensor) -> torch.Tensor:
    """int64 [sum(lengths)]: the sequence index of every flat row."""
    ar = torch.arange(lengths.numel(), device=lengths.device)
    return torch.repeat_interleave(ar, lengths.to(torch.int64))


def positions(lengths: torch.Tensor) -> torch.Tensor:
    """int64 [sum(lengths)]: the index of every flat row within its own sequence."""
    lengths = lengths.to(torch.int64)
    starts = lengths.cumsum(0) - lengths
    total = int(lengths.sum())
    return torch.arange(total, device=lengths.device) - starts[segment_ids(lengths)]


def padded_rows(
    offsets: torch.Tensor, members: torch.Tensor, L: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows int64 [G, L], valid bool [G, L]) of the sequences `members` padded to L slots:
    rows[g, i] is the flat row of token i of sequence members[g]; padded slots point at the
    sequence's first row (their values must be masked or dropped by the caller)."""
    lens = (offsets[1:] - offsets[:-1])[members]
    ar = torch.arange(L, device=offsets.device)
    valid = ar[None, :] < lens[:, None]
    rows = offsets[members][:, None] + torch.where(valid, ar[None, :], 0)
    return rows, valid


def length_bucket(n: int) -> int:
    """The padded width class of a length-n sequence: the next 2^k or 1.5 * 2^k >= n."""
    top = 1 << max(0, (n - 1).bit_length())  # next power of two >= n
    return top * 3 // 4 if n <= top * 3 // 4 and top >= 8 else top


def length_groups(lengths: list[int], num_heads: int) -> list[tuple[list[int], int]]:
    """Non-empty sequence indices grouped by `length_bucket`, each group chunked so that its
    num_heads * L * L scores stay under GROUP_SCORE_ELEMS; [(members, L = longest member)]."""
    by_bucket: dict[int, list[int]] = {}
    for b, n in enumerate(lengths):
        if n > 0:
            by_bucket.setdefault(length_bucket(n), []).append(b)
    groups = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        L = max(lengths[b] for b in members)
        per_chunk = max(1, GROUP_SCORE_ELEMS // (num_heads * L * L))
        for s in range(0, len(members), per_chunk):
            chunk = members[s : s + per_chunk]
            groups.append((chunk, max(lengths[b] for b in chunk)))
    return groups
