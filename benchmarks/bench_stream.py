"""Events/s and batches/s the stream delivers to consumers that do nothing, next to a raw
pyarrow scan of the same files (the limit on this machine); both readers; 1 and N consumers
(separate processes, as ranks would be); each consumer's RSS at start and peak.

    .venv/bin/python benchmarks/bench_stream.py                     # 10M synthetic events
    .venv/bin/python benchmarks/bench_stream.py --data-dir data/prepared --readers local

Prints one JSON line on stdout; progress goes to stderr; synthetic shards go to a temp dir.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genrec.config import DataConfig
from genrec.data_pipeline.schemas import SEQUENCES
from genrec.data_pipeline.stream import list_windows, window_shards, write_sequence_shards


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def synthetic_rows(events: int, windows: int, mean_len: int, seed: int) -> pa.Table:
    """Sequence-schema rows: ~`events` events over `windows` windows, ragged lengths."""
    rng = np.random.default_rng(seed)
    n_rows = max(windows, events // mean_len)
    lengths = rng.integers(1, 2 * mean_len, n_rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(offsets[-1])
    window = np.sort(rng.integers(0, windows, n_rows))
    user = np.arange(n_rows) % max(1, n_rows // windows)

    def lists(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    cols = {
        "user_id": pa.array(user, pa.int64()),
        "window": pa.array(window + 100, pa.int64()),
        "item_ids": lists(rng.integers(0, 1_000_000, total, dtype=np.int64)),
        "timestamps": lists(np.arange(total, dtype=np.int64)),
        "actions": lists(rng.integers(0, 8, total, dtype=np.int32)),
        "num_history": pa.array(rng.integers(0, lengths), pa.int32()),
    }
    return pa.table(cols, schema=SEQUENCES)


def files_of(data_dir: str) -> list[str]:
    return [f for w in list_windows(data_dir) for f in window_shards(data_dir, w).files]


def raw_scan(files: list[str]) -> dict:
    """pyarrow decode of every column of every file, counting events: the ceiling."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    events = rows = 0
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(65536):
            rows += rb.num_rows
            events += len(rb.column("item_ids").values)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "seconds": round(dt, 3),
        "cpu_s": round(cpu, 3),
        "rows": rows,
        "events": events,
        "events_per_s": events / dt,
    }


def consume(args: tuple) -> dict:
    """One rank: open the stream, pull every batch, touch nothing."""
    cfg_dict, data_dir, rank, world, batch_size, max_len = args
    from genrec.data_pipeline.stream import open_stream

    cfg = DataConfig(**cfg_dict)
    stream = open_stream(cfg, data_dir, rank, world, batch_size, max_len)
    total = sum(stream.num_batches(w) for w in stream.windows)
    rss = [rss_mb()]  # at the start, then after each quarter of the batches
    t0, cpu0 = time.perf_counter(), time.process_time()
    batches = tokens = 0
    t_warm, rows_warm = t0, 0
    for b in stream:
        batches += 1
        tokens += b.num_tokens
        if batches == total // 10:  # steady state: after the first 10% (warm caches/pools)
            t_warm, rows_warm = time.perf_counter(), stream.stats["row_events"]
        if batches % max(1, total // 4) == 0:
            rss.append(rss_mb())
    dt = time.perf_counter() - t0
    stream.close()
    return {
        "rank": rank,
        "seconds": dt,
        "batches": batches,
        "events": stream.stats["row_events"],  # events of the rows consumed (as in the scan)
        "tokens": tokens,  # tokens delivered (chunked rows repeat some history)
        "cpu_s": time.process_time() - cpu0,  # this process only (not Ray workers)
        "rows": stream.stats["rows"],
        "steady_events_per_s": (stream.stats["row_events"] - rows_warm) / (t0 + dt - t_warm),
        "rss_mb": [round(r) for r in rss],
    }


def run_consumers(cfg: DataConfig, data_dir: str, world: int, batch_size: int, max_len: int):
    ctx = mp.get_context("spawn")
    jobs = [(vars(cfg), data_dir, r, world, batch_size, max_len) for r in range(world)]
    t0 = time.perf_counter()
    with ctx.Pool(world) as pool:
        per_rank = pool.map(consume, jobs)
    wall = time.perf_counter() - t0
    slowest = max(r["seconds"] for r in per_rank)
    events = sum(r["events"] for r in per_rank)
    return {
        "consumers": world,
        "seconds": round(slowest, 3),
        "wall_with_startup_s": round(wall, 3),
        "rows": sum(r["rows"] for r in per_rank),
        "events": events,
        "tokens": sum(r["tokens"] for r in per_rank),
        "events_per_s": round(events / slowest),
        "consumer_cpu_s": round(max(r["cpu_s"] for r in per_rank), 3),
        "batches_per_s_per_rank": round(per_rank[0]["batches"] / slowest, 1),
        "steady_events_per_s": round(sum(r["steady_events_per_s"] for r in per_rank)),
        "rss_mb_rank0": per_rank[0]["rss_mb"],  # start, then after each quarter
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="", help="prepared dir (default: synthetic temp dir)")
    p.add_argument("--events", type=int, default=10_000_000, help="synthetic events")
    p.add_argument("--windows", type=int, default=10, help="synthetic windows")
    p.add_argument("--mean-len", type=int, default=50, help="synthetic mean row length")
    p.add_argument("--batch-size", type=int, default=128, help="rows per rank per step")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--shuffle-buffer", type=int, default=0)
    p.add_argument("--readers", default="local,ray")
    p.add_argument("--consumers", default="1,2")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--object-store-mb", type=int, default=256)
    a = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        data_dir = a.data_dir
        if not data_dir:
            data_dir = str(Path(tmp) / "prepared")
            log(f"writing ~{a.events:,} synthetic events to {data_dir}")
            write_sequence_shards(data_dir, synthetic_rows(a.events, a.windows, a.mean_len, 0))
        files = files_of(data_dir)
        raw_scan(files)  # warm the page cache
        raw = raw_scan(files)
        log(f"raw scan: {raw['events_per_s'] / 1e6:.1f}M events/s")
        out: dict = {"bench": "stream", "files": len(files), "raw_scan": raw, "runs": []}
        for reader in a.readers.split(","):
            cfg = DataConfig(
                reader=reader,
                shuffle_buffer=a.shuffle_buffer,
                object_store_mb=a.object_store_mb,
                num_cpus=a.ray_cpus,
            )
            session = None
            if reader == "ray":  # one Ray for all consumers; they join it by address
                import ray

                from genrec.ray_runtime import init_ray

                init_ray(a.ray_cpus, a.object_store_mb)
                cfg.ray_address = ray.get_runtime_context().gcs_address
                session = ray
            for world in (int(c) for c in a.consumers.split(",")):
                res = run_consumers(cfg, data_dir, world, a.batch_size, a.max_len)
                res["reader"] = reader
                res["ratio_to_raw"] = round(res["events_per_s"] / raw["events_per_s"], 3)
                res["steady_ratio"] = round(res["steady_events_per_s"] / raw["events_per_s"], 3)
                log(json.dumps(res))
                out["runs"].append(res)
            if session is not None:
                session.shutdown()
    out["raw_scan"]["events_per_s"] = round(raw["events_per_s"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
