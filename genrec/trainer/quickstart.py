"""`genrec quickstart` (what `make run` calls): the main job end to end, on a small default.

1. generate a small synthetic T-ECD set in T-ECD's own layout;
2. prepare it into per-user daily sequence shards (Ray job);
3. train an HSTU retriever (or, with model.task=ranking, a multi-task ranker) in one
   time-ordered pass on 2 local ranks (gloo), item table
   row-wise sharded, evaluating every batch before learning from it;
4. print per-window progressive recall@10 / NDCG@10 next to a most-popular baseline on
   the same positions (ranking: AUC per task next to the item's past positive rate), write plots, and say where the checkpoint, metrics and plots are.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from genrec.config import load_config

CONFIG = "quickstart"  # shipped with the package (genrec/configs/quickstart.yaml)


def _table(history: list[dict], tasks: list[str]) -> str:
    """Retrieval: recall/NDCG@10 next to most-popular; ranking (`tasks`): AUC per task next
    to the item-rate baseline."""
    if tasks:
        pairs = [(f"model/{t}.auc", f"{t} AUC", f"item_rate/{t}.auc", "item rate") for t in tasks]
    else:
        pairs = [
            ("model/recall@10", "R@10", "most_popular/recall@10", "pop R@10"),
            ("model/ndcg@10", "NDCG@10", "most_popular/ndcg@10", "pop NDCG@10"),
        ]
    cols = [c for k1, n1, k2, n2 in pairs for c in ((k1, n1), (k2, n2))]
    head = f"{'window':>6} {'positions':>9} | " + " ".join(f"{n:>11}" for _, n in cols)
    lines = [head + f" | {'loss':>6}", "-" * (len(head) + 9)]
    for r in history:
        vals = " ".join(f"{r[k]:>11.4f}" for k, _ in cols)
        lines.append(f"{r['window']:>6} {int(r['positions']):>9} | {vals} | {r['loss']:>6.3f}")
    return "\n".join(lines)


def _verdict(history: list[dict], tasks: list[str]) -> str:
    """How often the model beats its baseline in the later windows."""
    late = history[len(history) // 2 :]
    if not tasks:
        wins = sum(r["model/recall@10"] > r["most_popular/recall@10"] for r in late)
        return f"HSTU beats most-popular on recall@10 in {wins}/{len(late)} of the later windows."
    t = tasks[0]
    wins = sum(r[f"model/{t}.auc"] > r[f"item_rate/{t}.auc"] for r in late)
    return f"HSTU beats the item rate on {t} AUC in {wins}/{len(late)} of the later windows."


def quickstart(workdir: str = "runs/quickstart", overrides: list[str] | None = None) -> int:
    from genrec.data_pipeline.sequences import prepare
    from genrec.data_pipeline.synthetic import generate
    from genrec.trainer.launch import train
    from genrec.trainer.plot import plot_run

    work = Path(workdir)
    cfg = load_config(
        CONFIG,
        [
            f"data.raw_dir={work / 'raw'}",
            f"data.prepared_dir={work / 'prepared'}",
            f"trainer.run_dir={work / 'run'}",
            *(overrides or []),
        ],
    )
    t0 = time.time()
    if work.exists():
        shutil.rmtree(work)  # the quickstart always starts from scratch
    print(
        f"[1/4] generating synthetic T-ECD: {cfg.data.synthetic_users} users, "
        f"{cfg.data.synthetic_events} events -> {cfg.data.raw_dir}",
        flush=True,
    )
    rep = generate(
        source=cfg.data.source,
        out_dir=cfg.data.raw_dir,
        users=cfg.data.synthetic_users,
        events=cfg.data.synthetic_events,
        items=cfg.data.synthetic_items,
        seed=cfg.data.seed,
    )
    print(rep.summary(), flush=True)
    print(f"[2/4] preparing daily sequence shards -> {cfg.data.prepared_dir}", flush=True)
    rep = prepare(
        source=cfg.data.source,
        in_dir=cfg.data.raw_dir,
        out_dir=cfg.data.prepared_dir,
        window=cfg.data.window,
        max_len=cfg.data.max_len,
        on_bad_rows=cfg.data.on_bad_rows,
        # one row group per rank and step: every rank decodes only its own rows
        row_group_rows=cfg.trainer.batch_size,
    )
    print(rep.summary(), flush=True)
    print(
        f"[3/4] training HSTU {cfg.model.task} on {cfg.trainer.world_size} local ranks "
        f"({cfg.sharding.strategy} item table), one pass",
        flush=True,
    )
    train(cfg, resume=False)
    run = Path(cfg.trainer.run_dir)
    summary = json.loads((run / "summary.json").read_text())
    history = summary["windows"]
    print("[4/4] progressive evaluation (each window scored before it was trained on):")
    rc = cfg.model.ranking
    tasks = (
        [t for t in rc.tasks if t not in rc.regression_tasks] if cfg.model.task == "ranking" else []
    )
    print(_table(history, tasks))
    plots = plot_run(run)
    print(
        f"\n{_verdict(history, tasks)}\n"
        f"checkpoint: {run / 'checkpoints'}\nmetrics:    {run / 'metrics.csv'} "
        f"(TensorBoard: {run / 'tb'})\nplots:      {', '.join(str(p) for p in plots)}\n"
        f"took {time.time() - t0:.0f} s"
    )
    return 0
