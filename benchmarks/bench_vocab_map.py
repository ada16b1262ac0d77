"""Per-step cost of mapping ids through a vocabulary (kind: vocab) vs the hashing trick.

    .venv/bin/python benchmarks/bench_vocab_map.py --vocab 10000000 --batch 65536

A vocabulary of V ids (random int64, Zipf-ish counts irrelevant here: the cost is a
searchsorted over V sorted ids plus the overflow hash) maps `--batch` raw ids, half in it,
half not; timed in torch (the training twin, `Vocabulary.rows_torch`) and numpy (the
serving twin, `Vocabulary.rows`), next to one seeded hash (`hash_ids`). Host memory of the
mapping: 16 bytes per vocabulary id (sorted ids + their rows). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from genrec.data_pipeline.vocabulary import Vocabulary
from genrec.embeddings.hashing import hash_ids


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=10_000_000)
    p.add_argument("--batch", type=int, default=65_536)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, 1 << 62, a.vocab))
    t0 = time.perf_counter()
    vocab = Vocabulary(feature="item_id", ids=ids, counts=np.ones_like(ids), overflow_rows=1 << 16,
                       min_count=1)  # fmt: skip
    build_s = time.perf_counter() - t0
    raw = np.concatenate([rng.choice(ids, a.batch // 2), rng.integers(0, 1 << 62, a.batch // 2)])
    raw_t = torch.from_numpy(raw)
    vocab.rows_torch(raw_t)  # device copy cached
    torch_s = best_of(lambda: vocab.rows_torch(raw_t), a.repeats)
    numpy_s = best_of(lambda: vocab.rows(raw), a.repeats)
    hash_s = best_of(lambda: hash_ids(raw_t, 12345, 1 << 20), a.repeats)
    assert np.array_equal(vocab.rows_torch(raw_t).numpy(), vocab.rows(raw))
    print(json.dumps({
        "vocab_ids": int(ids.size), "batch": a.batch, "threads": torch.get_num_threads(),
        "torch_ns_per_id": round(torch_s / a.batch * 1e9, 1),
        "numpy_ns_per_id": round(numpy_s / a.batch * 1e9, 1),
        "hash_ns_per_id": round(hash_s / a.batch * 1e9, 1),
        "index_build_s": round(build_s, 2), "mapping_bytes": int(ids.size) * 16,
        "load": os.getloadavg()[0],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
