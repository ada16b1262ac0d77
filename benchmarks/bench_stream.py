"""Events/s the stream delivers to W ranks (gloo processes) that do nothing with the batches,
and `amplification` = rows decoded on all ranks / rows in the stream (1.0: each row decoded
by one rank); each rank's peak RSS; a raw pyarrow scan of the same files for reference.

    .venv/bin/python benchmarks/bench_stream.py --world 2            # 10M synthetic events
    .venv/bin/python benchmarks/bench_stream.py --world 4 --data-dir data/prepared

Prints one JSON line on stdout (keys world, amplification, events_per_s, ...); progress
goes to stderr; synthetic shards go to a temp dir.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genrec.config import DataConfig
from genrec.data_pipeline.schemas import SEQUENCES
from genrec.data_pipeline.shard_index import (
    list_windows,
    load_window_index,
    write_sequence_shards,
)


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
    out = []
    for w in list_windows(data_dir):
        index = load_window_index(data_dir, w)
        out += [str(Path(index.directory) / f) for f in index.files]
    return out


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


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
    """One rank of a gloo group: open the stream, pull every batch, touch nothing."""
    import torch
    import torch.distributed as dist

    from genrec.data_pipeline.stream import open_stream

    cfg_dict, data_dir, rank, world, batch_size, max_len, port = args
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = DataConfig(**cfg_dict)
    t_open = time.perf_counter()
    stream = open_stream(cfg, data_dir, rank, world, batch_size, max_len)
    open_s = time.perf_counter() - t_open
    dist.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    batches = 0
    for _ in stream:
        batches += 1
    dt = time.perf_counter() - t0
    n = torch.tensor([batches])
    dist.all_reduce(n, op=dist.ReduceOp.MAX)  # lockstep: every rank the same count
    same = int(n) == batches
    dist.destroy_process_group()
    return {
        "rank": rank,
        "seconds": dt,
        "open_s": open_s,
        "batches": batches,
        "same_batches": same,
        "events": stream.stats["row_events"],  # events of this rank's rows
        "rows": stream.stats["rows"],
        "decoded_rows": stream.stats["decoded_rows"],
        "cpu_s": time.process_time() - cpu0,
        "peak_rss_mb": round(peak_rss_mb()),
    }


def run_world(cfg: DataConfig, data_dir: str, world: int, batch_size: int, max_len: int):
    ctx = mp.get_context("spawn")
    port = 29500 + os.getpid() % 1000
    jobs = [(vars(cfg), data_dir, r, world, batch_size, max_len, port) for r in range(world)]
    with ctx.Pool(world) as pool:
        per_rank = pool.map(consume, jobs)
    slowest = max(r["seconds"] for r in per_rank)
    rows = sum(r["rows"] for r in per_rank)
    events = sum(r["events"] for r in per_rank)
    return {
        "world": world,
        "amplification": round(sum(r["decoded_rows"] for r in per_rank) / max(rows, 1), 4),
        "events_per_s": round(events / slowest),
        "events_per_s_per_rank": round(events / slowest / world),
        "seconds": round(slowest, 3),
        "rows": rows,
        "events": events,
        "equal_batches": all(r["same_batches"] for r in per_rank),
        "open_s_max": round(max(r["open_s"] for r in per_rank), 4),
        "cpu_s_per_rank": [round(r["cpu_s"], 2) for r in per_rank],
        "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in per_rank],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=1, help="ranks (gloo processes)")
    p.add_argument("--data-dir", default="", help="prepared dir (default: synthetic temp dir)")
    p.add_argument("--events", type=int, default=10_000_000, help="synthetic events")
    p.add_argument("--windows", type=int, default=10, help="synthetic windows")
    p.add_argument("--mean-len", type=int, default=50, help="synthetic mean row length")
    p.add_argument("--row-group-rows", type=int, default=64, help="synthetic row groups")
    p.add_argument("--rows-per-file", type=int, default=0, help="0: 1024 row groups")
    p.add_argument("--batch-size", type=int, default=128, help="rows per rank per step")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--shuffle-buffer", type=int, default=0)
    p.add_argument("--read-threads", type=int, default=2)
    a = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        data_dir = a.data_dir
        if not data_dir:
            data_dir = str(Path(tmp) / "prepared")
            log(f"writing ~{a.events:,} synthetic events to {data_dir}")
            rows = synthetic_rows(a.events, a.windows, a.mean_len, 0)
            write_sequence_shards(
                data_dir,
                rows,
                rows_per_file=a.rows_per_file or 1024 * a.row_group_rows,
                row_group_rows=a.row_group_rows,
            )
        files = files_of(data_dir)
        windows = len(list_windows(data_dir))
        t0 = time.perf_counter()
        for f in files:  # what opening a stream cost before the index: every footer
            pq.read_metadata(f)
        footers_s = time.perf_counter() - t0
        raw_scan(files)  # warm the page cache
        raw = raw_scan(files)
        log(f"raw scan: {raw['events_per_s'] / 1e6:.1f}M events/s")
        cfg = DataConfig(shuffle_buffer=a.shuffle_buffer, read_threads=a.read_threads)
        out = run_world(cfg, data_dir, a.world, a.batch_size, a.max_len)
    out = {
        "bench": "stream",
        **out,
        "files": len(files),
        "windows": windows,
        "read_all_footers_s": round(footers_s, 4),
        "batch_size": a.batch_size,
        "raw_scan_events_per_s": round(raw["events_per_s"]),
        "load_avg_1m": os.getloadavg()[0],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
