"""Share of events whose item shares an embedding row with another item: hashed tables vs a
vocabulary with the same number of rows, on a Zipf-distributed synthetic catalog.

    .venv/bin/python benchmarks/bench_collisions.py --items 1000000 --rows 1000000

Hashed (k hashes into R rows): an item "shares a row" when another item of the catalog uses
one of its rows (`any`), or all k of them (`all`: then the summed embedding can only differ
by the other rows' sums). Vocabulary: R - O rows for the most frequent items (counted on the
events), O hashed overflow rows (`--overflow`) for the rest. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from genrec.data_pipeline.vocabulary import Vocabulary
from genrec.embeddings.hashing import feature_seed, hash_ids_np


def shared(rows: np.ndarray) -> np.ndarray:
    """Per item: is its row used by another item."""
    _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
    return counts[inverse] > 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=20_000_000)
    p.add_argument("--rows", type=int, default=1_000_000, help="table rows (both tables)")
    p.add_argument("--hashes", type=int, default=2)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--overflow", type=float, default=0.05, help="vocabulary overflow share")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    rng = np.random.default_rng(a.seed)
    ids = rng.choice(1 << 62, a.items, replace=False).astype(np.int64)  # sparse raw ids
    weight = 1.0 / np.arange(1, a.items + 1) ** a.zipf
    events = rng.choice(a.items, a.events, p=weight / weight.sum())
    freq = np.bincount(events, minlength=a.items)
    seen = freq > 0
    ev_share = freq[seen] / a.events

    hashed = [hash_ids_np(ids[seen], feature_seed("item_id", k), a.rows) for k in range(a.hashes)]
    any_shared = np.zeros(seen.sum(), bool)
    all_shared = np.ones(seen.sum(), bool)
    for r in hashed:
        s = shared(r)
        any_shared |= s
        all_shared &= s
    overflow = max(1, int(a.rows * a.overflow))
    vocab = Vocabulary.from_counts(ids[seen], freq[seen], 1, overflow, a.rows - overflow)
    v_shared = shared(vocab.rows(ids[seen]))
    out = {
        "bench": "collisions",
        "items_seen": int(seen.sum()),
        "events": a.events,
        "rows": a.rows,
        "zipf": a.zipf,
        "hashes": a.hashes,
        "hashed_events_sharing_any_row": round(float(ev_share[any_shared].sum()), 4),
        "hashed_events_sharing_all_rows": round(float(ev_share[all_shared].sum()), 4),
        "hashed_items_sharing_any_row": round(float(any_shared.mean()), 4),
        "vocab_rows_own": int(vocab.ids.size),
        "vocab_overflow_rows": overflow,
        "vocab_events_sharing_row": round(float(ev_share[v_shared].sum()), 4),
        "vocab_items_sharing_row": round(float(v_shared.mean()), 4),
        "load_avg_1m": os.getloadavg()[0],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
