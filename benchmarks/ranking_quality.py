"""Ranking quality on MovieLens-100K: the HSTU ranker against three baselines, one split.

    python benchmarks/ranking_quality.py --data-dir ../shared/data --seeds 3 [overrides]

Split (genrec's leave-one-out, `trainer.epochs.loo_view`): each user's ratings in time
order; the last rated item is the test candidate, the one before it validation (early
stopping and model selection on its AUC), everything before is training data. Label:
like = rating >= 4. The HSTU ranker (configs/ml100k_ranking.yaml) sees the user's earlier
items and ratings and scores the candidate with its rating hidden. Baselines, fitted on
the same training events and scored on the same test candidates:
  item_rate            the item's positive rate in training, (pos + p) / (n + 1), p global;
  user_rate            the user's positive rate in training, the same smoothing;
  logistic_regression  sigmoid(b + w_user + w_item), L2 chosen on the validation AUC.
AUC and NE (models/metrics.py) on test; HSTU as mean and spread (population std) over
seeds, the baselines are deterministic. Prints one JSON line with `auc`, `ne`,
`baselines`; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genrec.data_pipeline.schemas import ACTIONS
from genrec.models.metrics import auc, normalized_entropy

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "genrec" / "configs" / "ml100k_ranking.yaml"
LIKE = ACTIONS["like"]


def split(prepared: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """(user, item, label) arrays of the training events and the valid/test candidates."""
    from genrec.trainer.epochs import loo_view, read_user_sequences

    table = read_user_sequences(prepared)
    out = {}
    for name in ("train", "valid", "test"):
        view = loo_view(table, name)
        items = view.column("item_ids").to_pylist()
        acts = view.column("actions").to_pylist()
        users = view.column("user_id").to_numpy()
        if name == "train":
            u = np.concatenate([np.full(len(s), x) for x, s in zip(users, items)])
            i = np.concatenate([np.asarray(s) for s in items])
            y = np.concatenate([np.asarray(a) == LIKE for a in acts])
        else:  # the one candidate: the row's last event
            u, i = users, np.array([s[-1] for s in items])
            y = np.array([a[-1] == LIKE for a in acts])
        out[name] = (u.astype(np.int64), i.astype(np.int64), y.astype(np.float64))
    return out


def rate(keys: np.ndarray, y: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Smoothed positive rate of each query key in (keys, y): (pos + p) / (n + 1)."""
    p = float(y.mean())
    uniq, inv = np.unique(keys, return_inverse=True)
    pos, n = np.bincount(inv, weights=y), np.bincount(inv)
    idx = np.searchsorted(uniq, query).clip(0, len(uniq) - 1)
    found = uniq[idx] == query
    return np.where(found, (pos[idx] + p) / (n[idx] + 1.0), p)


def logistic_regression(data: dict, l2s=(1e-6, 1e-5, 1e-4, 1e-3)) -> np.ndarray:
    """Test logits of sigmoid(b + w_u + w_i) fitted by L-BFGS, L2 picked on valid AUC."""
    u, i, y = data["train"]
    users, items = np.unique(u), np.unique(i)

    def index(keys, vocab):  # unseen -> the extra last row (weight stays 0)
        idx = np.searchsorted(vocab, keys).clip(0, len(vocab) - 1)
        return torch.as_tensor(np.where(vocab[idx] == keys, idx, len(vocab)))

    def fit(l2: float):
        wu = torch.zeros(len(users) + 1, dtype=torch.float64, requires_grad=True)
        wi = torch.zeros(len(items) + 1, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        tu, ti, ty = index(u, users), index(i, items), torch.as_tensor(y)
        opt = torch.optim.LBFGS([wu, wi, b], max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logit = b + wu[tu] + wi[ti]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, ty)
            loss = loss + l2 * (wu.pow(2).sum() + wi.pow(2).sum())
            loss.backward()
            return loss

        opt.step(closure)
        return lambda uu, ii: (b + wu[index(uu, users)] + wi[index(ii, items)]).detach()

    vu, vi, vy = data["valid"]
    best = max(l2s, key=lambda l2: auc(fit(l2)(vu, vi), torch.as_tensor(vy)))
    tu, ti, _ = data["test"]
    print(f"logistic regression: L2 {best} (best valid AUC)", file=sys.stderr)
    return fit(best)(tu, ti).numpy()


def baselines(data: dict) -> dict[str, dict[str, float]]:
    u, i, y = data["train"]
    tu, ti, ty = data["test"]
    logit = {
        "item_rate": _logit(rate(i, y, ti)),
        "user_rate": _logit(rate(u, y, tu)),
        "logistic_regression": logistic_regression(data),
    }
    t = torch.as_tensor(ty)
    return {
        k: {
            "auc": round(auc(torch.as_tensor(v), t), 5),
            "ne": round(normalized_entropy(torch.as_tensor(v), t), 5),
        }
        for k, v in logit.items()
    }


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def run_seed(prepared: Path, work: Path, seed: int, overrides: list[str]) -> dict:
    from genrec.config import load_config
    from genrec.trainer.launch import train

    run = work / f"run-seed{seed}"
    cfg = load_config(
        CONFIG,
        [
            f"data.prepared_dir={prepared}",
            f"trainer.run_dir={run}",
            f"trainer.seed={seed}",
            *overrides,
        ],
    )
    t0 = time.time()
    train(cfg, resume=False)
    rows = json.loads((run / "summary.json").read_text())["windows"]
    final = rows[-1]
    return {
        "auc": final["test/like.auc"],
        "ne": final["test/like.ne"],
        "calibration": final["test/like.calibration"],
        "valid_auc": final["valid"],
        "epochs": len(rows) - 1,
        "seconds": time.time() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data-dir",
        default=os.environ.get("GENREC_DATA_DIR", str(ROOT.parent / "shared" / "data")),
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workdir", default="", help="keep runs here (default: a temp dir)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.epochs=20")
    args = p.parse_args()
    t0 = time.time()
    stdout = sys.stdout
    with (
        tempfile.TemporaryDirectory(prefix="genrec-ranking-") as tmp,
        contextlib.redirect_stdout(sys.stderr),
    ):
        work = Path(args.workdir or tmp)
        prepared = work / "prepared"
        if not (prepared / "_meta.json").exists():
            from genrec.data_pipeline.sequences import prepare

            prepare(
                source="recbole",
                in_dir=str(Path(args.data_dir) / "ml-100k"),
                out_dir=str(prepared),
                window="1000000000000",
                max_len=200,
            )
        data = split(prepared)
        base = baselines(data)
        print(f"baselines: {base}", file=sys.stderr)
        runs = [run_seed(prepared, work, s, args.overrides) for s in range(args.seeds)]
    aucs, nes = [r["auc"] for r in runs], [r["ne"] for r in runs]
    out = {
        "benchmark": "ranking_quality",
        "dataset": "ml100k",
        "task": "like = rating >= 4",
        "test_users": int(data["test"][0].size),
        "test_positive_rate": round(float(data["test"][2].mean()), 5),
        "seeds": args.seeds,
        "overrides": args.overrides,
        "auc": round(statistics.mean(aucs), 5),
        "auc_std": round(statistics.pstdev(aucs), 5),
        "ne": round(statistics.mean(nes), 5),
        "ne_std": round(statistics.pstdev(nes), 5),
        "baselines": base,
        "beats_every_baseline_on_auc": all(min(aucs) > b["auc"] for b in base.values()),
        "per_seed": [{k: round(v, 5) for k, v in r.items()} for r in runs],
        "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps(out), file=stdout, flush=True)


if __name__ == "__main__":
    main()
