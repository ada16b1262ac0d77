"""`prepare` at scale: generate N synthetic events, run the Ray job, report time and memory.

    python benchmarks/bench_prepare.py --events 10000000          # the 2-core figure
    python benchmarks/bench_prepare.py --events 200000 --in DIR   # reuse generated data

Peak RSS is reported for the driver (getrusage), for the largest single process and for the
whole process tree (the driver plus the Ray processes it started), sampled from /proc every
0.2 s, with the most files under the output directory open at once in the tree; files per
window come from the indexes. Everything is written into a temporary directory (`--work`)
that is removed afterwards; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(pid))
    return tree


def _tree_sample(root: int, under: str) -> tuple[float, float, int]:
    """(RSS of the tree, largest RSS of one process, files under `under` open in the tree)."""
    tree, total, largest, files, todo = _children(), 0, 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo += tree.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        kb = int(line.split()[1])
                        total, largest = total + kb, max(largest, kb)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    files += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(under)
                except OSError:
                    pass
        except OSError:
            pass
    return total / 1024, largest / 1024, files


class PeakSampler(threading.Thread):
    """Polls this process tree until stopped: peak RSS (tree, one process), most open files."""

    def __init__(self, under: str, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval, self.under, self._stop_event = interval, under, threading.Event()
        self.peak = self.peak_process = 0.0
        self.open_files = 0

    def run(self) -> None:
        while not self._stop_event.is_set():
            tree, one, files = _tree_sample(os.getpid(), self.under)
            self.peak, self.peak_process = max(self.peak, tree), max(self.peak_process, one)
            self.open_files = max(self.open_files, files)
            self._stop_event.wait(self.interval)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return self.peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", default="tecd", choices=["tecd", "vk_lsvd", "yambda"])
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=0, help="0: events // 100")
    p.add_argument("--items", type=int, default=0, help="0: events // 50")
    p.add_argument("--in", dest="in_dir", default="", help="prepare existing raw data")
    p.add_argument("--window", default="day")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--num-cpus", type=int, default=0, help="Ray CPUs (0: this machine's)")
    p.add_argument("--task-mb", type=float, default=512)
    p.add_argument("--files-per-window", type=int, default=4)
    p.add_argument("--row-group-rows", type=int, default=64)
    p.add_argument("--work", default="", help="scratch parent dir (default: system temp)")
    args = p.parse_args()

    from genrec.data_pipeline.sequences import prepare
    from genrec.data_pipeline.shard_index import load_window_index
    from genrec.data_pipeline.synthetic import generate
    from genrec.ray_runtime import ray_session

    work = tempfile.mkdtemp(prefix="genrec-bench-prepare-", dir=args.work or None)
    out_dir = os.path.join(work, "prepared")
    sampler = PeakSampler(out_dir)
    try:
        raw = args.in_dir
        gen_s = 0.0
        if not raw:
            raw = os.path.join(work, "raw")
            g = generate(
                args.source,
                raw,
                users=args.users or max(100, args.events // 100),
                events=args.events,
                items=args.items or max(100, args.events // 50),
                seed=0,
            )
            gen_s = g.seconds
            print(g.summary(), file=sys.stderr)
        sampler.start()
        t0 = time.perf_counter()
        with ray_session(num_cpus=args.num_cpus):
            t_ray = time.perf_counter()
            report = prepare(
                args.source,
                raw,
                out_dir,
                window=args.window,
                max_len=args.max_len,
                task_mb=args.task_mb,
                files_per_window=args.files_per_window,
                row_group_rows=args.row_group_rows,
            )
        seconds = time.perf_counter() - t_ray
        total = time.perf_counter() - t0
        peak_tree = sampler.stop()
        print(report.summary(), file=sys.stderr)
        files = [len(load_window_index(out_dir, w).files) for w in report.windows]
        out_bytes = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpus = args.num_cpus or os.cpu_count() or 1
    print(
        json.dumps(
            {
                "bench": "prepare",
                "source": args.source,
                "events": report.events,
                "rows": report.rows,
                "windows": len(report.windows),
                "users": report.users,
                "items": report.items,
                "buckets": report.buckets,
                "cpus": cpus,
                "generate_seconds": round(gen_s, 2),
                "seconds": round(seconds, 2),
                "seconds_with_ray_start": round(total, 2),
                "events_per_s": round(report.events / seconds),
                "peak_rss_driver_mb": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                ),
                "peak_rss_tree_mb": round(peak_tree, 1),
                "peak_rss_process_mb": round(sampler.peak_process, 1),
                "events_per_s_per_core": round(report.events / seconds / cpus),
                "files_per_window_max": max(files),
                "files_total": sum(files),
                "most_files_open": sampler.open_files,
                "out_bytes": out_bytes,
                "task_mb": args.task_mb,
                "load_avg_1m": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
