"""CI smoke version of benchmarks/quality.py on REAL data: a few hundred Amazon Toys users.

The subset keeps the file's most popular items and the users with enough events among
them (a dense corner of the real data, so a couple of short epochs can learn something),
written as a text file in the S3-Rec format. It is prepared and trained exactly like the
benchmark (configs/amazon_toys.yaml, multi-epoch leave-one-out, full-catalog ranking with
history excluded) and the model's TEST metrics must beat a most-popular baseline computed
here by hand on the same subset and protocol: items ranked by their count in the training
parts (all but each user's last two events), the user's history excluded.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from genrec.config import load_config
from genrec.trainer.launch import train

from ..conftest import ROOT

TOP_ITEMS = 300
MIN_EVENTS = 5
USERS = 600
K = 10


def toys_subset(shared_data: Path) -> dict[int, list[int]]:
    path = shared_data / "amazon" / "Toys_and_Games.txt"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the shared Amazon data is required")
    seqs = {}
    for line in path.read_text().splitlines():
        ids = [int(x) for x in line.split()]
        if ids:
            seqs[ids[0]] = ids[1:]
    counts = Counter(i for s in seqs.values() for i in s)
    keep = {i for i, _ in counts.most_common(TOP_ITEMS)}
    out = {}
    for user in sorted(seqs):
        s = [i for i in seqs[user] if i in keep]
        if len(s) >= MIN_EVENTS:
            out[user] = s
        if len(out) == USERS:
            break
    return out


def most_popular_test_metrics(seqs: dict[int, list[int]]) -> tuple[float, float]:
    """(Recall@K, NDCG@K) of ranking by training counts, history excluded, on test."""
    counts = Counter(i for s in seqs.values() for i in s[:-2])
    catalog = sorted({i for s in seqs.values() for i in s})
    ranked = sorted(catalog, key=lambda i: (-counts[i], i))
    hits = ndcg = 0.0
    for s in seqs.values():
        history, target = set(s[:-1]), s[-1]
        top = [i for i in ranked if i not in history][:K]
        if target in top:
            hits += 1
            ndcg += 1 / math.log2(top.index(target) + 2)
    return hits / len(seqs), ndcg / len(seqs)


@pytest.fixture(scope="module")
def toys_prepared(tmp_path_factory, shared_data, ray_local):
    """(user sequences, prepared dir) of the subset, prepared like the benchmark does."""
    from genrec.data_pipeline.sequences import prepare

    seqs = toys_subset(shared_data)
    assert len(seqs) == USERS
    base = tmp_path_factory.mktemp("toys_subset")
    raw = base / "toys_subset.txt"
    raw.write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in seqs.items()))
    prepare(
        source="text",
        in_dir=str(raw),
        out_dir=str(base / "prepared"),
        window="1000000000000",
        max_len=50,
    )
    return seqs, base / "prepared"


def _train(prepared: Path, run_dir: Path, *overrides: str) -> list[dict]:
    cfg = load_config(
        ROOT / "genrec" / "configs" / "amazon_toys.yaml",
        [f"data.prepared_dir={prepared}", f"trainer.run_dir={run_dir}", *overrides],
    )
    train(cfg, resume=False)
    return json.loads((run_dir / "summary.json").read_text())["windows"]


def test_quality_smoke_beats_most_popular(tmp_path, toys_prepared):
    seqs, prepared = toys_prepared
    overrides = ("trainer.epochs=2", "trainer.batch_size=64")
    rows = _train(prepared, tmp_path / "run", *overrides)
    test = rows[-1]
    assert test["test/users"] == USERS
    pop_recall, pop_ndcg = most_popular_test_metrics(seqs)
    assert 0.0 < pop_recall < 1.0
    assert test["test/recall@10"] > pop_recall, (test, pop_recall)
    assert test["test/ndcg@10"] > pop_ndcg, (test, pop_ndcg)
    assert test["test/most_popular/recall@10"] == pytest.approx(pop_recall, abs=1e-12)

    # `genrec evaluate` on the run: its newest checkpoint is the best on validation, and
    # scoring it again on 2 ranks (the run trained on 1: resharded on load) gives the run's
    # own numbers, on test and on validation
    metrics_before = (tmp_path / "run" / "metrics.csv").read_bytes()
    for split, want in (("test", test), ("valid", {"valid/ndcg@10": test["valid"]})):
        got = _evaluate(prepared, tmp_path / "run", split, *overrides, "trainer.world_size=2")
        assert got["step"] == test["best_epoch_step"]
        for key, value in want.items():
            if key.startswith(f"{split}/"):
                assert got[key] == pytest.approx(value, abs=1e-9), key
        assert (tmp_path / "run" / f"evaluate-{split}-step{got['step']:08d}.json").is_file()
    # the run's own metrics were left alone (a restore would truncate them at its step)
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == metrics_before

    # benchmarks/quality.py --score-stopped on a copy with summary.json removed, as if the
    # run had been stopped by hand: the seed's row is the run's own test metrics
    work = tmp_path / "work"
    work.mkdir()
    (work / "prepared").symlink_to(prepared)
    shutil.copytree(tmp_path / "run", work / "run-seed0")
    (work / "run-seed0" / "summary.json").unlink()
    r = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--dataset", "toys",
            "--seeds", "1", "--workdir", str(work), "--score-stopped", *overrides,
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["stopped_before_end"] == [True]
    assert report["epochs"] == [2]
    for m in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"):
        assert report[m] == round(test[f"test/{m}"], 5), m
    assert report["valid_ndcg@10"] == [round(test["valid"], 5)]


def _evaluate(prepared: Path, run_dir: Path, split: str, *overrides: str) -> dict:
    r = subprocess.run(
        [
            sys.executable, "-m", "genrec.cli", "evaluate",
            str(ROOT / "genrec" / "configs" / "amazon_toys.yaml"),
            f"data.prepared_dir={prepared}", f"trainer.run_dir={run_dir}", *overrides,
            "--split", split,
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{split}: {USERS} users" in r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_sasrec_bce_validates_every_nth_epoch(tmp_path, toys_prepared):
    """SASRec's original setup (BCE, dot product, replicated item table under dense Adam)
    with trainer.eval_every=2 over 3 epochs: validated after epochs 1 and 2 (the last)
    only, the best of those two is the one scored on test."""
    _, prepared = toys_prepared
    rows = _train(
        prepared,
        tmp_path / "run",
        "model.kind=sasrec",
        "model.num_layers=1",
        "model.retrieval.full_softmax=false",
        "model.retrieval.loss=bce",
        "model.retrieval.similarity=dot",
        "model.retrieval.temperature=1.0",
        "sharding.strategy=data_parallel",
        "trainer.batch_size=64",
        "trainer.epochs=3",
        "trainer.eval_every=2",
    )
    epochs, final = rows[:-1], rows[-1]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert ["valid/ndcg@10" in r for r in epochs] == [False, True, True]
    steps_per_epoch = -(-(USERS) // 64)
    best = max(epochs[1:], key=lambda r: r["valid/ndcg@10"])
    assert final["valid"] == best["valid/ndcg@10"]
    assert final["best_epoch_step"] == steps_per_epoch * (best["epoch"] + 1)
    assert final["test/users"] == USERS


def test_epochs_resume_equals_uninterrupted(tmp_path, toys_prepared):
    """An epochs run stopped after 2 of 3 epochs and resumed ends with the weights, the
    validation rows and the test metrics of the uninterrupted 3-epoch run."""
    from tests.trainer.helpers import final_model_state

    _, prepared = toys_prepared
    small = ("trainer.batch_size=128", "model.num_layers=1", "trainer.patience=5")
    full = _train(prepared, tmp_path / "full", "trainer.epochs=3", *small)
    _train(prepared, tmp_path / "resumed", "trainer.epochs=2", *small)
    cfg = load_config(
        ROOT / "genrec" / "configs" / "amazon_toys.yaml",
        [
            f"data.prepared_dir={prepared}",
            f"trainer.run_dir={tmp_path / 'resumed'}",
            "trainer.epochs=3",
            *small,
        ],
    )
    train(cfg, resume=True)
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())["windows"]
    assert [r["epoch"] for r in resumed[:-1]] == [0, 1, 2]
    for a, b in zip(full[:-1], resumed[:-1]):
        for key in a:
            if key.startswith("valid/") or key == "loss":
                assert a[key] == pytest.approx(b[key], abs=1e-9), (a["epoch"], key)
    for key, value in full[-1].items():
        if key.startswith("test/") or key in ("valid", "best_epoch_step"):
            assert resumed[-1][key] == pytest.approx(value, abs=1e-9), key
    w_full, s_full = final_model_state(tmp_path / "full")
    w_res, s_res = final_model_state(tmp_path / "resumed")
    assert s_full["step"] == s_res["step"] and s_full["epoch"] == s_res["epoch"] == 2
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=0, atol=0, msg=k)
