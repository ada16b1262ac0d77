from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.embeddings.hashing import (
    HASH_VERSION,
    check_hash_version,
    collision_report,
    feature_seed,
    hash_ids,
    hash_ids_np,
)


def test_torch_and_numpy_twins_agree_bit_for_bit():
    rng = np.random.default_rng(0)
    ids = np.concatenate(
        [rng.integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64), [0, -1, 2**63 - 1, -(2**63)]]
    )
    for seed, n in [(0, 7), (12345, 1 << 20), (feature_seed("item_id", 1), 30_000_000)]:
        rows = hash_ids(torch.from_numpy(ids), seed, n).numpy()
        assert np.array_equal(rows, hash_ids_np(ids, seed, n))
        assert rows.min() >= 0 and rows.max() < n


def test_hash_is_pinned_and_seeds_differ():
    ids = torch.arange(5)
    # pinned values: changing the function must bump HASH_VERSION
    assert hash_ids(ids, 0, 1000).tolist() == [727, 657, 302, 53, 978]
    assert not torch.equal(hash_ids(ids, 1, 1 << 30), hash_ids(ids, 2, 1 << 30))
    assert feature_seed("item_id", 0) != feature_seed("item_id", 1) != feature_seed("brand", 0)
    assert HASH_VERSION == 1
    with pytest.raises(ValueError, match="hash_version=2"):
        check_hash_version(2)


@pytest.mark.parametrize(
    "vocab,buckets,k", [(20_000, 50_000, 1), (5_000, 200, 2), (3_000, 1_000, 1)]
)
def test_measured_collisions_match_birthday_bound(vocab, buckets, k):
    r = collision_report(vocab, buckets, num_hashes=k)
    expected = 1 - (1 - 1 / buckets**k) ** (vocab - 1)
    assert r["expected_collision_rate"] == pytest.approx(expected, rel=1e-9)
    # binomial-ish spread of the fraction, generous 5 sigma
    sigma = (expected * (1 - expected) / vocab) ** 0.5 * 2
    assert abs(r["measured_collision_rate"] - expected) < 5 * sigma + 1e-3, r
    assert abs(r["measured_occupied_rows"] - r["expected_occupied_rows"]) < 0.02 * buckets + 10
