"""Jagged index helpers against the worked example of their docstring and a loop."""

from __future__ import annotations

import torch

from genrec.models.jagged import (
    length_bucket,
    lengths_from_offsets,
    offsets_from_lengths,
    padded_rows,
    positions,
    segment_ids,
)


def test_docstring_example():
    lengths = torch.tensor([2, 0, 3])
    offsets = offsets_from_lengths(lengths)
    assert offsets.tolist() == [0, 2, 2, 5]
    assert torch.equal(lengths_from_offsets(offsets), lengths)
    assert segment_ids(lengths).tolist() == [0, 0, 2, 2, 2]
    assert positions(lengths).tolist() == [0, 1, 0, 1, 2]
    rows, valid = padded_rows(offsets, torch.tensor([0, 2]), 3)
    assert rows.tolist() == [[0, 1, 0], [2, 3, 4]]
    assert valid.tolist() == [[True, True, False], [True, True, True]]


def test_against_a_loop():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 9, (40,), generator=g)
    offsets = offsets_from_lengths(lengths)
    seg = [b for b, n in enumerate(lengths.tolist()) for _ in range(n)]
    pos = [i for n in lengths.tolist() for i in range(n)]
    assert segment_ids(lengths).tolist() == seg
    assert positions(lengths).tolist() == pos
    members = torch.tensor([3, 0, 39, 17])
    rows, valid = padded_rows(offsets, members, 8)
    for r, b in enumerate(members.tolist()):
        n, start = int(lengths[b]), int(offsets[b])
        assert valid[r].tolist() == [i < n for i in range(8)]
        assert rows[r, :n].tolist() == list(range(start, start + n))
        assert (rows[r, n:] == start).all()


def test_length_bucket_pads_by_at_most_half():
    buckets = [length_bucket(n) for n in range(1, 5000)]
    for n, b in enumerate(buckets, start=1):
        assert n <= b and 2 * b <= 3 * n, n
    assert sorted(set(buckets))[:10] == [1, 2, 4, 6, 8, 12, 16, 24, 32, 48]
