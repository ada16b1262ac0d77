"""Synthetic generation throughput: events/s, seconds and peak RSS for one source.

    python benchmarks/bench_generate.py --source tecd --events 10000000

Writes into a temporary directory (removed afterwards); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile

from genrec.data_pipeline.synthetic import generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", default="tecd", choices=["tecd", "vk_lsvd", "yambda"])
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="keep the data here instead of a temp dir")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="genrec-bench-generate-")
    try:
        report = generate(
            args.source, out, users=args.users, events=args.events, items=args.items, seed=args.seed
        )
        print(report.summary(), file=sys.stderr)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "generate",
                "source": args.source,
                "events": report.events,
                "users": args.users,
                "items": args.items,
                "files": len(report.files),
                "seconds": round(report.seconds, 2),
                "events_per_s": round(report.events_per_second),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
