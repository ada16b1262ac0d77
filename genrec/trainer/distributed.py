"""Process groups and devices: gloo on CPU, NCCL on CUDA; the same code for every launcher.

This module owns which group every trainer collective uses:

  the default ("device") group   gloo on CPU, NCCL on CUDA. Only the model's own collectives
                                 travel on it (TorchRec's embedding all-to-alls, DDP's
                                 gradient all-reduce), on device tensors. NCCL has no CPU
                                 backend: a CPU tensor sent over it fails ("No backend type
                                 associated with device type cpu").
  the host group (`host_group`)  a gloo group over the same ranks, created once beside the
                                 default group: every host-side collective of the trainer
                                 (the stream agreement flag, the replica check, metric sums and
                                 gathers, baseline counts, the frequency sketch, checkpoint
                                 barriers) goes through the helpers below, on CPU tensors.

`group_for(t)` is the rule for collectives on tensors that may live on either (sharded
evaluation's states and top-k: the default group on CUDA, the host group on CPU).
Nothing else in genrec calls torch.distributed collectives; tests/trainer/nccl_emulation.py
makes any CPU tensor on the default group fail, as NCCL does, and trains under it.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pick_backend(requested: str, device_type: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device_type == "cuda" and torch.cuda.is_available() else "gloo"


def pick_device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "sharding.topology.device=cuda but no CUDA device is visible; "
                "set sharding.topology.device=cpu to train on CPU"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(
    rank: int,
    world_size: int,
    device_type: str,
    backend: str = "auto",
    local_rank: int | None = None,
    local_world_size: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    timeout_s: int = 600,
) -> DistContext:
    """Join (or create) the default process group; env vars win where a launcher set them."""
    local_rank = rank if local_rank is None else local_rank
    local_world_size = world_size if local_world_size is None else local_world_size
    os.environ.setdefault("MASTER_ADDR", master_addr or "127.0.0.1")
    if master_port is not None:
        os.environ["MASTER_PORT"] = str(master_port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo") if os.environ["MASTER_ADDR"] in (
        "127.0.0.1",
        "localhost",
    ) else None
    backend = pick_backend(backend, device_type)
    device = pick_device(device_type, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    host_group()  # created once, by every rank at the same point
    checkpoint_group()
    return DistContext(rank, world_size, local_rank, local_world_size, device, backend)


def context_from_initialized(device_type: str) -> DistContext:
    """For launchers that already created the process group (Ray Train, torchrun)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    host_group()
    checkpoint_group()
    return DistContext(
        rank,
        world,
        local_rank,
        local_world,
        pick_device(device_type, local_rank),
        dist.get_backend(),
    )


# side gloo groups by role: (the default group they belong to, the group)
_SIDE: dict[str, tuple[object, dist.ProcessGroup]] = {}


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _side_group(role: str) -> dist.ProcessGroup | None:
    """A gloo group over every rank for `role`, created once per default group (collective:
    every rank creates it at the same point, `init_distributed` / `context_from_initialized`);
    None without a process group. (World size 1 gets one too: async checkpoints on a 1-GPU
    NCCL run need a CPU group.)"""
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if role not in _SIDE or _SIDE[role][0] is not world:
        _SIDE[role] = (world, dist.new_group(backend="gloo"))
    return _SIDE[role][1]


def host_group() -> dist.ProcessGroup | None:
    """The gloo group for host (CPU) tensors. A gloo default group gets its own side group
    all the same: one code path, whatever the device."""
    return _side_group("host")


def checkpoint_group() -> dist.ProcessGroup | None:
    """A second gloo group, only for async checkpoints: DCP's writer thread runs its
    collectives there while training's host collectives run on `host_group` (one group
    used from two threads would interleave their collectives differently per rank)."""
    return _side_group("checkpoint")


def _host_tensor(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(
            f"{what} takes host (CPU) tensors, got one on {t.device}: device tensors travel "
            "on the default group inside the model; copy trainer state to the host first"
        )
    return t


def all_reduce_(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce a host tensor in place across ranks, on the host group."""
    if _distributed():
        dist.all_reduce(_host_tensor(t, "all_reduce_"), op=op, group=host_group())
    return t


def barrier() -> None:
    """Wait for every rank (on the host group: no device work queued behind it)."""
    if _distributed():
        dist.barrier(group=host_group())


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if not _distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def group_for(t: torch.Tensor) -> dist.ProcessGroup | None:
    """The group a tensor travels on: device tensors the default group, host ones the host
    group (on CPU the trainer's own collectives never touch the default group)."""
    return host_group() if t.device.type == "cpu" else None


def all_gather_same(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t` (the same shape on every rank), in rank order, on `group_for(t)`."""
    if not _distributed():
        return [t]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous(), group=group_for(t))
    return parts


def all_gather_rows(t: torch.Tensor, with_sizes: bool = False):
    """Every rank's [n_r, ...] rows concatenated in rank order (n_r may differ by rank), on
    `group_for(t)`; with_sizes: also the list of n_r (read back to the host)."""
    if not _distributed():
        return (t, [t.shape[0]]) if with_sizes else t
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [int(s) for s in all_gather_same(n)]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = all_gather_same(padded)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    return (out, sizes) if with_sizes else out
