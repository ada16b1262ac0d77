"""Beam-search latency of a generative (semantic-ID) artifact, as `/recommend` runs it.

    python benchmarks/sid_latency.py --artifact ART --prepared PREPARED [--users 200]
        [--batch 1] [--k 10] [--threads 1]

Test histories (every event but each user's last) of the first `--users` users of the
prepared data, sent `--batch` at a time to `SemanticArtifact.recommend` (encoder + beam
search + history dropped), in this process. Prints one JSON line: milliseconds per request
(p50, p95, mean) and per user, and the artifact's beam width.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--artifact", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from genrec.deploy.semantic_artifact import SemanticArtifact
    from genrec.trainer.epochs import read_user_sequences

    art = SemanticArtifact(args.artifact)
    rows = read_user_sequences(args.prepared).column("item_ids").to_pylist()[: args.users]
    histories = [r[:-1] for r in rows if len(r) >= 2]
    art.recommend(histories[: args.batch], k=args.k)  # warm-up (trie built on first use)
    times = []
    for s in range(0, len(histories), args.batch):
        t0 = time.perf_counter()
        art.recommend(histories[s : s + args.batch], k=args.k)
        times.append(1000 * (time.perf_counter() - t0))
    t = np.array(times)
    g = art.cfg.model.generative
    print(
        json.dumps(
            {
                "benchmark": "sid_latency",
                "users": len(histories),
                "batch": args.batch,
                "beam_width": g.beam_width,
                "top_k": g.top_k,
                "threads": args.threads,
                "ms_per_request_p50": round(float(np.percentile(t, 50)), 2),
                "ms_per_request_p95": round(float(np.percentile(t, 95)), 2),
                "ms_per_request_mean": round(float(t.mean()), 2),
                "ms_per_user": round(float(t.sum() / len(histories)), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
