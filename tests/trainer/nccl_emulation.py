"""NCCL's device restriction, emulated on a gloo process group (for CPU tests).

A CUDA run's default process group is NCCL, which has no CPU backend: a collective given a
CPU tensor fails with "No backend type associated with device type cpu". On CPU every
tensor is a CPU tensor, so the emulation tells the model's device collectives from the
trainer's host-side ones by who issued them:

  a collective on the default group with a CPU tensor, called directly from genrec or test
  code (not from torch/, torchrec/, fbgemm_gpu/), raises that error;
  the same from inside the libraries passes: TorchRec's all-to-alls, DDP and DCP run on
  device tensors on a GPU, and here stand in for them;
  any collective on another group (the trainer's gloo host group) passes.

`install()` patches torch.distributed's collectives in this process (a spawned rank).
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.distributed as dist

ERROR = "No backend type associated with device type cpu (NCCL emulation: default group)"
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
)
LIBRARIES = ("/torch/", "/torchrec/", "/fbgemm_gpu/")


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _issued_by_library() -> bool:
    """Whether the caller of the collective (two frames up: past `call`) is library code."""
    caller = sys._getframe(2).f_code.co_filename
    return any(lib in caller for lib in LIBRARIES)


def _nccl_like(fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        group = bound.arguments.get("group")
        on_default = group is None or group is dist.group.WORLD
        if on_default and not _issued_by_library():
            tensors = [t for v in bound.arguments.values() for t in _tensors(v)]
            if any(t.device.type == "cpu" for t in tensors):
                caller = sys._getframe(1).f_code.co_filename
                raise RuntimeError(f"{ERROR}: {fn.__name__} from {caller}")
        return fn(*args, **kwargs)

    return call


def install() -> None:
    for name in COLLECTIVES:
        setattr(dist, name, _nccl_like(getattr(dist, name)))
