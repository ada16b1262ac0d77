"""Item frequencies for logQ correction and popularity-proportional negatives.

`CountMinSketch` (Cormode & Muthukrishnan, 2005) keeps `depth` rows of `width` counters; an
id's estimate is the minimum of its `depth` counters. It never underestimates, and with
eps = e / width, delta = e^-depth, the overestimate exceeds eps * N (N = total count) for at
most a delta fraction of queries. Counters are float64 so that decay is exact (integer
counts stay exact up to 2**53); counters and total live in ONE flat buffer, so adding,
merging, decaying and all-reducing work in place (no depth x width allocation per call).

Conservative update (Estan & Varghese) raises each of an id's counters only as far as
(current estimate + count): the same guarantee, much smaller overestimates on skewed
streams. It is NOT exactly mergeable: the sum of two conservative sketches is still a
valid overestimating sketch of the union (each row of each part is >= its part's true
count), but not equal to a conservative sketch built over the union (that one depends on
the order of updates). With conservative=False the sketch is linear: merge(A, B) == the
sketch of A's stream followed by B's, bit for bit.

`FrequencyState` is what a training rank keeps (embeddings.frequency): `synced`, the sum of
every rank's sketches up to the last sync (the same on every rank), and `delta`, this rank's
own items since (conservative per the config, relative to the delta alone, so the sum stays
a valid overestimate). Estimates read synced + delta at the queried columns only. A sync
all-reduces the deltas into `synced`; a window end also multiplies `synced` by `decay`.
Saved per rank, the states of W ranks reshard exactly to W' ranks (`reshard`): the global
state synced + sum of deltas is carried whole, once.

`PopularitySampler` is a ring buffer of recently seen item ids: drawing uniformly from it
draws items in proportion to their recent frequency, whose log probability the sketch
estimates (`log_q`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from genrec.config import FrequencyConfig
from genrec.embeddings.hashing import hash_ids

_SEED_STRIDE = 0x9E37
COUNTS = torch.float64


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
        # one buffer: counters [depth, width] then the total (views; in-place ops only)
        self.flat = torch.zeros(depth * width + 1, dtype=COUNTS, device=device)
        self.counters = self.flat[:-1].view(depth, width)
        self.total = self.flat[-1]

    @property
    def epsilon(self) -> float:
        return math.e / self.width

    @property
    def delta(self) -> float:
        return math.exp(-self.depth)

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """[depth, n] counter columns of `ids`."""
        ids = ids.reshape(-1).to(device=self.counters.device, dtype=torch.int64)
        return torch.stack(
            [hash_ids(ids, self.seed * _SEED_STRIDE + i, self.width) for i in range(self.depth)]
        )

    @torch.no_grad()
    def add_(self, ids: torch.Tensor, counts: torch.Tensor | None = None) -> CountMinSketch:
        """Add one occurrence of each id (or `counts` of them), in place. Conservative: an
        id's counters rise only to (its estimate + its count in `ids`)."""
        ids = ids.reshape(-1).to(device=self.counters.device, dtype=torch.int64)
        if counts is None:
            counts = torch.ones(ids.shape, dtype=COUNTS, device=ids.device)
        counts = counts.reshape(-1).to(ids.device, COUNTS)
        if ids.numel() == 0:
            return self
        if not self.conservative:
            cols = self.columns(ids)
            for i in range(self.depth):
                self.counters[i].index_add_(0, cols[i], counts)
        else:
            # batch conservative update: distinct ids raise their counters to est + count
            uniq, inverse = torch.unique(ids, return_inverse=True)
            c = torch.zeros(uniq.numel(), dtype=COUNTS, device=ids.device)
            c.index_add_(0, inverse, counts)
            cols = self.columns(uniq)
            target = self.counters.gather(1, cols).min(dim=0).values + c
            for i in range(self.depth):
                self.counters[i].scatter_reduce_(0, cols[i], target, reduce="amax")
        self.total += counts.sum()
        return self

    def update(self, ids: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """`add_` (the name the trainer calls)."""
        self.add_(ids, counts)

    @torch.no_grad()
    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated counts (>= true counts) of `ids`, shaped like `ids`."""
        cols = self.columns(ids)
        return self.counters.gather(1, cols).min(dim=0).values.reshape(ids.shape)

    @torch.no_grad()
    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        """log of each id's estimated probability in the stream (unseen ids count as 1)."""
        return _log_q(self.estimate(ids), float(self.total))

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
        self.flat += other.flat.to(self.flat.device)
        return self

    @torch.no_grad()
    def zero_(self) -> CountMinSketch:
        self.flat.zero_()
        return self

    @torch.no_grad()
    def all_reduce_(self, group: dist.ProcessGroup | None = None) -> CountMinSketch:
        """Sum the sketches of every rank in place (each rank then holds the global sketch).
        The buffer's device must suit the group's backend (CUDA for NCCL)."""
        dist.all_reduce(self.flat, op=dist.ReduceOp.SUM, group=group)
        return self

    @torch.no_grad()
    def decay_(self, factor: float) -> CountMinSketch:
        """Scale counts by `factor` (0 < factor <= 1) so that old windows fade (exact)."""
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"decay factor must be in (0, 1], got {factor}")
        if factor < 1.0:
            self.flat.mul_(factor)
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
        shape = (int(state["depth"]), int(state["width"]), int(state["seed"]))
        if shape != (self.depth, self.width, self.seed):
            raise ValueError(
                f"sketch checkpoint has depth/width/seed {shape}, this sketch "
                f"{(self.depth, self.width, self.seed)}; match embeddings.frequency to it"
            )
        self.conservative = bool(state["conservative"])
        self.counters.copy_(state["counters"])
        self.total.copy_(torch.as_tensor(state["total"]))


def _log_q(est: torch.Tensor, total: float) -> torch.Tensor:
    return torch.log(est.clamp_min(1).to(torch.float32)) - math.log(max(total, 1.0))


class FrequencyState:
    """One rank's item frequencies: `synced` (all ranks, last sync) + `delta` (this rank since).

    Per step `add_(ids)`; at a sync point `sync_(group)`; at a window end `end_window_(group)`
    (sync, then decay). `estimate`, `log_q` and `total` read synced + delta without
    allocating a sketch. `state_dict()` per rank; `FrequencyState.reshard(states, W')`
    turns the W saved states into W' states with the same global counts.
    """

    def __init__(
        self, cfg: FrequencyConfig, seed: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        if not 0.0 < cfg.decay <= 1.0:
            raise ValueError(f"embeddings.frequency.decay must be in (0, 1], got {cfg.decay}")
        self.decay = cfg.decay
        self.synced = CountMinSketch(cfg.depth, cfg.width, cfg.conservative, seed, device)
        self.delta = CountMinSketch(cfg.depth, cfg.width, cfg.conservative, seed, device)

    @property
    def total(self) -> torch.Tensor:
        return self.synced.total + self.delta.total

    def add_(self, ids: torch.Tensor, counts: torch.Tensor | None = None) -> FrequencyState:
        """This rank saw `ids`: update the delta in place (conservative per the config)."""
        self.delta.add_(ids, counts)
        return self

    @torch.no_grad()
    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        cols = self.synced.columns(ids)
        both = self.synced.counters.gather(1, cols) + self.delta.counters.gather(1, cols)
        return both.min(dim=0).values.reshape(ids.shape)

    @torch.no_grad()
    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        return _log_q(self.estimate(ids), float(self.total))

    @torch.no_grad()
    def sync_(self, group: dist.ProcessGroup | None = None) -> FrequencyState:
        """Fold every rank's delta into `synced` (all-reduce when distributed), in place."""
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            self.delta.all_reduce_(group)
        self.synced.merge_(self.delta)
        self.delta.zero_()
        return self

    def end_window_(self, group: dist.ProcessGroup | None = None) -> FrequencyState:
        """A window ended: sync, then multiply every count by embeddings.frequency.decay."""
        self.sync_(group)
        self.synced.decay_(self.decay)
        return self

    def state_dict(self) -> dict:
        return {"synced": self.synced.state_dict(), "delta": self.delta.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.synced.load_state_dict(state["synced"])
        self.delta.load_state_dict(state["delta"])

    @staticmethod
    def reshard(states: list[dict], world_size: int) -> list[dict]:
        """The states of `world_size` ranks from the saved states of every old rank.

        The global state, synced + the sum of all deltas, is what the next sync would give
        every rank; it becomes the new `synced` of every new rank (the saved synced parts
        must agree) and every new delta is zero: nothing lost, nothing counted twice.
        """
        if not states or world_size < 1:
            raise ValueError(f"reshard needs saved states and world_size >= 1, got {world_size}")
        first = states[0]["synced"]
        for r, s in enumerate(states[1:], 1):
            if not torch.equal(s["synced"]["counters"], first["counters"]):
                raise ValueError(
                    f"frequency state of rank {r} has a synced sketch that differs from rank "
                    "0's: the saved states are not from one checkpoint"
                )
        counters = first["counters"].to(COUNTS).clone()
        total = torch.as_tensor(first["total"]).to(COUNTS).clone()
        for s in states:
            counters += s["delta"]["counters"].to(COUNTS)
            total += torch.as_tensor(s["delta"]["total"]).to(COUNTS)
        synced = {**first, "counters": counters, "total": total}
        delta = {**states[0]["delta"], "counters": torch.zeros_like(counters)}
        delta["total"] = torch.zeros_like(total)
        return [{"synced": synced, "delta": delta} for _ in range(world_size)]


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
