"""End-to-end training throughput on CPU: samples/s, tokens/s and input stall at 1 and 2 ranks.

    python benchmarks/bench_train.py [--ranks 1,2] [--max-steps 60] [--ray]

Generates a synthetic T-ECD set, prepares it (Ray), then trains the quickstart model on it
with the `local` launcher (gloo) once per rank count, `trainer.max_steps` steps each. The
trainer logs, per step, samples/s and tokens/s over the whole step (input wait + progressive
evaluation + training, summed over ranks) and the fraction of the step spent waiting for the
next batch (`input_stall`); this reports their medians from run_dir/metrics.csv, and the wall
time of each run including process start-up. With --ray the 2-rank config also runs under
`--launcher ray` (Ray Train), for the start-up and per-step cost of Ray Train.
Prints one JSON line; everything is written to a temporary directory that is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genrec.config import load_config  # noqa: E402
from genrec.trainer.metrics_log import read_metrics  # noqa: E402

FIGURES = ("samples_per_s", "tokens_per_s", "input_stall")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_data(work: Path, args: argparse.Namespace) -> dict:
    from genrec.data_pipeline.sequences import prepare
    from genrec.data_pipeline.synthetic import generate
    from genrec.ray_runtime import ray_session

    t0 = time.perf_counter()
    with ray_session(num_cpus=4, object_store_mb=256):
        generate(
            source="tecd",
            out_dir=str(work / "raw"),
            users=args.users,
            events=args.events,
            items=args.items,
            seed=args.seed,
        )
        prepare(
            source="tecd",
            in_dir=str(work / "raw"),
            out_dir=str(work / "prepared"),
            window="day",
            max_len=args.max_len,
        )
    return {"users": args.users, "events": args.events, "items": args.items,
            "prepare_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


def run(work: Path, args: argparse.Namespace, ranks: int, launcher: str) -> dict:
    from genrec.trainer.launch import train

    run_dir = work / f"run-{launcher}-{ranks}"
    cfg = load_config(
        Path(args.config),
        [
            f"data.prepared_dir={work / 'prepared'}",
            f"trainer.run_dir={run_dir}",
            f"trainer.launcher={launcher}",
            f"trainer.world_size={ranks}",
            f"sharding.topology.world_size={ranks}",
            f"trainer.max_steps={args.max_steps}",
            f"trainer.batch_size={args.batch_size}",
            f"model.max_len={args.max_len}",
            "trainer.log_every=1",
            *args.override,
        ],
    )
    log(f"[{launcher} x{ranks}] {args.max_steps} steps of {args.batch_size} sequences per rank")
    t0 = time.perf_counter()
    train(cfg, resume=launcher == "ray")  # a fresh run_dir either way
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(run_dir) if r["kind"] == "step"]
    steps = max(r["step"] for r in rows)
    out = {"launcher": launcher, "ranks": ranks, "steps": steps, "wall_s": round(wall, 1)}
    for name in FIGURES:
        # the first steps pay for lazy initialisation; the median ignores them anyway
        values = [r["value"] for r in rows if r["name"] == name]
        out[f"median_{name}"] = round(statistics.median(values), 3 if name == "input_stall" else 1)
    out["train_s"] = round(
        max(r["wall_time"] for r in rows) - min(r["wall_time"] for r in rows), 1
    )  # first to last logged step: the steady part, without start-up
    log(json.dumps(out))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "genrec" / "configs" / "quickstart.yaml"))
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per rank per step")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray", action="store_true", help="also time the 2-rank run under Ray Train")
    p.add_argument("--override", action="append", default=[], help="extra a.b.c=value")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="genrec-bench-train-"))
    stdout = os.dup(1)
    os.dup2(2, 1)  # the trainers' own output (their workers inherit fd 1) goes to stderr
    try:
        data = prepare_data(work, args)
        results = [run(work, args, int(n), "local") for n in args.ranks.split(",")]
        if args.ray:
            results.append(run(work, args, 2, "ray"))
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "train",
                "device": "cpu",
                "data": data,
                "batch_size_per_rank": args.batch_size,
                "max_len": args.max_len,
                "runs": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
