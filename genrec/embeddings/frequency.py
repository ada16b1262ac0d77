"""Item frequencies for logQ correction and popularity-proportional negatives.

`CountMinSketch` (Cormode & Muthukrishnan, 2005) keeps `depth` rows of `width` int64
counters; an id's estimate is the minimum of its `depth` counters. It never
underestimates, and with eps = e / width, delta = e^-depth, the overestimate exceeds
eps * N (N = total count) for at most a delta fraction of queries.

Conservative update (Estan & Varghese) raises each of an id's counters only as far as
(current estimate + count): the same guarantee, much smaller overestimates on skewed
streams. It is NOT exactly mergeable: the sum of two conservative sketches is still a
valid overestimating sketch of the union, but not equal to a conservative sketch built
over the union (that one depends on the order of updates). With conservative=False the
sketch is linear: merge(A, B) == the sketch of A's stream followed by B's, bit for bit.

`PopularitySampler` is a ring buffer of recently seen item ids: drawing uniformly from it
draws items in proportion to their recent frequency, whose log probability the sketch
estimates (`log_q`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from genrec.embeddings.hashing import hash_ids

_SEED_STRIDE = 0x9E37


class CountMinSketch:
    """Mergeable count-min sketch over int64 ids (plain object: never a DDP buffer)."""

    def __init__(
        self,
        depth: int,
        width: int,
        conservative: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if depth < 1 or width < 1:
            raise ValueError(f"CountMinSketch needs depth >= 1 and width >= 1, got {depth}x{width}")
        self.depth, self.width, self.conservative, self.seed = depth, width, conservative, seed
        self.counters = torch.zeros(depth, width, dtype=torch.int64, device=device)
        self.total = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def epsilon(self) -> float:
        return math.e / self.width

    @property
    def delta(self) -> float:
        return math.exp(-self.depth)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """[depth, n] counter columns of `ids`."""
        ids = ids.reshape(-1).to(device=self.counters.device, dtype=torch.int64)
        return torch.stack(
            [hash_ids(ids, self.seed * _SEED_STRIDE + i, self.width) for i in range(self.depth)]
        )

    @torch.no_grad()
    def update(self, ids: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Add one occurrence of each id (or `counts` of them)."""
        ids = ids.reshape(-1).to(device=self.counters.device, dtype=torch.int64)
        if counts is None:
            counts = torch.ones_like(ids)
        counts = counts.reshape(-1).to(ids.device, torch.int64)
        if ids.numel() == 0:
            return
        if not self.conservative:
            cols = self._rows(ids)
            for i in range(self.depth):
                self.counters[i].index_add_(0, cols[i], counts)
        else:
            # batch conservative update: distinct ids raise their counters to est + count
            uniq, inverse = torch.unique(ids, return_inverse=True)
            c = torch.zeros(uniq.numel(), dtype=torch.int64, device=ids.device)
            c.index_add_(0, inverse, counts)
            cols = self._rows(uniq)
            est = self.counters.gather(1, cols).min(dim=0).values
            target = est + c
            for i in range(self.depth):
                self.counters[i].scatter_reduce_(0, cols[i], target, reduce="amax")
        self.total += counts.sum()

    @torch.no_grad()
    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated counts (>= true counts) of `ids`, shaped like `ids`."""
        cols = self._rows(ids)
        return self.counters.gather(1, cols).min(dim=0).values.reshape(ids.shape)

    @torch.no_grad()
    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        """log of each id's estimated probability in the stream (unseen ids count as 1)."""
        est = self.estimate(ids).clamp_min(1).to(torch.float32)
        return torch.log(est) - math.log(max(int(self.total), 1))

    def _check_compatible(self, other: CountMinSketch) -> None:
        if (other.depth, other.width, other.seed) != (self.depth, self.width, self.seed):
            raise ValueError(
                f"cannot merge sketches of depth/width/seed {(other.depth, other.width, other.seed)}"
                f" into {(self.depth, self.width, self.seed)}"
            )

    @torch.no_grad()
    def merge_(self, other: CountMinSketch) -> CountMinSketch:
        """Add `other`'s counters (same depth, width and seed) into this sketch."""
        self._check_compatible(other)
        self.counters += other.counters.to(self.counters.device)
        self.total += other.total.to(self.total.device)
        return self

    @torch.no_grad()
    def all_reduce_(self, group: dist.ProcessGroup | None = None) -> CountMinSketch:
        """Sum the sketches of every rank (each rank then holds the global sketch)."""
        flat = torch.cat([self.counters.reshape(-1), self.total.reshape(1)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        self.counters.copy_(flat[:-1].reshape(self.depth, self.width))
        self.total.copy_(flat[-1])
        return self

    @torch.no_grad()
    def decay_(self, factor: float) -> CountMinSketch:
        """Scale counts by `factor` (0 < factor <= 1) so that old windows fade."""
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"decay factor must be in (0, 1], got {factor}")
        if factor < 1.0:
            self.counters.copy_(torch.floor(self.counters.double() * factor).to(torch.int64))
            self.total.copy_(torch.floor(self.total.double() * factor).to(torch.int64))
        return self

    def state_dict(self) -> dict:
        return {
            "depth": self.depth,
            "width": self.width,
            "conservative": self.conservative,
            "seed": self.seed,
            "counters": self.counters.clone(),
            "total": self.total.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        shape = (state["depth"], state["width"], state["seed"])
        if shape != (self.depth, self.width, self.seed):
            raise ValueError(
                f"sketch checkpoint has depth/width/seed {shape}, this sketch "
                f"{(self.depth, self.width, self.seed)}; match embeddings.frequency to it"
            )
        self.conservative = bool(state["conservative"])
        self.counters.copy_(state["counters"])
        self.total.copy_(state["total"])


class PopularitySampler:
    """Ring buffer of the last `capacity` item ids; uniform draws are popularity draws."""

    def __init__(self, capacity: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"PopularitySampler capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.buffer = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.position = 0  # next slot to write
        self.filled = 0
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def add(self, ids: torch.Tensor) -> None:
        ids = ids.reshape(-1).to(self.buffer.device, torch.int64)[-self.capacity :]
        n = ids.numel()
        slots = (self.position + torch.arange(n, device=ids.device)) % self.capacity
        self.buffer[slots] = ids
        self.position = (self.position + n) % self.capacity
        self.filled = min(self.capacity, self.filled + n)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` ids drawn with replacement in proportion to their count in the buffer."""
        if self.filled == 0:
            raise RuntimeError("PopularitySampler.sample before any add(): no ids seen yet")
        idx = torch.randint(
            self.filled,
            (n,),
            generator=generator or self.generator,
            device=self.buffer.device,
        )
        return self.buffer[idx]

    def state_dict(self) -> dict:
        return {
            "buffer": self.buffer.clone(),
            "position": self.position,
            "filled": self.filled,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["buffer"].numel() != self.capacity:
            raise ValueError(
                f"sampler checkpoint holds {state['buffer'].numel()} slots, this sampler "
                f"{self.capacity}"
            )
        self.buffer.copy_(state["buffer"])
        self.position, self.filled = int(state["position"]), int(state["filled"])
        self.generator.set_state(state["generator"])
