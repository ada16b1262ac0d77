"""Launchers: the same worker function under local processes, torchrun, or Ray Train.

local     N processes on this machine (torch.multiprocessing spawn; gloo on CPU, NCCL on GPU)
torchrun  already inside an external torchrun (RANK/WORLD_SIZE/MASTER_ADDR set; multi-node)
ray       Ray Train TorchTrainer (ScalingConfig(num_workers, use_gpu)); each worker reserves
          `trainer.ray_workers_cpus` CPUs so Ray Data tasks never starve; worker failures
          restart from the last checkpoint in run_dir (FailureConfig(max_failures))
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genrec.config import Config, dump_config, from_dict, to_dict
from genrec.trainer.distributed import context_from_initialized, free_port, init_distributed


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


def _local_worker(rank: int, cfg_dict: dict, world_size: int, port: int, resume: bool) -> None:
    from genrec.trainer.loop import run_worker

    quiet_library_warnings()
    # one process per core at most: OpenMP threads of co-located ranks otherwise spin-wait
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))

    cfg = from_dict(cfg_dict)
    ctx = init_distributed(
        rank, world_size, cfg.sharding.topology.device, cfg.trainer.backend, master_port=port
    )
    try:
        run_worker(cfg, ctx, resume=resume)
    finally:
        dist.destroy_process_group()


def _torchrun_worker(cfg: Config, resume: bool) -> None:
    from genrec.trainer.loop import run_worker

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
        run_worker(cfg, ctx, resume=resume)
    finally:
        dist.destroy_process_group()


def _ray_train_loop(config: dict) -> None:
    """Runs inside each Ray Train worker; Ray Train created the process group."""
    from genrec.trainer.loop import run_worker

    cfg = from_dict(config["cfg"])
    ctx = context_from_initialized(cfg.sharding.topology.device)
    run_worker(cfg, ctx, resume=True)  # after a failure, continue from the last checkpoint


def _ray_launch(cfg: Config, resume: bool) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from genrec.ray_runtime import ray_session

    if not resume:
        raise ValueError(
            "--launcher ray always resumes from run_dir after failures; clear run_dir instead of --no-resume"
        )
    run_dir = Path(cfg.trainer.run_dir).resolve()
    cfg.trainer.run_dir = str(run_dir)
    cfg.data.prepared_dir = str(Path(cfg.data.prepared_dir).resolve())
    use_gpu = cfg.sharding.topology.device == "cuda"
    backend = "nccl" if use_gpu else "gloo"
    with ray_session(
        num_cpus=cfg.data.num_cpus or max(4, (os.cpu_count() or 1) * 2),
        object_store_mb=cfg.data.object_store_mb,
        address=cfg.data.ray_address,
    ):
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
                storage_path=str(run_dir / "ray"),
                failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error


def train(cfg: Config, resume: bool = True) -> None:
    _prepare_run_dir(cfg)
    launcher = cfg.trainer.launcher
    if launcher == "local":
        ws = cfg.trainer.world_size
        mp.start_processes(
            _local_worker,
            args=(to_dict(cfg), ws, free_port(), resume),
            nprocs=ws,
            join=True,
            start_method="spawn",
        )
    elif launcher == "torchrun":
        _torchrun_worker(cfg, resume)
    elif launcher == "ray":
        _ray_launch(cfg, resume)
    else:  # pragma: no cover - config validation rejects it first
        raise ValueError(f"unknown launcher {launcher!r}")
