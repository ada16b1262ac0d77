"""ItemIndex: exact search equals brute force; ANN recall vs exact; save/load round trips."""

from __future__ import annotations

import numpy as np
import pytest

from genrec.deploy.index import ItemIndex, recall_at_k


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors around 64 centres (like trained item embeddings, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d))
    x = centres[rng.integers(0, 64, n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalog():
    ids = np.random.default_rng(0).choice(10**9, 20_000, replace=False).astype(np.int64)
    return ids, clustered(20_000, 32, 1), clustered(200, 32, 2)


def brute_force(ids, emb, q, k, exclude):
    s = q @ emb.T
    for b, e in enumerate(exclude):
        s[b, np.isin(ids, list(e))] = -np.inf
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids[top], np.take_along_axis(s, top, 1)


def test_exact_search_equals_brute_force_with_exclusions(catalog):
    ids, emb, q = catalog
    index = ItemIndex(ids, emb, "exact", block=3000)  # several blocks, ragged last one
    exclude = [set(ids[b * 7 : b * 7 + b % 5].tolist()) for b in range(q.shape[0])]
    got_ids, got_s = index.search(q, 15, exclude)
    want_ids, want_s = brute_force(ids, emb, q, 15, exclude)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)


def test_exact_search_pads_when_k_exceeds_what_is_left():
    ids = np.array([5, 9, 2], dtype=np.int64)
    emb = np.eye(3, dtype=np.float32)
    got_ids, got_s = ItemIndex.build(ids, emb, "exact").search(np.ones((1, 3)), 4, [{9}])
    assert got_ids[0].tolist()[2:] == [-1, -1] and sorted(got_ids[0, :2].tolist()) == [2, 5]
    assert np.isneginf(got_s[0, 2:]).all()


@pytest.mark.parametrize("kind,min_recall", [("hnsw", 0.95), ("ivf", 0.90)])
def test_ann_recall_against_exact_and_round_trip(catalog, tmp_path, kind, min_recall):
    ids, emb, q = catalog
    exact = ItemIndex.build(ids, emb, "exact")
    ann = ItemIndex.build(ids, emb, kind)
    exclude = [set(exact.search(q[b : b + 1], 3)[0][0].tolist()) for b in range(q.shape[0])]
    want, _ = exact.search(q, 10, exclude)
    got, got_s = ann.search(q, 10, exclude)
    recall = recall_at_k(got, want)
    print(f"{kind} recall@10 vs exact = {recall:.4f}")
    assert recall >= min_recall
    assert not any(set(g.tolist()) & e for g, e in zip(got, exclude))  # exclusions honoured
    files = ann.save(tmp_path)
    assert files == ["index.json", "index.faiss"]
    again = ItemIndex.load(tmp_path, ids, emb)
    got2, got2_s = again.search(q, 10, exclude)
    np.testing.assert_array_equal(got2, got)
    np.testing.assert_array_equal(got2_s, got_s)


def test_index_rejects_mismatched_or_duplicate_ids():
    with pytest.raises(ValueError, match="unique"):
        ItemIndex.build(np.array([1, 1]), np.zeros((2, 4)), "exact")
    with pytest.raises(ValueError, match="disagree"):
        ItemIndex.build(np.array([1, 2, 3]), np.zeros((2, 4)), "hnsw")
    with pytest.raises(ValueError, match="kind"):
        ItemIndex.build(np.array([1, 2]), np.zeros((2, 4)), "lsh")
