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

--split (local launcher only) adds, per run, the step split measured inside every rank by
benchmarks/step_split.py after --warmup steps: median step time (ms) and its mean per step
in input, eval, lookup (sharded embedding forward + backward, fused sparse optimizer
included), dense (encoder forward + backward, loss, sampling, DDP all-reduce), optimizer
(dense step + zero_grad) and other (logging, window ends, checkpoints); host syncs per step
(`scalar_reads_per_step`: aten::_local_scalar_dense events, i.e. item/float/int/bool of a
tensor; `host_copies_per_step`: Tensor.cpu/tolist/numpy calls). How each part is attributed
and the limits (CPU: nothing overlaps; host-side ranges) are in step_split.py's docstring.
The split wraps only methods that exist before and after issue 24, so the same file measures
an older checkout: `cd /tmp && PYTHONPATH=/old/checkout python /this/checkout/benchmarks/
bench_train.py --split` imports genrec (and its quickstart config) from there (run it outside
either repository: Ray's prepare workers put their working directory on sys.path).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("genrec") is None:  # genrec from PYTHONPATH (an older checkout) first
    sys.path.insert(0, str(ROOT))

import step_split  # noqa: E402  (benchmarks/ is sys.path[0] here and in spawned workers)

import genrec  # noqa: E402
from genrec.config import load_config  # noqa: E402
from genrec.trainer.metrics_log import read_metrics  # noqa: E402

if __name__ == "__mp_main__":  # a spawned training worker: this module runs there as well
    step_split.install()

GENREC = Path(genrec.__file__).resolve().parent
# the quickstart config of the genrec imported (it moved from configs/ to genrec/configs/)
CONFIG = (
    next(
        p
        for p in (GENREC / "configs", GENREC.parent / "configs")
        if (p / "quickstart.yaml").is_file()
    )
    / "quickstart.yaml"
)

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
    split_dir = work / f"split-{launcher}-{ranks}"
    split = args.split and launcher == "local"
    if split:
        split_dir.mkdir()
        os.environ[step_split.ENV] = str(split_dir)
        os.environ[step_split.WARMUP_ENV] = str(args.warmup)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        train(cfg, resume=launcher == "ray")  # a fresh run_dir either way
    finally:
        os.environ.pop(step_split.ENV, None)
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
    if split:
        out["split"] = step_split.merge(split_dir, ranks)
        out["load_avg_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # before, after
    log(json.dumps(out))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(CONFIG))
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
    p.add_argument("--split", action="store_true", help="step split and host syncs per rank")
    p.add_argument("--warmup", type=int, default=5, help="steps before --split measures")
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
                "genrec": str(GENREC.parent),
                "runs": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
