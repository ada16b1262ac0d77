"""The latent world behind every synthetic source: items, interest clusters, users, sessions.

What a model can learn from it (and a popularity baseline cannot):

- Items belong to interest clusters; inside a cluster they form a cycle (a random order),
  and most next items follow the cycle from the user's last item (1, 2 or 3 steps ahead),
  so the next item is predictable from recent history ("sequential structure").
- Otherwise the next item comes from the user's current cluster (Zipf inside it) or from
  the global Zipf popularity.
- Each user has three preferred clusters; the current one is re-drawn at session starts and
  the preferences drift (one is replaced by a neighbouring cluster now and then).
- Sessions: activity is heavy-tailed across users, session lengths are geometric, events
  inside a session are seconds to minutes apart, sessions hours apart.
- Item content embeddings are cluster centroids plus noise, so content agrees with behaviour.

Simulation is time-major: `simulate` produces one time slice for all users at once
(vectorized numpy), keeping only per-user state between slices, so memory stays flat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

P_CHAIN = 0.6  # next item = cycle successor of the last item
P_CHAIN_SESSION_START = 0.35  # the same at the first event of a session
P_CLUSTER = 0.3  # next item from the current cluster (Zipf); else global popularity
CHAIN_STEPS = (1, 2, 3)
CHAIN_STEP_P = (0.75, 0.17, 0.08)
P_SWITCH_CLUSTER = 0.3  # at a session start, re-draw the current cluster from preferences
P_DRIFT = 0.04  # at a session start, replace one preferred cluster by a neighbour
MEAN_SESSION = 8
MAX_SESSION = 48
EMBED_DIM = 16


@dataclass
class SliceEvents:
    """One simulated slice: interactions sorted by time (item = internal item index)."""

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray  # float seconds from the start of the data set
    step: np.ndarray  # position inside the session
    affinity: np.ndarray  # bool: item in one of the user's preferred clusters

    def __len__(self) -> int:
        return int(self.user.size)


class World:
    def __init__(self, users: int, items: int, seed: int) -> None:
        if users < 1 or items < 8:
            raise ValueError(f"need users >= 1 and items >= 8 (got {users}, {items})")
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.num_users, self.num_items = users, items
        k = int(np.clip(items // 64, 2, 512))
        self.num_clusters = k
        # cluster sizes (at least 4), items contiguous per cluster in the internal index
        sizes = 4 + rng.multinomial(items - 4 * k, rng.dirichlet(np.full(k, 4.0)))
        self.cluster_start = np.concatenate([[0], np.cumsum(sizes)])
        self.item_cluster = np.repeat(np.arange(k), sizes)
        # popularity: cluster weight (Zipf) times item weight inside the cluster (Zipf)
        cluster_w = 1.0 / (1 + rng.permutation(k)) ** 0.7
        rank_in = np.arange(items) - self.cluster_start[self.item_cluster]
        item_w = 1.0 / (1.0 + rank_in) ** 1.0
        in_cluster = item_w / np.bincount(self.item_cluster, item_w)[self.item_cluster]
        self.cluster_cdf = self._per_cluster_cdf(in_cluster)
        glob_w = in_cluster * (cluster_w / cluster_w.sum())[self.item_cluster]
        self.global_cdf = np.cumsum(glob_w / glob_w.sum())
        self.cluster_p = cluster_w / cluster_w.sum()
        # the cycle inside each cluster: a random order, successor = next in that order
        self.chain_next = np.empty(items, np.int64)
        for c in range(k):
            a, b = self.cluster_start[c], self.cluster_start[c + 1]
            order = a + rng.permutation(b - a)
            self.chain_next[order] = np.roll(order, -1)
        # content: cluster centroids plus noise
        centroids = rng.normal(size=(k, EMBED_DIM))
        emb = centroids[self.item_cluster] + 0.35 * rng.normal(size=(items, EMBED_DIM))
        self.item_embedding = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
        self.centroids = centroids.astype(np.float32)
        # users: activity, three preferred clusters, current cluster, last item and time
        self.activity = rng.lognormal(0.0, 1.0, users)
        self.prefs = rng.choice(k, size=(users, 3), p=self.cluster_p)
        self.pref_w = rng.dirichlet(np.full(3, 0.7), users)
        self.current = self.prefs[:, 0].copy()
        self.last_item = np.full(users, -1, np.int64)
        self.last_time = np.zeros(users)

    def _per_cluster_cdf(self, w: np.ndarray) -> np.ndarray:
        """cluster c's items have cdf values in (c, c + 1]: one searchsorted for all."""
        cs = np.cumsum(w)
        before = np.concatenate([[0.0], cs[self.cluster_start[1:-1] - 1]])
        cdf = cs - before[self.item_cluster] + self.item_cluster
        cdf[self.cluster_start[1:] - 1] = np.arange(1, self.num_clusters + 1)
        return cdf

    # ---------------------------------------------------------------- sampling
    def _in_cluster(self, clusters: np.ndarray) -> np.ndarray:
        u = clusters + 1e-9 + self.rng.random(clusters.size) * (1.0 - 2e-9)
        return np.minimum(np.searchsorted(self.cluster_cdf, u), self.num_items - 1)

    def _popular(self, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.global_cdf, self.rng.random(n)), self.num_items - 1)

    def _chain(self, last: np.ndarray) -> np.ndarray:
        steps = self.rng.choice(CHAIN_STEPS, size=last.size, p=CHAIN_STEP_P)
        out = last.copy()
        for s in range(1, max(CHAIN_STEPS) + 1):
            move = steps >= s
            out[move] = self.chain_next[out[move]]
        return out

    def _start_sessions(self, users: np.ndarray) -> None:
        rng, n = self.rng, users.size
        drift = rng.random(n) < P_DRIFT
        if drift.any():
            d = users[drift]
            slot = rng.integers(0, 3, d.size)
            self.prefs[d, slot] = (self.prefs[d, slot] + 1) % self.num_clusters
        switch = rng.random(n) < P_SWITCH_CLUSTER
        if switch.any():
            s = users[switch]
            cum = np.cumsum(self.pref_w[s], axis=1)
            pick = (rng.random(s.size)[:, None] > cum).sum(axis=1).clip(0, 2)
            self.current[s] = self.prefs[s, pick]

    # ---------------------------------------------------------------- simulation
    def simulate(self, n: int, t0: float, t1: float) -> SliceEvents:
        """About `n` interactions in sessions starting in [t0, t1), sorted by time."""
        rng = self.rng
        if n <= 0:
            e = np.zeros(0, np.int64)
            return SliceEvents(e, e, np.zeros(0), e, np.zeros(0, bool))
        lengths = np.minimum(rng.geometric(1.0 / MEAN_SESSION, size=n // 4 + 8), MAX_SESSION)
        cut = int(np.searchsorted(np.cumsum(lengths), n)) + 1
        lengths = lengths[:cut]
        lengths[-1] -= lengths.sum() - n
        cdf = np.cumsum(self.activity)
        users = np.searchsorted(cdf, rng.random(lengths.size) * cdf[-1])
        users = np.minimum(users, self.num_users - 1)
        # one session per user per slice: merge repeated draws
        users, inv = np.unique(users, return_inverse=True)
        lengths = np.minimum(np.bincount(inv, lengths), MAX_SESSION * 2).astype(np.int64)
        self._start_sessions(users)
        start = t0 + rng.random(users.size) * (t1 - t0)
        start = np.maximum(start, self.last_time[users] + 600.0)  # sessions never overlap
        total = int(lengths.sum())
        out_u = np.repeat(users, lengths)
        out_step = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        gaps = 15.0 + rng.exponential(45.0, total)
        gaps[out_step == 0] = 0.0
        sess_of = np.repeat(np.arange(users.size), lengths)
        times = start[sess_of] + _segment_cumsum(gaps, lengths)
        items = np.empty(total, np.int64)
        first = np.cumsum(lengths) - lengths
        last = self.last_item[users].copy()
        for step in range(int(lengths.max())):
            act = np.nonzero(lengths > step)[0]
            r = rng.random(act.size)
            p_chain = P_CHAIN_SESSION_START if step == 0 else P_CHAIN
            nxt = np.empty(act.size, np.int64)
            chain = (r < p_chain) & (last[act] >= 0)
            clus = ~chain & (r < p_chain + P_CLUSTER)
            popular = ~chain & ~clus
            nxt[chain] = self._chain(last[act[chain]])
            nxt[clus] = self._in_cluster(self.current[users[act[clus]]])
            nxt[popular] = self._popular(int(popular.sum()))
            items[first[act] + step] = nxt
            last[act] = nxt
        self.last_item[users] = last
        self.last_time[users] = times[first + lengths - 1]
        item_cluster = self.item_cluster[items]
        affinity = (self.prefs[out_u] == item_cluster[:, None]).any(axis=1)
        order = np.argsort(times, kind="stable")
        return SliceEvents(
            out_u[order], items[order], times[order], out_step[order], affinity[order]
        )


def _segment_cumsum(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    cs = np.cumsum(values)
    starts = np.cumsum(lengths) - lengths
    base = np.concatenate([[0.0], cs])[starts]
    return cs - np.repeat(base, lengths)


def slice_plan(events: int, seconds: float, max_slice_events: int = 50_000):
    """(t0, t1, quota) per slice: hours (days for tiny sets, shorter for huge), daily rhythm."""
    hours, days = int(np.ceil(seconds / 3600)), int(np.ceil(seconds / 86400))
    n = max(days, min(hours, int(np.ceil(events / 500))), int(np.ceil(events / max_slice_events)))
    edges = np.linspace(0.0, seconds, n + 1)
    hour = (edges[:-1] / 3600.0) % 24
    w = 1.0 + 0.6 * np.sin(2 * np.pi * (hour - 9.0) / 24.0)
    cum = np.round(np.cumsum(w / w.sum()) * events).astype(np.int64)
    quotas = np.diff(np.concatenate([[0], cum]))
    return [(float(edges[i]), float(edges[i + 1]), int(quotas[i])) for i in range(n)]
