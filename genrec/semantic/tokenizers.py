"""Item tokenizers: each item's vector becomes a short code of discrete tokens (a semantic ID).

    x [N, D] float32 --fit--> codes [N, L] int64, level l in [0, sizes[l])
                     --disambiguate--> codes [N, L + 1], every row unique

Two tokenizers, both returning a `Tokenized` (codes + the reconstruction of x they imply):

- `residual_kmeans`: level l clusters the residual left by levels < l into sizes[l]
  centroids (k-means++ init). `balanced=True` is OneRec's balanced k-means: every cluster
  of a level holds N // size or N // size + 1 items.
- `RQVAE` (TIGER): MLP encoder -> residual quantizer (one codebook per level, nearest
  codeword, straight-through gradient, codebook + commitment loss, k-means init) -> MLP
  decoder. `mask_prob` > 0 trains with progressive masking: that fraction of items is
  reconstructed from a random prefix of the levels only, so leading levels carry the most.

Sizes may differ per level (shrinking sizes: PLUM's multi-resolution codebooks). Items
whose codes collide get a final disambiguation token (0, 1, ... in item order).
`code_stats` reports codebook usage per level, the collision rate before disambiguation,
the relative reconstruction error, and flags collapsed levels.

Scale: one k-means iteration is an [N, size] distance matrix per level, blocked here in
`block` rows: at 30M items x 256 codes that is 7.7e9 distances (~1 s on a GPU per level
and iteration); fit on a sample and `encode` the rest for catalogs that large.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# a level is collapsed when it uses under this share of its usable codes (min(size, N)) ...
COLLAPSE_MIN_USAGE = 0.1
# ... or one code holds more than this share of the items
COLLAPSE_MAX_SHARE = 0.5


@dataclass
class Tokenized:
    """codes [N, L] int64 and x_hat [N, D] float32, the vector the codes decode to."""

    codes: np.ndarray
    x_hat: np.ndarray


# --------------------------------------------------------------------------- k-means


def squared_distances(x: torch.Tensor, c: torch.Tensor, block: int = 65536) -> torch.Tensor:
    """[N, K] squared Euclidean distances, computed in row blocks of `block`."""
    out = [torch.cdist(x[i : i + block], c).pow_(2) for i in range(0, x.shape[0], block)]
    return torch.cat(out) if out else x.new_zeros(0, c.shape[0])


def kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid drawn with probability ~ distance^2."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=gen)
    centroids = [x[first]]
    d2 = squared_distances(x, centroids[0]).squeeze(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: repeat a random point
            idx = torch.randint(n, (1,), generator=gen)
        else:
            idx = torch.multinomial(d2 / total, 1, generator=gen)
        centroids.append(x[idx])
        d2 = torch.minimum(d2, squared_distances(x, x[idx]).squeeze(1))
    return torch.cat(centroids)


def balanced_assign(dist: torch.Tensor) -> torch.Tensor:
    """Assign N points to K clusters of N // K or N // K + 1 points each, near-greedily.

    Rounds of proposals: every unassigned point proposes its nearest cluster with room
    left; each cluster accepts its closest proposers up to its remaining room. Every round
    assigns at least one point, and capacities sum to N, so every point is assigned.
    """
    n, k = dist.shape
    room = torch.full((k,), n // k, dtype=torch.long)
    room[: n % k] += 1
    assign = torch.full((n,), -1, dtype=torch.long)
    todo = torch.arange(n)
    while todo.numel():
        d = dist[todo].masked_fill(room.eq(0).unsqueeze(0), float("inf"))
        best_d, prop = d.min(dim=1)
        order = torch.argsort(best_d, stable=True)
        order = order[torch.argsort(prop[order], stable=True)]  # by cluster, then distance
        cl = prop[order]
        first = torch.searchsorted(cl, cl, right=False)  # start of each cluster's run
        rank = torch.arange(cl.numel()) - first
        ok = rank < room[cl]
        assign[todo[order[ok]]] = cl[ok]
        room -= torch.bincount(cl[ok], minlength=k)
        todo = todo[assign[todo] < 0]
    return assign


def kmeans(
    x: torch.Tensor, k: int, iters: int, gen: torch.Generator, balanced: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means (balanced: OneRec's equal-size variant). Returns centroids [k, D]
    and assignments [N]; an empty cluster keeps its previous centroid."""
    centroids = kmeans_pp_init(x, k, gen)
    assign = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(max(iters, 1)):
        dist = squared_distances(x, centroids)
        assign = balanced_assign(dist) if balanced else dist.argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids, assign


def residual_kmeans(
    x: np.ndarray, sizes: list[int], iters: int = 20, balanced: bool = False, seed: int = 0
) -> Tokenized:
    """Residual k-means: level l clusters what levels < l left unexplained."""
    gen = torch.Generator().manual_seed(seed)
    residual = torch.as_tensor(x, dtype=torch.float32)
    x_hat = torch.zeros_like(residual)
    codes = []
    for size in sizes:
        centroids, assign = kmeans(residual, size, iters, gen, balanced)
        codes.append(assign)
        x_hat += centroids[assign]
        residual = residual - centroids[assign]
    return Tokenized(torch.stack(codes, 1).numpy(), x_hat.numpy())


# --------------------------------------------------------------------------- RQ-VAE


class ResidualQuantizer(nn.Module):
    """One codebook per level; level l quantizes the residual of levels < l."""

    def __init__(self, sizes: list[int], dim: int, beta: float = 0.25):
        super().__init__()
        self.codebooks = nn.ModuleList(nn.Embedding(s, dim) for s in sizes)
        self.beta = beta

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, iters: int, gen: torch.Generator) -> None:
        residual = z
        for cb in self.codebooks:
            centroids, assign = kmeans(residual, cb.num_embeddings, iters, gen)
            cb.weight.copy_(centroids)
            residual = residual - centroids[assign]

    def forward(
        self, z: torch.Tensor, active: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, d]; active [B, L] 0/1 (None: every level). Returns the straight-through
        quantized z [B, d], codes [B, L] and the codebook + beta * commitment loss."""
        residual, quant = z, torch.zeros_like(z)
        codes, loss = [], z.new_zeros(())
        for level, cb in enumerate(self.codebooks):
            idx = squared_distances(residual.detach(), cb.weight.detach()).argmin(dim=1)
            e = cb(idx)
            m = 1.0 if active is None else active[:, level : level + 1]
            loss = loss + (((residual.detach() - e) ** 2) * m).sum(-1).mean()
            loss = loss + self.beta * (((residual - e.detach()) ** 2) * m).sum(-1).mean()
            quant = quant + e * m
            residual = residual - e.detach()
            codes.append(idx)
        return z + (quant - z).detach(), torch.stack(codes, 1), loss


def mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """TIGER's RQ-VAE: encoder -> residual quantizer -> decoder, trained on x itself."""

    def __init__(
        self, in_dim: int, hidden_dim: int, latent_dim: int, sizes: list[int], beta: float
    ):
        super().__init__()
        self.encoder = mlp([in_dim, hidden_dim, latent_dim])
        self.quantizer = ResidualQuantizer(sizes, latent_dim, beta)
        self.decoder = mlp([latent_dim, hidden_dim, in_dim])

    def fit(
        self,
        x: np.ndarray,
        epochs: int,
        batch_size: int,
        lr: float,
        mask_prob: float = 0.0,
        kmeans_iters: int = 10,
        seed: int = 0,
    ) -> list[float]:
        """Train on x [N, D]; returns the reconstruction MSE of every epoch (training mode)."""
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        xt = torch.as_tensor(x, dtype=torch.float32)
        with torch.no_grad():
            self.quantizer.init_kmeans(self.encoder(xt), kmeans_iters, gen)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        levels = len(self.quantizer.codebooks)
        history = []
        for _ in range(epochs):
            perm = torch.randperm(xt.shape[0], generator=gen)
            total = 0.0
            for i in range(0, xt.shape[0], batch_size):
                xb = xt[perm[i : i + batch_size]]
                active = None
                if mask_prob > 0:  # a random prefix of the levels for mask_prob of the rows
                    keep = torch.randint(1, levels + 1, (xb.shape[0], 1), generator=gen)
                    masked = torch.rand(xb.shape[0], 1, generator=gen) < mask_prob
                    keep = torch.where(masked, keep, torch.full_like(keep, levels))
                    active = (torch.arange(levels).unsqueeze(0) < keep).float()
                zq, _, q_loss = self.quantizer(self.encoder(xb), active)
                recon = ((self.decoder(zq) - xb) ** 2).sum(-1).mean()
                opt.zero_grad()
                (recon + q_loss).backward()
                opt.step()
                total += recon.item() * xb.shape[0]
            history.append(total / xt.shape[0])
        return history

    @torch.no_grad()
    def tokenize(self, x: np.ndarray) -> Tokenized:
        xt = torch.as_tensor(x, dtype=torch.float32)
        zq, codes, _ = self.quantizer(self.encoder(xt))
        return Tokenized(codes.numpy(), self.decoder(zq).numpy())


# --------------------------------------------------------------------------- codes


def disambiguate(codes: np.ndarray) -> np.ndarray:
    """Append a token making every row unique: 0, 1, ... among rows sharing a code, in
    row order. [N, L] -> [N, L + 1]."""
    _, group = np.unique(codes, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    sorted_group = group[order]
    starts = np.searchsorted(sorted_group, sorted_group, side="left")
    extra = np.empty(len(codes), dtype=np.int64)
    extra[order] = np.arange(len(codes)) - starts
    return np.concatenate([codes, extra[:, None]], axis=1)


def code_stats(codes: np.ndarray, sizes: list[int], x: np.ndarray, x_hat: np.ndarray) -> dict:
    """Statistics of codes [N, L] (before disambiguation) from codebooks of `sizes`.

    usage: distinct codes used / codebook size, per level; dead: codes no item uses;
    perplexity: exp(entropy) of the level's code distribution; max_share: the largest
    code's share of items; collision_rate: share of items whose full code another item
    also has; reconstruction_error: sum ||x - x_hat||^2 / sum ||x||^2.
    """
    n = codes.shape[0]
    levels = []
    for level, size in enumerate(sizes):
        counts = np.bincount(codes[:, level], minlength=size)
        p = counts[counts > 0] / n
        used = int((counts > 0).sum())
        levels.append(
            {
                "size": int(size),
                "used": used,
                "usage": used / size,
                "dead": int(size - used),
                "perplexity": float(np.exp(-(p * np.log(p)).sum())),
                "max_share": float(counts.max() / n),
                "collapsed": bool(
                    used < COLLAPSE_MIN_USAGE * min(size, n)
                    or counts.max() / n > COLLAPSE_MAX_SHARE
                ),
            }
        )
    _, group_sizes = np.unique(codes, axis=0, return_counts=True)
    colliding = int(group_sizes[group_sizes > 1].sum())
    err = float(((x - x_hat) ** 2).sum() / max(float((x**2).sum()), 1e-30))
    return {
        "items": int(n),
        "levels": levels,
        "collapsed_levels": [i for i, lv in enumerate(levels) if lv["collapsed"]],
        "unique_codes": int(len(group_sizes)),
        "collision_rate": colliding / n if n else 0.0,
        "max_collisions": int(group_sizes.max()) if n else 0,
        "reconstruction_error": err,
    }
