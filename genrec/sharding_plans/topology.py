"""The cluster a plan is made for, from config (it need not be the machine we run on).

`sharding.topology` says world size, hosts, device type and memory per device; TorchRec's
`Topology` wants local_world_size = world_size // hosts and capacities in bytes. On CPU the
planner places tables in "DDR", so hbm_gb there means the memory per rank we may use.
"""

from __future__ import annotations

from torchrec.distributed.planner.types import Topology

from genrec.config import Config

GIB = 1 << 30


def local_world_size(world_size: int, hosts: int) -> int:
    if hosts < 1 or world_size < 1 or world_size % hosts:
        raise ValueError(
            f"sharding.topology: world_size={world_size} must be a positive multiple of "
            f"hosts={hosts} (ranks per host = world_size // hosts)"
        )
    return world_size // hosts


def topology_from_config(
    cfg: Config, world_size: int | None = None, device_type: str | None = None
) -> Topology:
    """TorchRec Topology for `cfg.sharding.topology`, with world size/device overridable."""
    topo = cfg.sharding.topology
    world = world_size or topo.world_size
    device = device_type or topo.device
    local = local_world_size(world, topo.hosts)
    if device == "cuda":
        return Topology(
            world_size=world,
            compute_device="cuda",
            hbm_cap=int(topo.hbm_gb * GIB),
            ddr_cap=int(topo.ddr_gb * GIB / local),
            local_world_size=local,
        )
    if device != "cpu":
        raise ValueError(f"sharding.topology.device must be cpu or cuda, got {device!r}")
    return Topology(
        world_size=world,
        compute_device="cpu",
        ddr_cap=int(topo.hbm_gb * GIB),
        local_world_size=local,
    )
