"""The Ray Train launcher on CPU workers (the CPU form of the GPU path), and its fault tolerance.

One small synthetic T-ECD set is generated and prepared once. Runs, both `--launcher ray`
with 2 gloo workers under the session's Ray (`ray_local`):
  clean   uninterrupted one pass
  killed  the same config; once a checkpoint past the halfway step exists, rank 1's worker
          process is SIGKILLed (its pid comes from run_dir/workers/rank-1.json); Ray Train's
          FailureConfig starts a new worker group, which resumes from the last checkpoint
The killed run must finish with every window in summary.json exactly once, the same step
count, stream position and final weights as the clean run.

A two-node cluster simulated on this box (`ray.cluster_utils.Cluster`, its own process and
Ray temp dir, both nodes on 127.0.0.1 with 2 CPUs and a custom resource each) runs the path
users take on a real cluster: `genrec prepare --ray-address` and `genrec train --launcher ray
--ray-address`, 2 workers of 1.5 CPUs, so at most one fits on a node: the workers' node ids
must differ, and the pass must cover every prepared window.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from genrec.config import load_config
from genrec.trainer import checkpoint as ckpt
from genrec.trainer.launch import WORKERS_DIR, train

from ..conftest import ROOT
from .helpers import TINY_MODEL, final_model_state, make_prepared, tiny_config

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


# ------------------------------------------------------------------ a two-node cluster

CLUSTER_NODES = ({"node_a": 1.0}, {"node_b": 1.0})
CLUSTER_TIMEOUT_S = 420


def two_node_cluster_main() -> None:
    """In a child process: start the cluster, print its address, shut it down when stdin
    closes (or this process is told to stop)."""
    from ray.cluster_utils import Cluster

    node = {"node_ip_address": "127.0.0.1", "num_cpus": 2, "object_store_memory": 100 << 20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "resources": CLUSTER_NODES[0], "include_dashboard": False},
    )
    try:
        cluster.add_node(**node, resources=CLUSTER_NODES[1])
        cluster.wait_for_nodes()
        print(cluster.address, flush=True)
        sys.stdin.read()
    finally:
        cluster.shutdown()


def _genrec(env: dict, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "genrec.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLUSTER_TIMEOUT_S,
    )
    assert r.returncode == 0, f"genrec {args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def test_two_node_cluster_prepares_and_trains_one_worker_per_node(tmp_path):
    from genrec.data_pipeline.synthetic import generate

    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "RAY_TMPDIR": ray_tmp,  # the cluster's address file stays out of /tmp/ray
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # 127.0.0.1 is not re-resolved
    }
    head = subprocess.Popen(
        [sys.executable, "-c", f"import {__name__} as t; t.two_node_cluster_main()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=env,
        text=True,
        start_new_session=True,
    )
    try:
        ready, _, _ = select.select([head.stdout], [], [], CLUSTER_TIMEOUT_S)
        address = head.stdout.readline().strip() if ready else ""
        assert address.startswith("127.0.0.1:"), f"the cluster did not start ({address!r})"
        generate("tecd", str(tmp_path / "raw"), users=80, events=2000, items=200, seed=0)
        _genrec(
            env,
            "prepare",
            "--source",
            "tecd",
            "--in",
            str(tmp_path / "raw"),
            "--out",
            str(tmp_path / "prepared"),
            "--max-len",
            "20",
            "--ray-address",
            address,
        )
        ray_run = tmp_path / "ray_run"
        train_args = _two_node_args(tmp_path, ray_run)
        _genrec(env, "train", *train_args, "--launcher", "ray", "--ray-address", address)
        workers = [
            json.loads((ray_run / WORKERS_DIR / f"rank-{r}.json").read_text()) for r in (0, 1)
        ]
        nodes = [w["node_id"] for w in workers]
        assert all(nodes) and nodes[0] != nodes[1], f"both workers ran on one node: {workers}"
    finally:
        try:
            head.stdin.close()
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # the same pass under the local launcher: every row was read once across the two nodes
    local_run = tmp_path / "local_run"
    path, *overrides = _two_node_args(tmp_path, local_run)
    cfg = load_config(path, overrides)
    cfg.trainer.launcher = "local"
    train(cfg, resume=False)
    on_cluster, local = (json.loads((r / "summary.json").read_text()) for r in (ray_run, local_run))
    assert [r["window"] for r in on_cluster["windows"]] == _prepared_windows(tmp_path)
    assert on_cluster["world_size"] == 2 and on_cluster["steps"] == local["steps"] > 0
    positions = [r["positions"] for r in on_cluster["windows"]]
    assert positions == [r["positions"] for r in local["windows"]] and min(positions) > 0


def _two_node_args(base: Path, run: Path) -> list[str]:
    """Config and overrides of the two-node run: the quickstart config shrunk; every window
    fully evaluated (positions count each target once); 1.5 CPUs per Ray worker."""
    return [
        str(ROOT / "configs" / "quickstart.yaml"),
        f"data.prepared_dir={base / 'prepared'}",
        f"trainer.run_dir={run}",
        *TINY_MODEL,
        "trainer.world_size=2",
        "trainer.ray_workers_cpus=1.5",
        "trainer.batch_size=16",
        "trainer.eval_batches=0",
        "trainer.max_failures=0",
        "model.retrieval.num_negatives=32",
        "embeddings.tables=[{name: item, num_embeddings: 2048, dim: 32, features: [item_id]}]",
    ]
