"""Negative sampling for the sampled softmax, with the log-probabilities logQ needs.

Negatives mix two sources: uniform over the item catalog, and popularity-proportional
(uniform draws from a ring of recently seen item occurrences). A candidate drawn from this
mixture has probability q(i) = f_u / |C| + f_p * p(i), where p(i) is the item's share of the
stream estimated by the count-min sketch; the model subtracts log q(i) from its logit.

All randomness is a function of (seed, step, rank): a resumed run draws exactly the
negatives an uninterrupted one would, with no generator state to checkpoint.
"""

from __future__ import annotations

import torch

from genrec.config import RetrievalConfig
from genrec.embeddings.frequency import CountMinSketch, PopularitySampler


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 10_007 + rank) % (2**63 - 1))
    return g


class NegativeSampler:
    def __init__(
        self,
        cfg: RetrievalConfig,
        catalog: torch.Tensor,
        sketch: CountMinSketch,
        popular: PopularitySampler,
    ) -> None:
        total = cfg.uniform_fraction + cfg.popularity_fraction
        if total <= 0:
            raise ValueError("model.retrieval.uniform_fraction + popularity_fraction must be > 0")
        self.f_uniform = cfg.uniform_fraction / total
        self.f_pop = cfg.popularity_fraction / total
        self.num = cfg.num_negatives
        self.catalog = catalog
        self.sketch = sketch
        self.popular = popular

    def log_q(self, ids: torch.Tensor, f_uniform: float, f_pop: float) -> torch.Tensor:
        """log of the mixture probability of drawing each id."""
        q = torch.full(ids.shape, f_uniform / max(1, self.catalog.numel()), dtype=torch.float64)
        total = float(self.sketch.total)
        if f_pop > 0 and total > 0:
            q = q + f_pop * self.sketch.estimate(ids).double() / total
        return q.clamp_min(1e-30).log().float()

    def sample(
        self, g: torch.Generator, num: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`num` draws (default num_negatives) and their log q. With an explicit `num` (one
        per target position) the uniform and popularity draws come in random order, so each
        entry is an independent draw of the mixture."""
        explicit = num is not None
        num = self.num if num is None else num
        usable = self.popular.filled > 0 and float(self.sketch.total) > 0
        f_pop = self.f_pop if usable else 0.0  # nothing seen yet: all negatives uniform
        n_pop = int(round(num * f_pop))
        n_uni = num - n_pop
        parts = []
        if n_uni > 0:
            parts.append(self.catalog[torch.randint(self.catalog.numel(), (n_uni,), generator=g)])
        if n_pop > 0:
            parts.append(self.popular.sample(n_pop, generator=g))
        ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        if explicit and len(parts) > 1:
            ids = ids[torch.randperm(ids.numel(), generator=g)]
        return ids, self.log_q(ids, 1.0 - f_pop, f_pop)
