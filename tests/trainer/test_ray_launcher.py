"""The Ray Train launcher on CPU workers (the CPU form of the GPU path), and its fault tolerance.

One small synthetic T-ECD set is generated and prepared once. Runs, both `--launcher ray`
with 2 gloo workers under the session's Ray (`ray_local`):
  clean   uninterrupted one pass
  killed  the same config; once a checkpoint past the halfway step exists, rank 1's worker
          process is SIGKILLed (its pid comes from run_dir/workers/rank-1.json); Ray Train's
          FailureConfig starts a new worker group, which resumes from the last checkpoint
The killed run must finish with every window in summary.json exactly once, the same step
count, stream position and final weights as the clean run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from genrec.trainer import checkpoint as ckpt
from genrec.trainer.launch import WORKERS_DIR, train

from .helpers import final_model_state, make_prepared, tiny_config

KILL_DEADLINE_S = 240.0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_local) -> Path:
    return make_prepared(
        tmp_path_factory.mktemp("ray_launcher"), users=200, events=12_000, items=400, seed=5
    )


def _cfg(base: Path, run: str):
    return tiny_config(
        base / "prepared",
        base / run,
        "trainer.launcher=ray",
        "trainer.world_size=2",
        "trainer.max_failures=1",
        "trainer.batch_size=16",
        "trainer.eval_batches=1",
        "model.retrieval.num_negatives=32",
        "embeddings.tables=[{name: item, num_embeddings: 2048, dim: 32, features: [item_id]}]",
        "embeddings.frequency.width=2048",
    )


def _prepared_windows(base: Path) -> list[int]:
    from genrec.data_pipeline.stream import list_windows

    return sorted(list_windows(str(base / "prepared")))


class _KillRankAfterCheckpoint(threading.Thread):
    """SIGKILLs the process running `rank` once a checkpoint at `min_step` or later exists
    and a step after it was logged, so work done since the checkpoint is lost."""

    def __init__(self, run_dir: Path, rank: int, min_step: int) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.rank, self.min_step = run_dir, rank, min_step
        self.killed_pid: int | None = None
        self.killed_after_step: int | None = None
        self.stop = threading.Event()

    def _last_logged_step(self) -> int:
        path = self.run_dir / "metrics.csv"
        lines = path.read_text().splitlines()[1:] if path.is_file() else []
        steps = [int(r.split(",")[1]) for r in lines if r.startswith("step,")]
        return max(steps, default=-1)

    def run(self) -> None:
        deadline = time.monotonic() + KILL_DEADLINE_S
        pid_file = self.run_dir / WORKERS_DIR / f"rank-{self.rank}.json"
        while time.monotonic() < deadline and not self.stop.is_set():
            latest = ckpt.latest_checkpoint(self.run_dir)
            step = int(latest.name[len(ckpt.PREFIX) :]) if latest is not None else -1
            if step >= self.min_step and self._last_logged_step() > step and pid_file.is_file():
                pid = int(json.loads(pid_file.read_text())["pid"])
                self.killed_after_step = step
                os.kill(pid, signal.SIGKILL)
                self.killed_pid = pid
                return
            time.sleep(0.02)


@pytest.fixture(scope="module")
def clean_run(prepared) -> Path:
    cfg = _cfg(prepared, "clean")
    train(cfg, resume=True)
    return prepared / "clean"


def test_ray_launcher_trains_one_pass_like_local(clean_run, prepared):
    summary = json.loads((clean_run / "summary.json").read_text())
    windows = [r["window"] for r in summary["windows"]]
    assert windows == _prepared_windows(prepared)
    assert summary["world_size"] == 2
    weights, state = final_model_state(clean_run)
    assert state["step"] == summary["steps"] > 0
    assert state["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in weights.values())
    # every step was logged with its throughput and input stall, as under `local`
    steps = [
        line.split(",")
        for line in (clean_run / "metrics.csv").read_text().splitlines()[1:]
        if line.startswith("step,") and ",input_stall," in line
    ]
    assert len(steps) == summary["steps"]
    assert all(0.0 <= float(r[4]) <= 1.0 for r in steps)
    pids = {json.loads(p.read_text())["pid"] for p in (clean_run / WORKERS_DIR).glob("rank-*")}
    assert len(pids) == 2 and os.getpid() not in pids  # two separate Ray worker processes


def test_killed_worker_resumes_with_no_lost_or_repeated_windows(clean_run, prepared):
    clean = json.loads((clean_run / "summary.json").read_text())
    cfg = _cfg(prepared, "killed")
    # halfway: windows both before (restored) and after (replayed by the new workers)
    killer = _KillRankAfterCheckpoint(prepared / "killed", rank=1, min_step=clean["steps"] // 2)
    killer.start()
    try:
        train(cfg, resume=True)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed_pid is not None, "no checkpoint appeared before the kill deadline"

    killed = json.loads((prepared / "killed" / "summary.json").read_text())
    assert killer.killed_after_step < killed["steps"]  # the kill landed mid-run
    assert [r["window"] for r in killed["windows"]] == _prepared_windows(prepared)
    assert killed["steps"] == clean["steps"]
    assert [r["positions"] for r in killed["windows"]] == [r["positions"] for r in clean["windows"]]
    # a new worker group took over rank 1
    rank1 = json.loads((prepared / "killed" / WORKERS_DIR / "rank-1.json").read_text())
    assert rank1["pid"] != killer.killed_pid

    w_clean, s_clean = final_model_state(clean_run)
    w_killed, s_killed = final_model_state(prepared / "killed")
    assert s_killed["position"] == s_clean["position"]
    for k in w_clean:
        torch.testing.assert_close(w_killed[k], w_clean[k], rtol=1e-5, atol=1e-6, msg=k)
