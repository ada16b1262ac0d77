"""Real-data quality: HSTU (or SASRec) on Amazon Sports/Toys and MovieLens-100K.

    python benchmarks/quality.py --data-dir ../shared/data --dataset sports --seeds 3 --jobs 3 \
        [--plot curves.png] [config overrides, e.g. trainer.epochs=15 trainer.patience=3]
    python benchmarks/quality.py --dataset toys --model sasrec --config amazon_toys_sasrec.yaml
    python benchmarks/quality.py --dataset toys --model sid --seeds 3 --jobs 3 [--collab-epochs 16]

Leave-one-out (last item test, second-to-last validation for early stopping and model
selection), full-catalog ranking with history items excluded; R@5, N@5, R@10, N@10 on test
as mean and standard deviation over seeds, plus wall time. Prints one JSON line; progress
goes to stderr. The data directory is a flag (or GENREC_DATA_DIR), never a path in the repo.
`--workdir D --reuse` reads seeds already finished in D instead of training them again;
`--score-stopped` scores the seeds whose run in D was stopped early (newest = best checkpoint).

`--model sid` (generative retrieval over semantic IDs, configs amazon_*_sid.yaml) first makes
the codes, once for all seeds (seed 0), into the prepared directory: an HSTU run (the
dataset's HSTU config, `--collab-epochs`, default the README rows' recipe: Toys 16, Sports
15 epochs; codes from a 3-epoch run scored a quarter lower), its export, and `genrec
tokenize` of its item table (`--sid-vectors collab`; `attributes` / `both` use or add the
item attributes). Its
row (and any model's with `--cold-start`) adds the metrics of the test users whose target
item never occurs as a training target (`cold`: the best checkpoint scored on them alone)
and the scoring time per user of that evaluation (`ms_per_user`: encoder + top-k or beam
search, batches of trainer.batch_size users, one process on this machine).
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
SID_CONFIGS = {"sports": "amazon_sports_sid.yaml", "toys": "amazon_toys_sid.yaml"}
# epochs of the HSTU run whose item table the semantic IDs are made from: the README rows'
# recipe (a fully trained retriever; its validation stops rising there)
COLLAB_EPOCHS = {"sports": 15, "toys": 16}
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

    cfg_name = config_name(args)
    prepared = work / "prepared"
    overrides = [
        f"data.prepared_dir={prepared}",
        f"trainer.run_dir={work / f'run-seed{seed}'}",
        f"trainer.seed={seed}",
        *model_overrides(args, work),
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
    extra = {}
    if args.cold_start or args.model == "sid":
        extra["cold"] = cold_start_metrics(cfg, work, final["best_epoch_step"])
        # scoring time of those users (encoder + beam search, batches of batch_size)
        extra["ms_per_user"] = round(1000 * extra["cold"].pop("score_seconds"), 3)
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
        **extra,
    }


def config_name(args) -> str:
    if args.config:
        return args.config
    return SID_CONFIGS[args.dataset] if args.model == "sid" else DATASETS[args.dataset][0]


def model_overrides(args, work: Path) -> list[str]:
    if args.model != "sid":
        return [f"model.kind={args.model}"]
    return [f"model.generative.codes={work / 'prepared' / 'semantic' / 'codes.parquet'}"]


def make_codes(args, work: Path) -> None:
    """`--model sid`: semantic-ID codes into work/prepared/semantic (once for every seed):
    a short HSTU run on the same data, its export, `genrec tokenize` of its item table
    (and/or the item attributes, `--sid-vectors`), with the sid config's semantic section."""
    from genrec.config import load_config
    from genrec.semantic.tokenize import summary, tokenize

    prepared = work / "prepared"
    if (prepared / "semantic" / "codes.parquet").is_file():
        return
    sem = []
    if args.sid_vectors in ("collab", "both"):
        sem.append(f"semantic.artifact={collab_artifact(args, work)}")
    if args.sid_vectors in ("attributes", "both"):
        rel = DATASETS[args.dataset][2].replace(".txt", "_item2attributes.json")
        sem.append(f"semantic.attributes={Path(args.data_dir) / rel}")
    else:
        sem.append("semantic.attributes=")
    cfg = load_config(
        ROOT / "genrec" / "configs" / config_name(args),
        [f"data.prepared_dir={prepared}", "semantic.out_dir=", *sem, *args.overrides],
    )
    for line in summary(tokenize(cfg)):
        print(f"tokenize: {line}", file=sys.stderr)


def collab_artifact(args, work: Path) -> Path:
    """The dataset's HSTU config trained `--collab-epochs` (seed 0) and exported (no AOT):
    its item table is the collaborative vectors."""
    from genrec.config import load_config
    from genrec.deploy.export import export
    from genrec.trainer.checkpoint import checkpoint_path
    from genrec.trainer.launch import train

    artifact = work / "collab-artifact"
    if (artifact / "manifest.json").is_file():
        return artifact
    run = work / "collab-run"
    epochs = args.collab_epochs or COLLAB_EPOCHS[args.dataset]
    cfg = load_config(
        ROOT / "genrec" / "configs" / DATASETS[args.dataset][0],
        [
            f"data.prepared_dir={work / 'prepared'}",
            f"trainer.run_dir={run}",
            f"trainer.epochs={epochs}",
            "trainer.seed=0",
        ],
    )
    t0 = time.time()
    train(cfg, resume=False)
    best = json.loads((run / "summary.json").read_text())["windows"][-1]
    print(
        f"collaborative vectors: HSTU {epochs} epochs in {time.time() - t0:.0f} s, "
        f"test R@10 {best['test/recall@10']:.4f}",
        file=sys.stderr,
    )
    export(str(checkpoint_path(run, best["best_epoch_step"])), str(artifact), compile_aot=False)
    return artifact


def cold_start_metrics(cfg, work: Path, step: int) -> dict:
    """Test metrics of the cold-start users (`make_cold_split`): the best checkpoint scored
    on a prepared directory holding only them (same catalog)."""
    import dataclasses

    from genrec.trainer.checkpoint import checkpoint_path
    from genrec.trainer.launch import evaluate

    cold_dir = work / "prepared-cold"
    cold_cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, prepared_dir=str(cold_dir))
    )
    result = evaluate(
        cold_cfg,
        checkpoint=str(checkpoint_path(cfg.trainer.run_dir, step)),
        split="test",
        out=str(Path(cfg.trainer.run_dir) / "cold-start.json"),
    )
    return {
        "users": int(result["test/users"]),
        "score_seconds": result["score_seconds"] / result["test/users"],
        **{m: result[f"test/{m}"] for m in METRICS},
        **{f"most_popular/{m}": result[f"test/most_popular/{m}"] for m in METRICS},
    }


def make_cold_split(work: Path) -> int:
    """work/prepared-cold: the prepared rows of the users whose test item never occurs as
    a training target (any user's training part, positions 1.., as epochs mode trains),
    the full catalog beside them; returns their count."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from genrec.trainer.epochs import loo_view, read_user_sequences

    prepared = work / "prepared"
    cold_dir = work / "prepared-cold"
    if not (cold_dir / "items.parquet").is_file():
        table = read_user_sequences(prepared)
        train = loo_view(table, "train").column("item_ids")
        targets = pc.list_flatten(pc.list_slice(train, 1))
        seen = np.unique(targets.to_numpy())
        items = table.column("item_ids").combine_chunks()
        n = pc.list_value_length(items).to_numpy()
        last = items.flatten().to_numpy()[np.cumsum(n) - 1]  # each user's test item
        cold = ~np.isin(last, seen) & (n >= 3)
        (cold_dir / "window=00000").mkdir(parents=True, exist_ok=True)
        full = pq.read_table(next((prepared / "window=00000").glob("*.parquet")))
        users = pa.array(table.column("user_id").to_numpy()[cold])
        pq.write_table(
            full.filter(pc.is_in(full.column("user_id"), users)),
            cold_dir / "window=00000" / "part-00000.parquet",
        )
        (cold_dir / "items.parquet").write_bytes((prepared / "items.parquet").read_bytes())
    return pq.read_metadata(next((cold_dir / "window=00000").glob("*.parquet"))).num_rows


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
    p.add_argument("--model", choices=["hstu", "sasrec", "sid"], default="hstu")
    p.add_argument(
        "--sid-vectors",
        choices=["collab", "attributes", "both"],
        default="collab",
        help="--model sid: the item vectors its codes are tokenized from",
    )
    p.add_argument(
        "--collab-epochs",
        type=int,
        default=0,
        help="--model sid: epochs of the HSTU run that makes the codes (0: the dataset's "
        "README recipe, COLLAB_EPOCHS)",
    )
    p.add_argument(
        "--cold-start",
        action="store_true",
        help="also score the test users whose item never occurs as a training target",
    )
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
        if args.model == "sid":
            make_codes(args, work)
        if args.cold_start or args.model == "sid":
            print(f"cold-start test users: {make_cold_split(work)}", file=sys.stderr)
        # each seed's trainer is a spawned process: threads here only wait on them
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            runs = list(
                pool.map(
                    lambda seed: run_once(args, seed, work),
                    range(args.first_seed, args.first_seed + args.seeds),
                )
            )
        stats = work / "prepared" / "semantic" / "stats.json"
        sid_stats = json.loads(stats.read_text()) if args.model == "sid" else {}
    out = {
        "benchmark": "quality",
        "dataset": args.dataset,
        "model": args.model,
        "config": config_name(args),
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
    if args.cold_start or args.model == "sid":
        out["ms_per_user"] = [r["ms_per_user"] for r in runs]
    if args.model == "sid":
        out["sid_vectors"] = args.sid_vectors
        out["tokenizer"] = {
            k: sid_stats[k] for k in ("method", "collision_rate", "unique_codes", "max_collisions")
        }
    if args.cold_start or args.model == "sid":
        out["cold"] = {
            "users": runs[0]["cold"]["users"],
            **{
                m: round(statistics.mean(r["cold"][m] for r in runs), 5)
                for m in METRICS + tuple(f"most_popular/{m}" for m in METRICS)
            },
        }
    out["wall_s"] = round(time.time() - t0, 1)
    if args.plot:
        plot_curves(args, runs, Path(args.plot))
        out["plot"] = args.plot
    if args.dataset in PUBLISHED:
        out["published"] = PUBLISHED[args.dataset]
    print(json.dumps(out), file=stdout, flush=True)


if __name__ == "__main__":
    main()
