"""Launchers: the same worker function under local processes, torchrun, or Ray Train.

local     N processes on this machine (torch.multiprocessing spawn; gloo on CPU, NCCL on GPU)
torchrun  already inside an external torchrun (RANK/WORLD_SIZE/MASTER_ADDR set; multi-node)
ray       Ray Train TorchTrainer (ScalingConfig(num_workers, use_gpu)); each worker reserves
          `trainer.ray_workers_cpus` CPUs so Ray Data tasks never starve; worker failures
          restart from the last checkpoint in run_dir (FailureConfig(max_failures))

Ray 2.60 runs Ray Train V2 (the default): a controller actor owns the run, FailureConfig's
max_failures counts worker-group restarts, and RunConfig.storage_path only holds Ray's own
run state; genrec's checkpoints and metrics stay in run_dir, which every worker must see
(shared storage on a cluster). The driver shows progress by reading run_dir.

`evaluate` runs `genrec.trainer.evaluate.run_evaluation` instead of training on the same
local or torchrun workers (it scores a checkpoint; Ray Train's restart loop has no use there).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genrec.config import Config, dump_config, from_dict, to_dict
from genrec.trainer import checkpoint as ckpt
from genrec.trainer.distributed import context_from_initialized, free_port, init_distributed
from genrec.trainer.metrics_log import CSV_NAME, FIELDS


def _prepare_run_dir(cfg: Config) -> None:
    run = Path(cfg.trainer.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(dump_config(cfg))


def quiet_library_warnings() -> None:
    """Deprecation chatter from torchrec/torch internals that users cannot act on."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\.")
    warnings.filterwarnings("ignore", message=r".*is_fx_tracing.*")
    import logging

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this spawned worker when the launching process dies.

    A killed launcher (SIGKILL, OOM killer, a terminal closed) otherwise leaves its spawned
    ranks training on as orphans: holding the cores, writing into the run directory."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # re-parented: the launcher is gone
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_job(cfg: Config, ctx, resume: bool, evaluation: dict | None) -> None:
    """Train (`evaluation` None) or score a checkpoint (`run_evaluation`'s arguments)."""
    if evaluation is None:
        from genrec.trainer.loop import run_worker

        run_worker(cfg, ctx, resume=resume)
    else:
        from genrec.trainer.evaluate import run_evaluation

        run_evaluation(cfg, ctx, **evaluation)


def _local_worker(
    rank: int,
    cfg_dict: dict,
    world_size: int,
    port: int,
    resume: bool,
    evaluation: dict | None = None,
) -> None:
    _exit_with_parent()
    quiet_library_warnings()
    # Co-located ranks split the cores, less one for the stream reader and collectives:
    # oversubscribed OpenMP threads spin-wait (1 rank on a busy 2-core machine ran 10x
    # slower with 2 threads than with 1).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size - 1))

    cfg = from_dict(cfg_dict)
    ctx = init_distributed(
        rank, world_size, cfg.sharding.topology.device, cfg.trainer.backend, master_port=port
    )
    if evaluation is None:
        _record_worker(Path(cfg.trainer.run_dir), rank)
    try:
        _run_job(cfg, ctx, resume, evaluation)
    finally:
        dist.destroy_process_group()


def _torchrun_worker(cfg: Config, resume: bool, evaluation: dict | None = None) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(
                f"--launcher torchrun needs {var} in the environment: start genrec under "
                f"`torchrun --nnodes ... --nproc-per-node ... -m genrec.cli train ...`"
            )
    ctx = init_distributed(
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        cfg.sharding.topology.device,
        cfg.trainer.backend,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    try:
        _run_job(cfg, ctx, resume, evaluation)
    finally:
        dist.destroy_process_group()


def _ray_train_loop(config: dict) -> None:
    """Runs inside each Ray Train worker; Ray Train created the process group.

    Always resumes: after a worker failure Ray Train starts a fresh worker group, which
    continues from the latest checkpoint in run_dir (stream position, weights, optimizer).
    """
    import logging

    from genrec.trainer.loop import run_worker

    # Ray workers log INFO by default: keep fbgemm/torchrec start-up chatter out, as under spawn
    logging.getLogger().setLevel(logging.WARNING)
    quiet_library_warnings()
    cfg = from_dict(config["cfg"])
    # the worker's CPU reservation bounds its threads (OpenMP spin-waits otherwise)
    torch.set_num_threads(max(1, int(cfg.trainer.ray_workers_cpus)))
    ctx = context_from_initialized(cfg.sharding.topology.device)
    import ray

    _record_worker(Path(cfg.trainer.run_dir), ctx.rank, ray.get_runtime_context().get_node_id())
    run_worker(cfg, ctx, resume=True)


WORKERS_DIR = "workers"


def _record_worker(run_dir: Path, rank: int, node_id: str = "") -> None:
    """`run_dir/workers/rank-R.json`: which process on which host (and Ray node, under the
    ray launcher) runs rank R right now.

    For operators (and the fault-tolerance and placement tests): inspect, profile or kill
    one rank."""
    import socket

    out = run_dir / WORKERS_DIR
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "rank": rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "master": f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}",
        "node_id": node_id,
    }
    tmp = out / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.rename(out / f"rank-{rank}.json")


class RayRunProgress(threading.Thread):
    """The driver's view of a Ray Train run: a step bar and the per-window rows.

    Read from the run directory (every rank writes there; on a cluster it is shared storage),
    because Ray's log forwarding mangles the workers' tqdm bar and mixes in Ray's own actors.
    Says when Ray Train replaced the worker group (rank 0 runs in a new process).
    """

    def __init__(self, run_dir: Path, poll_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="genrec-ray-progress")
        self.run_dir, self.poll_s = run_dir, poll_s
        self.finished = threading.Event()
        csv_path = run_dir / CSV_NAME
        self._offset = csv_path.stat().st_size if csv_path.exists() else 0
        self._shown = {r["window"] for r in self._history()}  # resumed: already printed once
        self._pid: int | None = None
        self._bar = None

    def _rank0_pid(self) -> int | None:
        try:
            return int(json.loads((self.run_dir / WORKERS_DIR / "rank-0.json").read_text())["pid"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def _history(self) -> list[dict]:
        latest = ckpt.latest_checkpoint(self.run_dir)
        try:
            return ckpt.read_state(latest).get("history", []) if latest else []
        except (FileNotFoundError, json.JSONDecodeError):  # pruned or renamed while reading
            return []

    def _new_step_rows(self) -> list[dict]:
        path = self.run_dir / CSV_NAME
        if not path.exists():
            return []
        with path.open() as f:
            f.seek(self._offset)
            text = f.read()
        done = text[: text.rfind("\n") + 1]  # whole lines only; the rest is still being written
        self._offset += len(done.encode())
        rows = csv.DictReader(io.StringIO(done), fieldnames=FIELDS)
        return [r for r in rows if r["kind"] == "step" and r["name"] == "loss"]

    def _poll(self) -> None:
        from tqdm import tqdm

        from genrec.trainer.loop import format_row

        pid = self._rank0_pid()
        if pid is not None and pid != self._pid:
            if self._pid is not None:
                tqdm.write(
                    "a worker failed: Ray Train restarted the workers from the last checkpoint"
                )
            self._pid = pid
        for r in self._new_step_rows():
            if self._bar is None:  # its clock starts with training, not with Ray start-up
                self._bar = tqdm(desc="train (ray)", unit="step", dynamic_ncols=True)
            self._bar.n = int(r["step"])
            self._bar.set_postfix(window=r["window"], loss=f"{float(r['value']):.3f}")
        for row in self._history():
            if row["window"] not in self._shown:
                self._shown.add(row["window"])
                tqdm.write(format_row(row))

    def run(self) -> None:
        while not self.finished.wait(self.poll_s):
            self._poll()
        self._poll()
        if self._bar is not None:
            self._bar.close()


def _check_cpu_reservation(cfg: Config) -> None:
    """Train workers must leave CPUs for Ray Data's read tasks, or the stream never fills."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    wanted = cfg.trainer.world_size * cfg.trainer.ray_workers_cpus
    if wanted > total - 1:
        raise ValueError(
            f"{cfg.trainer.world_size} Ray Train workers x trainer.ray_workers_cpus="
            f"{cfg.trainer.ray_workers_cpus} reserve {wanted:g} of the cluster's {total:g} "
            "CPUs, leaving less than 1 for Ray Data's read tasks (the job would hang): "
            "lower trainer.ray_workers_cpus (fractions are fine) or raise data.num_cpus"
        )


def _all_nodes_on_loopback() -> bool:
    """True when every alive node of the connected Ray cluster listens on 127.0.0.1."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return bool(alive) and all(n.get("NodeManagerAddress") == "127.0.0.1" for n in alive)


def _ray_launch(cfg: Config, resume: bool) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from genrec.ray_runtime import init_ray

    if not resume:
        raise ValueError(
            "--launcher ray always resumes from run_dir (that is how it survives worker "
            "failures); clear trainer.run_dir instead of passing --no-resume"
        )
    # Ray Train moves each worker into its own working directory: absolute paths only
    cfg.trainer.run_dir = str(Path(cfg.trainer.run_dir).resolve())
    cfg.data.prepared_dir = str(Path(cfg.data.prepared_dir).resolve())
    use_gpu = cfg.sharding.topology.device == "cuda"
    backend = (
        cfg.trainer.backend if cfg.trainer.backend != "auto" else "nccl" if use_gpu else "gloo"
    )
    started = init_ray(
        num_cpus=cfg.data.num_cpus or max(4, (os.cpu_count() or 1) * 2),
        object_store_mb=cfg.data.object_store_mb,
        address=cfg.data.ray_address,
    )
    shutil.rmtree(Path(cfg.trainer.run_dir) / WORKERS_DIR, ignore_errors=True)  # stale pids
    progress = RayRunProgress(Path(cfg.trainer.run_dir))
    try:
        _check_cpu_reservation(cfg)
        local = not cfg.data.ray_address or _all_nodes_on_loopback()
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={"cfg": to_dict(cfg)},
            torch_config=TorchConfig(backend=backend),
            scaling_config=ScalingConfig(
                num_workers=cfg.trainer.world_size,
                use_gpu=use_gpu,
                resources_per_worker={
                    "CPU": cfg.trainer.ray_workers_cpus,
                    **({"GPU": 1} if use_gpu else {}),
                },
            ),
            run_config=RunConfig(
                name="genrec",
                storage_path=str(Path(cfg.trainer.run_dir) / "ray"),
                failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
                # a local Ray (or a cluster whose nodes are all on 127.0.0.1, i.e. one box)
                # runs on this machine only: keep gloo's sockets on loopback
                worker_runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}} if local else None,
            ),
        )
        print(
            f"starting {cfg.trainer.world_size} Ray Train workers "
            f"({cfg.trainer.ray_workers_cpus:g} CPU{', 1 GPU' if use_gpu else ''} each, {backend})",
            file=sys.stderr,
            flush=True,
        )
        progress.start()
        trainer.fit()  # raises ray.train.TrainingFailedError once max_failures is spent
    finally:
        progress.finished.set()
        if progress.is_alive():
            progress.join()
        if started:
            ray.shutdown()


def _spawn_local(cfg: Config, resume: bool, evaluation: dict | None) -> None:
    ws = cfg.trainer.world_size
    mp.start_processes(
        _local_worker,
        args=(to_dict(cfg), ws, free_port(), resume, evaluation),
        nprocs=ws,
        join=True,
        start_method="spawn",
    )


def evaluate(
    cfg: Config, checkpoint: str | None = None, split: str = "test", out: str | None = None
) -> dict:
    """Score a checkpoint (default: the newest in trainer.run_dir) on
    `trainer.world_size` ranks; see `genrec.trainer.evaluate`. Returns rank 0's result,
    also written to `out` (default run_dir/evaluate-<split|windows>-step<N>.json)."""
    from genrec.trainer.evaluate import resolve_checkpoint

    path = resolve_checkpoint(cfg, checkpoint)
    if out is None:
        what = split if cfg.trainer.mode == "epochs" else "windows"
        step = int(ckpt.read_state(path)["step"])
        out = str(Path(cfg.trainer.run_dir) / f"evaluate-{what}-step{step:08d}.json")
    job = {"checkpoint": str(path), "split": split, "out": out}
    if cfg.trainer.launcher == "local":
        _spawn_local(cfg, True, job)
    elif cfg.trainer.launcher == "torchrun":
        _torchrun_worker(cfg, True, job)
        if os.environ.get("RANK", "0") != "0":  # rank 0 wrote the result
            return {}
    else:
        raise ValueError(
            f"evaluate runs under the local or torchrun launcher, not {cfg.trainer.launcher!r}: "
            "pass --launcher local (any world size; checkpoints reshard on load)"
        )
    return json.loads(Path(out).read_text())


def train(cfg: Config, resume: bool = True) -> None:
    _prepare_run_dir(cfg)
    launcher = cfg.trainer.launcher
    if launcher == "local":
        _spawn_local(cfg, resume, None)
    elif launcher == "torchrun":
        _torchrun_worker(cfg, resume)
    elif launcher == "ray":
        _ray_launch(cfg, resume)
    else:  # pragma: no cover - config validation rejects it first
        raise ValueError(f"unknown launcher {launcher!r}")
