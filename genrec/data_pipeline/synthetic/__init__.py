"""Synthetic data in a source's own layout and schema, with signal a model can learn.

    report = generate("tecd", "data/raw", users=2000, events=200_000, items=5000, seed=0)
    print(report.summary())

The latent world (clusters, item cycles, drifting user interests, sessions) lives in
`world.py`; each source's writer turns simulated interactions into its own rows (T-ECD
funnels and payments, VK-LSVD watch time and reactions, Yambda listens and likes). Time
is simulated slice by slice (an hour or less) and written row group by row group, so
memory does not grow with the number of events. The same seed gives the same files.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from genrec.data_pipeline.synthetic.tecd import TecdWriter
from genrec.data_pipeline.synthetic.vk_lsvd import VkLsvdWriter
from genrec.data_pipeline.synthetic.world import World, slice_plan
from genrec.data_pipeline.synthetic.yambda import YambdaWriter

WRITERS = {"tecd": TecdWriter, "vk_lsvd": VkLsvdWriter, "yambda": YambdaWriter}


@dataclass
class GenerateReport:
    source: str
    out_dir: str
    users: int
    items: int
    events: int  # rows written to event files (T-ECD: events + payments; Yambda: multi_event)
    seconds: float
    files: list[str] = field(default_factory=list)
    days: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def events_per_second(self) -> float:
        return self.events / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (
            f"generated {self.source}: {self.events:,} events, {self.users:,} users, "
            f"{self.items:,} items over {self.days:g} days -> {self.out_dir} "
            f"({len(self.files)} files) in {self.seconds:.1f} s "
            f"({self.events_per_second:,.0f} events/s, peak RSS {self.peak_rss_mb:,.0f} MB)"
        )


def generate(
    source: str, out_dir: str, users: int, events: int, items: int, seed: int
) -> GenerateReport:
    """Write `events` synthetic events of `source` into `out_dir` in its own layout."""
    if source not in WRITERS:
        raise ValueError(f"cannot generate {source!r}; generators exist for {sorted(WRITERS)}")
    if events < 1:
        raise ValueError(f"events must be positive, got {events}")
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    world = World(users=users, items=items, seed=seed)
    writer = WRITERS[source](world, out_dir)
    expansion = writer.expansion  # rows per simulated interaction, measured as we go
    written = 0
    plan = slice_plan(events, writer.seconds)
    bar = tqdm(
        total=events,
        desc=f"generate {source}",
        unit="ev",
        file=sys.stderr,
        disable=None,
        mininterval=1.0,
    )
    for t0, t1, quota in plan:
        if quota <= 0:
            continue
        sl = world.simulate(math.ceil(quota / expansion * 1.05) + 2, t0, t1)
        streams = writer.expand(sl)
        produced = sum(s["_t"].size for s in streams.values())
        written += _trim_and_sort(streams, quota, writer.seconds)
        expansion = 0.5 * expansion + 0.5 * max(1.0, produced / max(len(sl), 1))
        writer.write(streams, t0)
        bar.update(min(quota, produced))
    bar.close()
    files = writer.close()
    seconds = time.perf_counter() - start
    return GenerateReport(
        source=source,
        out_dir=out_dir,
        users=users,
        items=items,
        events=written,
        seconds=seconds,
        files=files,
        days=writer.seconds / 86400,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def _trim_and_sort(streams: dict[str, dict[str, np.ndarray]], quota: int, end: float) -> int:
    """Keep the `quota` earliest rows before `end` over all streams, sorted by time."""
    times = np.concatenate([s["_t"] for s in streams.values()])
    keep = np.zeros(times.size, bool)
    keep[np.argsort(times, kind="stable")[:quota]] = True
    keep &= times < end
    offset = 0
    for name, cols in streams.items():
        n = cols["_t"].size
        k = keep[offset : offset + n]
        offset += n
        order = np.argsort(cols["_t"][k], kind="stable")
        streams[name] = {c: v[k][order] for c, v in cols.items()}
    return int(keep.sum())


__all__ = ["GenerateReport", "World", "generate"]
