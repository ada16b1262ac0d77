import numpy as np
import pytest
import torch

from genrec.semantic.tokenizers import (
    RQVAE,
    balanced_assign,
    code_stats,
    disambiguate,
    kmeans,
    residual_kmeans,
)


def blobs(centers: int, per: int, dim: int = 8, spread: float = 0.01, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim)) * 10
    x = np.repeat(c, per, axis=0) + rng.normal(size=(centers * per, dim)) * spread
    return x.astype(np.float32), np.repeat(np.arange(centers), per)


def test_well_separated_clusters_get_distinct_first_level_codes():
    x, label = blobs(centers=6, per=20)
    tok = residual_kmeans(x, [6, 4], iters=10, seed=1)
    first = tok.codes[:, 0]
    # one code per blob, and different blobs never share it
    for c in range(6):
        assert len(set(first[label == c])) == 1
    assert len({first[label == c][0] for c in range(6)}) == 6
    # the first level alone explains nearly everything
    assert code_stats(tok.codes, [6, 4], x, tok.x_hat)["reconstruction_error"] < 1e-4


def test_residual_levels_reduce_reconstruction_error():
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    errs = []
    for sizes in ([16], [16, 16], [16, 16, 16]):
        tok = residual_kmeans(x, sizes, iters=10, seed=0)
        errs.append(code_stats(tok.codes, sizes, x, tok.x_hat)["reconstruction_error"])
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("n,k", [(103, 10), (64, 8), (7, 3)])
def test_balanced_kmeans_sizes_differ_by_at_most_one(n, k):
    x = np.random.default_rng(n).normal(size=(n, 4)).astype(np.float32)
    x[: n // 2] += 5  # lopsided data: plain k-means would give uneven clusters
    _, assign = kmeans(torch.as_tensor(x), k, 5, torch.Generator().manual_seed(0), balanced=True)
    sizes = np.bincount(assign.numpy(), minlength=k)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1


def test_balanced_assign_takes_nearest_when_capacity_allows():
    # 4 points, 2 clusters of room 2: points 0,1 nearest cluster 0, points 2,3 cluster 1
    dist = torch.tensor([[0.0, 5.0], [1.0, 4.0], [5.0, 0.0], [4.0, 1.0]])
    assert balanced_assign(dist).tolist() == [0, 0, 1, 1]
    # all four prefer cluster 0: the two closest get it, the rest go to cluster 1
    dist = torch.tensor([[0.0, 9.0], [3.0, 9.0], [1.0, 9.0], [2.0, 9.0]])
    assert balanced_assign(dist).tolist() == [0, 1, 0, 1]


def test_disambiguate_makes_codes_unique_and_keeps_unique_ones_at_zero():
    codes = np.array([[0, 1], [2, 3], [0, 1], [0, 1], [2, 2]])
    out = disambiguate(codes)
    assert out.tolist() == [[0, 1, 0], [2, 3, 0], [0, 1, 1], [0, 1, 2], [2, 2, 0]]
    assert len(np.unique(out, axis=0)) == len(out)


def test_code_stats_equal_hand_computed_values():
    codes = np.array([[0, 0], [0, 0], [0, 1], [1, 1]])
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    x_hat = x.copy()
    x_hat[0, 0] = 0.0  # squared error 1 of sum ||x||^2 = 1 + 1 + 2 + 4 = 8
    s = code_stats(codes, [4, 2], x, x_hat)
    lv0, lv1 = s["levels"]
    assert (lv0["used"], lv0["dead"], lv0["usage"]) == (2, 2, 0.5)
    assert lv0["max_share"] == 0.75
    p = np.array([0.75, 0.25])
    assert lv0["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert lv0["collapsed"]  # one code holds 3 of 4 items
    assert (lv1["used"], lv1["usage"], lv1["collapsed"]) == (2, 1.0, False)
    assert s["collapsed_levels"] == [0]
    assert s["unique_codes"] == 3 and s["max_collisions"] == 2
    assert s["collision_rate"] == 0.5  # items 0 and 1 share [0, 0]
    assert s["reconstruction_error"] == pytest.approx(1 / 8)


def test_rqvae_reconstruction_error_decreases_over_training():
    x, _ = blobs(centers=8, per=16, dim=12, spread=0.5)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    model = RQVAE(in_dim=12, hidden_dim=32, latent_dim=8, sizes=[8, 8], beta=0.25)
    history = model.fit(x, epochs=15, batch_size=32, lr=3e-3, kmeans_iters=5, seed=0)
    assert history[-1] < 0.5 * history[0]
    tok = model.tokenize(x)
    assert tok.codes.shape == (128, 2) and tok.codes.max() < 8
    s = code_stats(tok.codes, [8, 8], x, tok.x_hat)
    assert s["reconstruction_error"] < 0.5


def test_rqvae_progressive_masking_trains():
    x, _ = blobs(centers=8, per=16, dim=12, spread=0.5)
    model = RQVAE(in_dim=12, hidden_dim=32, latent_dim=8, sizes=[8, 4, 2], beta=0.25)
    history = model.fit(x, epochs=20, batch_size=32, lr=3e-3, mask_prob=0.5, seed=0)
    assert history[-1] < history[0]
    assert model.tokenize(x).codes.shape == (128, 3)
