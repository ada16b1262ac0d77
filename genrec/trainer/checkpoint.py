"""Sharded checkpoints that resume mid-stream and reshard across world sizes.

A checkpoint is a directory `RUN/checkpoints/step-NNNNNNNN/` holding
- the `torch.distributed.checkpoint` (DCP) files of the model and optimizer state: sharded
  tables are written by their owners and can be read back by any world size (2 -> 1, 1 -> 2);
- `state.json`: step, stream position, world size, config, the trainer's counters;
- `tensors-shared.safetensors` (rank 0 only): the task's host state that every rank holds
  alike (the synced frequency sketch, the baseline's synced counts), written once;
- `tensors-rank-R.safetensors`: each rank's own host state (its frequency and count deltas
  since the last sync, the popularity sampler's ring) — no pickles anywhere. Resumed at the
  same world size, rank r reads the shared file and its own; at another world size every
  rank reads every old rank's file and the task reshards them exactly (tasks.py).

Writes are atomic: everything goes to `.tmp-step-N` beside the last good checkpoint and is
renamed into place only after every rank finished; the last `keep_last` are kept (and one
protected checkpoint: epochs mode's best on validation).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint.staging import AsyncStager

from genrec.trainer.distributed import barrier

PREFIX = "step-"
STATE_FILE = "state.json"
SHARED_FILE = "tensors-shared.safetensors"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"{PREFIX}{step:08d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _copy(value):
    """A host copy of a state dict (TorchRec's ShardedTensors: their local shards copied)."""
    if isinstance(value, ShardedTensor):
        shards = [Shard(_copy(sh.tensor), sh.metadata) for sh in value.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, value.metadata(), process_group=value._process_group
        )
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


class _CopyStager(AsyncStager):
    """Stage by copying into host memory, ShardedTensors included (DCP's default stager
    cannot copy those). Synchronous: the step stalls for the copy only."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return _copy(state_dict)

    def synchronize_staging(self) -> None:
        pass


class PendingCheckpoint:
    """A checkpoint whose DCP files are still being written (async_save's thread); `wait()`
    (collective) finishes it: state.json, the atomic rename, pruning. Until then the last
    finished checkpoint is the latest one."""

    def __init__(self, future, tmp: Path, final: Path, finish) -> None:
        self.future, self.tmp, self.path, self._finish = future, tmp, final, finish

    def wait(self) -> Path:
        if self.future is not None:
            self.future.result()
            self.future = None
            self._finish()
        return self.path


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    app_state: dict[str, Any],
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    shared: dict[str, torch.Tensor] | None = None,
    keep_last: int = 2,
    protect: Path | None = None,
    async_group: dist.ProcessGroup | None | bool = False,
) -> PendingCheckpoint:
    """Collective: every rank calls it. `app_state` holds model/optimizer state dicts,
    `tensors` this rank's host state, `shared` the host state equal on every rank (rank 0
    writes it). Of older checkpoints the last `keep_last` are kept, and `protect` (epochs
    mode's best).

    Synchronous by default (the returned checkpoint is finished). With `async_group` (a
    CPU group of its own, as DCP's writer thread runs collectives on it beside training's;
    True when not distributed) the model and optimizer state are staged into host memory
    (a copy), written by a background thread, and `wait()` finishes the checkpoint."""
    root = checkpoint_root(run_dir)
    final = checkpoint_path(run_dir, step)
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if _is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    rank = dist.get_rank() if dist.is_initialized() else 0
    save_file(_host(tensors), tmp / tensors_file(rank))
    if rank == 0:
        save_file(_host(shared or {}), tmp / SHARED_FILE)

    # serialized now: the trainer keeps changing `state`'s lists (history) while DCP writes
    state_json = json.dumps(state, indent=1, sort_keys=True)

    def finish() -> None:
        barrier()
        if _is_main():
            (tmp / STATE_FILE).write_text(state_json)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)  # atomic on one file system: readers see all or nothing
            for old in list_checkpoints(run_dir)[: -max(1, keep_last)]:
                if protect is None or old.name != Path(protect).name:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    if async_group is False:
        dcp.save(app_state, checkpoint_id=str(tmp))
        finish()
        return PendingCheckpoint(None, tmp, final, finish)
    group = None if async_group is True else async_group
    future = dcp.async_save(
        app_state, checkpoint_id=str(tmp), process_group=group, async_stager=_CopyStager()
    )
    return PendingCheckpoint(future, tmp, final, finish)


def read_state(path: str | Path) -> dict[str, Any]:
    p = Path(path) / STATE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{path} is not a genrec checkpoint (no {STATE_FILE})")
    return json.loads(p.read_text())


def tensors_file(rank: int) -> str:
    return f"tensors-rank-{rank}.safetensors"


def _host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # copies: safetensors refuses views that share a buffer (a sketch's counters and total)
    return {
        k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()
    }


def read_tensors(path: str | Path, rank: int) -> dict[str, torch.Tensor]:
    """The host state saved by `rank`."""
    p = Path(path) / tensors_file(rank)
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: the checkpoint is incomplete")
    return load_file(str(p))


def read_shared_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The host state every rank held alike (empty for checkpoints from before it existed)."""
    p = Path(path) / SHARED_FILE
    return load_file(str(p)) if p.is_file() else {}


def load_sharded(path: str | Path, app_state: dict[str, Any]) -> None:
    """Fill `app_state` in place from a checkpoint written at any world size."""
    dcp.load(app_state, checkpoint_id=str(path))
