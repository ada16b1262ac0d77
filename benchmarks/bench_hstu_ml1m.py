"""The ML-1M HSTU cell of the peer comparison (../shared/bench/peer_hstu), genrec's side.

B = 128, D = 50, 2 blocks, 1 head, dqk = dv = 50, dropout 0.2, relative position + time bias
(128 buckets), lengths capped at 200: `full` (all 200) or `ragged` (numpy
default_rng(seed).geometric(p=1/60)). Step: item lookup + learned positions + dropout,
HSTUEncoder (jagged), L2 norm, surrogate loss sum(y * W), backward; no optimizer. 2 threads,
5 warm-up + 30 timed steps; run one process per cell (peak RSS is per process). tokens/s
counts real tokens. Prints one JSON line.

    .venv/bin/python benchmarks/bench_hstu.py --ml1m-cell ragged
"""

from __future__ import annotations

import json
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from genrec.config import ModelConfig
from genrec.models.hstu import HSTUEncoder
from genrec.models.jagged import offsets_from_lengths, positions

MAX_ITEM = 3952  # ML-1M item ids


def ml1m_lengths(dist: str, steps: int, batch: int, max_len: int, seed: int) -> np.ndarray:
    if dist == "full":
        return np.full((steps, batch), max_len, dtype=np.int64)
    draws = np.random.default_rng(seed).geometric(p=1.0 / 60, size=(steps, batch))
    return np.minimum(draws, max_len).astype(np.int64)


def run_ml1m_cell(dist: str, *, threads: int = 2, warmup: int = 5, steps: int = 30) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch, max_len, dim = 128, 200, 50
    cfg = ModelConfig(
        dim=dim,
        num_layers=2,
        num_heads=1,
        attn_dim=dim,
        linear_dim=dim,
        dropout=0.2,
        max_len=max_len + 1,
        num_time_buckets=128,
    )
    enc = HSTUEncoder(cfg).train()
    item = torch.nn.Embedding(MAX_ITEM + 1, dim)
    pos = torch.nn.Embedding(max_len + 1, dim)
    drop = torch.nn.Dropout(0.2)
    params = [*enc.parameters(), *item.parameters(), *pos.parameters()]
    rng = np.random.default_rng(1)
    W = torch.randn(batch * max_len, dim)  # the surrogate's weights: one table, sliced per step
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, tokens = [], []
    for i, ln in enumerate(ml1m_lengths(dist, warmup + steps, batch, max_len, 0)):
        lengths = torch.from_numpy(ln.copy())
        T = int(lengths.sum())
        ids = torch.from_numpy(rng.integers(1, MAX_ITEM + 1, size=T))
        gaps = torch.from_numpy(rng.exponential(86400.0, size=T).astype(np.int64) + 1)
        ts = 956703932 + torch.cumsum(gaps, 0)
        offsets = offsets_from_lengths(lengths)
        t0 = time.perf_counter()
        for p in params:
            p.grad = None
        x = drop(item(ids) + pos(positions(lengths)))
        y = F.normalize(enc(x, offsets, int(lengths.max()), ts), dim=-1, eps=1e-6)
        (y * W[:T]).sum().backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(T)
    med = statistics.median(times)
    return {
        "bench": "hstu_ml1m_cell",
        "impl": "genrec",
        "dist": dist,
        "threads": threads,
        "median_step_s": round(med, 4),
        "p10_step_s": round(float(np.percentile(times, 10)), 4),
        "p90_step_s": round(float(np.percentile(times, 90)), 4),
        "mean_real_tokens_per_step": float(np.mean(tokens)),
        "tokens_per_s_median": round(float(np.mean(tokens)) / med, 1),
        "rss_after_setup_mb": round(rss0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dist", choices=["ragged", "full"])
    print(json.dumps(run_ml1m_cell(ap.parse_args().dist)))
