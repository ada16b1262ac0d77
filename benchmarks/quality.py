"""Real-data quality: HSTU (or SASRec) on Amazon Sports/Toys and MovieLens-100K.

    python benchmarks/quality.py --data-dir ../shared/data --dataset sports --seeds 3 --jobs 3 \
        [--plot curves.png] [config overrides, e.g. trainer.epochs=15 trainer.patience=3]
    python benchmarks/quality.py --dataset toys --model sasrec --config amazon_toys_sasrec.yaml

Leave-one-out (last item test, second-to-last validation for early stopping and model
selection), full-catalog ranking with history items excluded; R@5, N@5, R@10, N@10 on test
as mean and standard deviation over seeds, plus wall time. Prints one JSON line; progress
goes to stderr. The data directory is a flag (or GENREC_DATA_DIR), never a path in the repo.
`--workdir D --reuse` reads seeds already finished in D instead of training them again;
`--score-stopped` scores the seeds whose run in D was stopped early (newest = best checkpoint).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {
    "sports": ("amazon_sports.yaml", "text", "amazon/Sports_and_Outdoors.txt"),
    "toys": ("amazon_toys.yaml", "text", "amazon/Toys_and_Games.txt"),
    "ml100k": ("ml100k.yaml", "recbole", "ml-100k"),
}
PUBLISHED = {  # TIGER, NeurIPS 2023, Table 1 (R@5, N@5, R@10, N@10)
    "sports": {
        "SASRec": (0.0233, 0.0154, 0.0350, 0.0192),
        "TIGER": (0.0264, 0.0181, 0.0400, 0.0225),
    },
    "toys": {"SASRec": (0.0463, 0.0306, 0.0675, 0.0374), "TIGER": (0.0521, 0.0371, 0.0712, 0.0432)},
}
METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


def run_once(args, seed: int, work: Path) -> dict:
    from genrec.config import load_config
    from genrec.trainer.launch import train

    cfg_name = args.config or DATASETS[args.dataset][0]
    prepared = work / "prepared"
    overrides = [
        f"data.prepared_dir={prepared}",
        f"trainer.run_dir={work / f'run-seed{seed}'}",
        f"trainer.seed={seed}",
        f"model.kind={args.model}",
        *args.overrides,
    ]
    if args.max_len:
        overrides += [f"model.max_len={args.max_len}", f"data.max_len={args.max_len}"]
    if args.epochs:
        overrides.append(f"trainer.epochs={args.epochs}")
    cfg = load_config(ROOT / "genrec" / "configs" / cfg_name, overrides)
    t0 = time.time()
    summary_path = Path(cfg.trainer.run_dir) / "summary.json"
    if args.reuse and summary_path.exists():
        print(f"seed {seed}: reusing the finished run {summary_path}", file=sys.stderr)
        summary = json.loads(summary_path.read_text())
    elif args.score_stopped and not summary_path.exists():
        summary = stopped_run_summary(cfg)
    else:
        train(cfg, resume=False)
        summary = json.loads(summary_path.read_text())
    final = summary["windows"][-1]
    # epoch rows; with trainer.eval_every > 1 only some carry validation metrics
    validated = [row for row in summary["windows"][:-1] if "valid/recall@10" in row]
    return {
        **{m: final[f"test/{m}"] for m in METRICS},
        **{f"most_popular/{m}": final[f"test/most_popular/{m}"] for m in METRICS},
        "valid/ndcg@10": final["valid"],
        "seconds": final.get("seconds", time.time() - t0),
        "best_step": final["best_epoch_step"],
        "stopped": bool(final.get("stopped", False)),
        "epochs": len(summary["windows"]) - 1,
        "curve": [
            (row["epoch"], row["valid/recall@10"], row["valid/ndcg@10"]) for row in validated
        ],
        "valid_most_popular": {
            m: validated[0].get(f"valid/most_popular/{m}") if validated else None for m in METRICS
        },
    }


def stopped_run_summary(cfg) -> dict:
    """summary.json's content for a run stopped before its end (by hand, or a session's
    clock): its epoch rows from metrics.csv, and its newest checkpoint (the best on
    validation so far: epochs mode saves only improvements) scored on test by
    `genrec evaluate`, as `EpochTrainer.run` scores its best checkpoint at the end."""
    from genrec.trainer.launch import evaluate
    from genrec.trainer.metrics_log import read_metrics

    run_dir = Path(cfg.trainer.run_dir)
    rows: dict[int, dict] = {}
    for r in read_metrics(run_dir):
        if r["kind"] == "epoch":
            rows.setdefault(r["step"], {"epoch": r["step"]})[r["name"]] = r["value"]
    result = evaluate(cfg, split="test")
    validated = [row["valid/ndcg@10"] for row in rows.values() if "valid/ndcg@10" in row]
    print(
        f"{run_dir}: stopped after {len(rows)} epochs; scored its newest checkpoint "
        f"(step {result['step']}) on test",
        file=sys.stderr,
    )
    final = {
        **{k: v for k, v in result.items() if k.startswith("test/")},
        "best_epoch_step": result["step"],
        "valid": max(validated),
        "seconds": sum(row.get("seconds", 0.0) for row in rows.values()) + result["seconds"],
        "stopped": True,
    }
    return {"windows": [rows[e] for e in sorted(rows)] + [final]}


def plot_curves(args, runs: list[dict], path: Path) -> None:
    """Validation R@10 and N@10 per epoch, one line per seed, most-popular for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for seed, r in enumerate(runs):
        epochs, recall, ndcg = zip(*r["curve"]) if r["curve"] else ((), (), ())
        for ax, ys in zip(axes, (recall, ndcg)):
            ax.plot(epochs, ys, marker=".", label=f"seed {args.first_seed + seed}")
    for ax, name in zip(axes, ("recall@10", "ndcg@10")):
        pop = runs[0]["valid_most_popular"][name]
        if pop is not None:
            ax.axhline(pop, color="grey", ls="--", label="most popular")
        ax.set_xlabel("epoch")
        ax.set_title(f"validation {name}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{args.model} on {args.dataset} (leave-one-out, full catalog)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare_once(args, work: Path) -> None:
    from genrec.data_pipeline.sequences import prepare

    _, source, rel = DATASETS[args.dataset]
    prepared = work / "prepared"
    if not (prepared / "_meta.json").exists():
        prepare(
            source=source,
            in_dir=str(Path(args.data_dir) / rel),
            out_dir=str(prepared),
            window="1000000000000",
            max_len=args.max_len or 50,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument(
        "--data-dir",
        default=os.environ.get("GENREC_DATA_DIR", str(ROOT.parent / "shared" / "data")),
    )
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--model", choices=["hstu", "sasrec"], default="hstu")
    p.add_argument(
        "--config",
        default="",
        help="a file in genrec/configs/ instead of the dataset's own "
        "(e.g. amazon_toys_sasrec.yaml)",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+seeds-1"
    )
    p.add_argument("--epochs", type=int, default=0, help="override trainer.epochs (0: config)")
    p.add_argument("--max-len", type=int, default=0)
    p.add_argument("--workdir", default="")
    p.add_argument("--plot", default="", help="write validation curves per seed to this PNG")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="read seeds already finished in --workdir (run-seedN/summary.json) instead of "
        "training them again (same settings are the caller's responsibility)",
    )
    p.add_argument(
        "--score-stopped",
        action="store_true",
        help="seeds whose run in --workdir was stopped before its end (no summary.json): "
        "score their newest (best-on-validation) checkpoint on test instead of training",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="seeds trained at once, each in its own process (a world-size-1 trainer takes "
        "cores - 1 threads: on 2 cores, --jobs 2 keeps both busy)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.dropout=0.3")
    args = p.parse_args()
    t0 = time.time()
    stdout = sys.stdout  # progress (ours, Ray's, the trainers') goes to stderr
    with (
        tempfile.TemporaryDirectory(prefix="genrec-quality-") as tmp,
        contextlib.redirect_stdout(sys.stderr),
    ):
        work = Path(args.workdir or tmp)
        prepare_once(args, work)
        # each seed's trainer is a spawned process: threads here only wait on them
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            runs = list(
                pool.map(
                    lambda seed: run_once(args, seed, work),
                    range(args.first_seed, args.first_seed + args.seeds),
                )
            )
    out = {
        "benchmark": "quality",
        "dataset": args.dataset,
        "model": args.model,
        "config": args.config or DATASETS[args.dataset][0],
        "seeds": args.seeds,
        "overrides": args.overrides,
    }
    for m in METRICS:
        vals = [r[m] for r in runs]
        out[m] = round(statistics.mean(vals), 5)
        out[f"{m}_std"] = round(statistics.pstdev(vals), 5)
    out["most_popular"] = {
        m: round(statistics.mean(r[f"most_popular/{m}"] for r in runs), 5) for m in METRICS
    }
    out["per_seed"] = [{m: round(r[m], 5) for m in METRICS} for r in runs]
    out["valid_ndcg@10"] = [round(r["valid/ndcg@10"], 5) for r in runs]
    out["epochs"] = [r["epochs"] for r in runs]
    out["seconds_per_seed"] = [round(r["seconds"], 1) for r in runs]
    out["stopped_before_end"] = [r["stopped"] for r in runs]  # scored by --score-stopped
    out["wall_s"] = round(time.time() - t0, 1)
    if args.plot:
        plot_curves(args, runs, Path(args.plot))
        out["plot"] = args.plot
    if args.dataset in PUBLISHED:
        out["published"] = PUBLISHED[args.dataset]
    print(json.dumps(out), file=stdout, flush=True)


if __name__ == "__main__":
    main()
