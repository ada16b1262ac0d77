"""Run a function on N real gloo ranks (torch.multiprocessing spawn on 127.0.0.1).

    results = run_on_ranks(check_fn, world_size=2, args=(config_dict,))

`fn(rank, world_size, *args)` must be a module-level (picklable) function; it runs with
the default process group initialised. Its return values (picklable) come back as a list
indexed by rank. An exception on any rank fails the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    args: tuple,
    out_dir: str,
    threads: int,
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    # results go through files: a pipe could block a rank on a large payload
    try:
        out = fn(rank, world_size, *args)
        Path(out_dir, f"{rank}.ok").write_bytes(pickle.dumps(out))
    except BaseException:
        Path(out_dir, f"{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any], world_size: int = 2, args: tuple = (), threads: int = 1
) -> list[Any]:
    """Spawn `world_size` gloo ranks running `fn`; return per-rank results or raise."""
    with tempfile.TemporaryDirectory(prefix="genrec-ranks-") as out_dir:
        try:
            mp.spawn(
                _worker,
                args=(fn, world_size, free_port(), args, out_dir, threads),
                nprocs=world_size,
                join=True,
            )
        except Exception as e:
            errors = [
                f"--- rank {p.stem} ---\n{p.read_text()}"
                for p in sorted(Path(out_dir).glob("*.error"))
            ]
            raise AssertionError(
                f"distributed run of {fn.__name__} failed:\n" + "\n".join(errors)
            ) from e
        return [pickle.loads(Path(out_dir, f"{r}.ok").read_bytes()) for r in range(world_size)]
