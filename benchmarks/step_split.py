"""Per-rank step split for bench_train.py: input, lookup, dense, optimizer, eval, host syncs.

Installed in each spawned training worker (bench_train.py's top level runs there as
`__mp_main__` and calls `install()` when GENREC_BENCH_SPLIT_DIR is set). It wraps only what
exists in the trainer before and after issue 24, so the same measurement runs on both:

  input      StreamTrainer.read_batch (after) / StreamTrainer._next_batch (before): waiting
             for the stream's batch plus the ranks' (has batch, window) agreement all-reduce
  eval       StreamTrainer.evaluate: progressive evaluation (model top-k over the catalog,
             its sharded lookups included, and the popularity baseline)
  optimizer  the trainer's `optimizer.step()` and `zero_grad()` (TorchRec CombinedOptimizer:
             the dense Adam/Adagrad step). The sparse optimizer is fused into the embedding
             backward (fbgemm TBE) and is counted in `lookup`
  lookup     inside train_step: forward of every TorchRec sharded module (class name
             Sharded*: input dist, embedding lookup, output dist), plus the backward autograd
             nodes of the embedding kernels and the all-to-alls (profiler events
             `autograd::engine::evaluate_function: <node>` whose node matches LOOKUP_NODES)
  dense      train_step minus lookup and optimizer: encoder forward + backward, loss,
             negative sampling, frequency bookkeeping, DDP's gradient all-reduce
  other      the step minus all of the above (logging, window end, checkpoints)

A step is the interval between two successive `input` starts, after `warmup` steps. The
torch.profiler (CPU activity, no shapes or stacks) records the ranges above as
record_function labels `bench.*` plus every op; host syncs per step are the op events
`aten::_local_scalar_dense` (item(), float(), int(), bool() of a tensor: every device-to-host
scalar read) and Python-side calls of Tensor.cpu / tolist / numpy (each a device-to-host
copy when the tensor lives on a GPU; on this CPU box they copy nothing, so they are counted
by wrapping the methods, not seen as aten::_to_copy).

Limits: on CPU nothing overlaps, so the parts add up to the step; on a GPU these host-side
ranges would time kernel launches, not kernels. TorchRec's output dist is awaited lazily; on
gloo it completes inside the module's forward. The profiler adds per-op overhead equally to
before and after.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from pathlib import Path

ENV = "GENREC_BENCH_SPLIT_DIR"
WARMUP_ENV = "GENREC_BENCH_SPLIT_WARMUP"
LOOKUP_NODES = re.compile(r"(?i)lookup|embedding|all2all|alltoall|all_to_all|fbgemm|tbe|jagged")
PARTS = ("input", "eval", "lookup", "dense", "optimizer", "other")
STAGES = ("input", "eval", "train")  # the labelled ranges, for where the syncs happen


class _Recorder:
    def __init__(self, out_dir: Path, warmup: int) -> None:
        self.out_dir, self.warmup = out_dir, warmup
        self.prof = None
        self.inputs = 0
        self.input_starts: list[float] = []  # perf_counter, seconds
        self.copies_at_start: list[int] = []
        self.copies = 0  # Tensor.cpu / tolist / numpy calls
        self.sharded_depth = 0
        self.sharded_rf: list = []
        self.module_depth = 0  # any nn.Module: the outermost call is labelled bench.model
        self.module_rf: list = []

    def on_input(self) -> None:
        self.inputs += 1
        if self.inputs == self.warmup + 1 and self.prof is None:
            import torch.profiler as tp

            self.prof = tp.profile(activities=[tp.ProfilerActivity.CPU])
            self.prof.start()
        if self.prof is not None:
            self.input_starts.append(time.perf_counter())
            self.copies_at_start.append(self.copies)

    def finish(self, rank: int) -> None:
        if self.prof is None or len(self.input_starts) < 2:
            return
        self.prof.stop()
        events = self.prof.events()
        by_name: dict[str, list] = {}
        for e in events:
            by_name.setdefault(e.name, []).append(e)
        # profiler times are microseconds on its own clock: step windows from its input events
        starts = sorted(e.time_range.start for e in by_name.get("bench.input", []))
        steps = len(starts) - 1
        lo, hi = starts[0], starts[-1]

        def inside(e) -> bool:
            return lo <= e.time_range.start < hi

        def total(name: str) -> float:
            return sum(e.time_range.elapsed_us() for e in by_name.get(name, []) if inside(e))

        train = total("bench.train")
        trains = [e.time_range for e in by_name.get("bench.train", []) if inside(e)]

        def in_train(e) -> bool:
            return inside(e) and any(t.start <= e.time_range.start < t.end for t in trains)

        # eval's own lookups (top-k over the catalog) stay in eval
        lookup_fwd = sum(
            e.time_range.elapsed_us() for e in by_name.get("bench.lookup_fwd", []) if in_train(e)
        )
        optimizer = total("bench.optimizer")
        lookup_bwd = 0.0
        nodes: dict[str, float] = {}
        for e in events:
            if e.name.startswith("autograd::engine::evaluate_function: ") and in_train(e):
                node = e.name.split(": ", 1)[1]
                nodes[node] = nodes.get(node, 0.0) + e.time_range.elapsed_us()
                if LOOKUP_NODES.search(node):
                    lookup_bwd += e.time_range.elapsed_us()
        step_us = [b - a for a, b in zip(starts, starts[1:])]
        parts = {
            "input": total("bench.input"),
            "eval": total("bench.eval"),
            "lookup": lookup_fwd + lookup_bwd,
            "optimizer": optimizer,
        }
        parts["dense"] = train - parts["lookup"] - optimizer
        parts["other"] = (hi - lo) - sum(parts.values())
        reads = [e for e in by_name.get("aten::_local_scalar_dense", []) if inside(e)]
        stages = {s: [e.time_range for e in by_name.get(f"bench.{s}", [])] for s in STAGES}
        reads_by_stage = dict.fromkeys((*STAGES, "other"), 0)
        for e in reads:
            t = e.time_range.start
            stage = next((s for s in STAGES if any(r.start <= t < r.end for r in stages[s])), None)
            reads_by_stage[stage or "other"] += 1
        # inside a module's forward (the model: jagged ops, length grouping, TorchRec's
        # KJT splits) vs the trainer's own code around it
        models = [e.time_range for e in by_name.get("bench.model", []) if inside(e)]
        in_model = sum(
            1 for e in reads if any(r.start <= e.time_range.start < r.end for r in models)
        )
        out = {
            "rank": rank,
            "steps": steps,
            "median_step_ms": statistics.median(step_us) / 1e3,
            "mean_step_ms": (hi - lo) / steps / 1e3,
            "split_ms": {k: parts[k] / steps / 1e3 for k in PARTS},
            "lookup_fwd_ms": lookup_fwd / steps / 1e3,
            "lookup_bwd_ms": lookup_bwd / steps / 1e3,
            "scalar_reads_per_step": len(reads) / steps,
            "scalar_reads_by_stage": {k: v / steps for k, v in reads_by_stage.items()},
            "scalar_reads_in_model": in_model / steps,
            "host_copies_per_step": (self.copies_at_start[-1] - self.copies_at_start[0]) / steps,
            "backward_nodes_ms": {
                k: round(v / steps / 1e3, 3)
                for k, v in sorted(nodes.items(), key=lambda kv: -kv[1])[:6]
            },
        }
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(out))


def _labelled(fn, name: str, before=None):
    from torch.profiler import record_function

    def wrapper(*args, **kwargs):
        if before is not None:
            before()
        with record_function(name):
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


def install() -> None:
    """Wrap the trainer's stages in this worker process (no-op unless ENV is set)."""
    out = os.environ.get(ENV)
    if not out:
        return
    import torch
    import torch.distributed as dist
    from torch.profiler import record_function

    rec = _Recorder(Path(out), int(os.environ.get(WARMUP_ENV, "5")))
    try:  # after issue 24
        from genrec.trainer.stream_runner import StreamTrainer

        input_name = "read_batch"
    except ImportError:  # before: one module
        from genrec.trainer.loop import StreamTrainer

        input_name = "_next_batch"
    StreamTrainer_input = getattr(StreamTrainer, input_name)
    setattr(StreamTrainer, input_name, _labelled(StreamTrainer_input, "bench.input", rec.on_input))
    StreamTrainer.evaluate = _labelled(StreamTrainer.evaluate, "bench.eval")
    train_step = StreamTrainer.train_step

    def train_wrapper(self, *args, **kwargs):
        opt = self.optimizer
        if not getattr(opt, "_bench_wrapped", False):
            opt.step = _labelled(opt.step, "bench.optimizer")
            opt.zero_grad = _labelled(opt.zero_grad, "bench.optimizer")
            opt._bench_wrapped = True
        with record_function("bench.train"):
            return train_step(self, *args, **kwargs)

    StreamTrainer.train_step = train_wrapper
    run = StreamTrainer.run

    def run_wrapper(self, *args, **kwargs):
        history = run(self, *args, **kwargs)
        rec.finish(dist.get_rank() if dist.is_initialized() else 0)
        return history

    StreamTrainer.run = run_wrapper

    def pre(module, inputs):
        if rec.module_depth == 0:
            rf = record_function("bench.model")
            rf.__enter__()
            rec.module_rf.append(rf)
        rec.module_depth += 1
        if type(module).__name__.startswith("Sharded"):
            if rec.sharded_depth == 0:
                rf = record_function("bench.lookup_fwd")
                rf.__enter__()
                rec.sharded_rf.append(rf)
            rec.sharded_depth += 1

    def post(module, inputs, output):
        if type(module).__name__.startswith("Sharded"):
            rec.sharded_depth -= 1
            if rec.sharded_depth == 0:
                rec.sharded_rf.pop().__exit__(None, None, None)
        rec.module_depth -= 1
        if rec.module_depth == 0:
            rec.module_rf.pop().__exit__(None, None, None)

    torch.nn.modules.module.register_module_forward_pre_hook(pre)
    torch.nn.modules.module.register_module_forward_hook(post)

    for method in ("cpu", "tolist", "numpy"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, **kwargs):
            rec.copies += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, method, counted)


def merge(out_dir: Path, world: int) -> dict:
    """The ranks' files into one record: step time and split are rank 0's and the max over
    ranks (the slowest rank sets the pace); syncs per step are rank 0's."""
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    r0 = ranks[0]
    return {
        "median_step_ms": round(r0["median_step_ms"], 1),
        "split_ms": {k: round(v, 1) for k, v in r0["split_ms"].items()},
        "lookup_fwd_bwd_ms": [round(r0["lookup_fwd_ms"], 1), round(r0["lookup_bwd_ms"], 1)],
        "max_rank_median_step_ms": round(max(r["median_step_ms"] for r in ranks), 1),
        "scalar_reads_per_step": round(r0["scalar_reads_per_step"], 2),
        "scalar_reads_by_stage": {k: round(v, 2) for k, v in r0["scalar_reads_by_stage"].items()},
        "scalar_reads_in_model_forward": round(r0.get("scalar_reads_in_model", -1), 2),
        "host_copies_per_step": round(r0["host_copies_per_step"], 2),
        "profiled_steps": r0["steps"],
        "backward_nodes_ms": r0["backward_nodes_ms"],
    }
