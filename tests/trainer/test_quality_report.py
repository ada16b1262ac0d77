"""benchmarks/quality.py's report: seeds finished earlier are read back (--reuse) and the
JSON line's means, spreads and per-seed rows equal the hand-computed values; the plot is
written. No training: the run summaries are written here in EpochTrainer's format."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from ..conftest import ROOT

METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


def _summary(seed: int) -> dict:
    epochs = [
        {
            "epoch": e,
            "valid/recall@10": 0.01 * (e + 1),
            "valid/ndcg@10": 0.005 * (e + 1),
            "valid/most_popular/recall@10": 0.004,
            "valid/most_popular/ndcg@10": 0.002,
        }
        for e in range(3)
    ]
    final = {
        "best_epoch_step": 30,
        "valid": 0.015,
        "seconds": 100.0 + seed,
        **{f"test/{m}": 0.1 * (seed + 1) + 0.001 * i for i, m in enumerate(METRICS)},
        **{f"test/most_popular/{m}": 0.002 for m in METRICS},
    }
    return {"steps": 30, "windows": [*epochs, final], "world_size": 1}


def test_reused_seeds_are_aggregated_by_hand_values(tmp_path):
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "_meta.json").write_text("{}")  # nothing to prepare
    for seed in range(3):
        run = tmp_path / f"run-seed{seed}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(_summary(seed)))
    plot = tmp_path / "curves.png"
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "quality.py"),
            "--dataset",
            "toys",
            "--seeds",
            "3",
            "--reuse",
            "--workdir",
            str(tmp_path),
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout  # one JSON line; progress went to stderr
    report = json.loads(lines[0])
    for i, m in enumerate(METRICS):
        per_seed = [0.1 * (s + 1) + 0.001 * i for s in range(3)]
        assert abs(report[m] - statistics.mean(per_seed)) < 1e-5, m
        assert abs(report[f"{m}_std"] - statistics.pstdev(per_seed)) < 1e-5, m
        assert [r[m] for r in report["per_seed"]] == [round(v, 5) for v in per_seed]
    assert report["seconds_per_seed"] == [100.0, 101.0, 102.0]
    assert report["epochs"] == [3, 3, 3]
    assert report["published"]["TIGER"] == [0.0521, 0.0371, 0.0712, 0.0432]
    assert "reusing the finished run" in out.stderr
    assert plot.stat().st_size > 10_000
