"""GPU check: real HSTU retrieval training steps on CUDA with NCCL, bf16 autocast and the
Triton HSTU attention kernel inside training. Prints ONE JSON line. Run it with
`bash benchmarks/gpu_check.sh` (under 8 minutes; `--dry-run`: the same code on CPU).

It needs only torch (2.11, CUDA), Triton and numpy: no torchrec, fbgemm-gpu or Ray (a bare
GPU machine; the CUDA fbgemm-gpu wheel is ~465 MB and cannot travel, and fbgemm-gpu-cpu has
no CUDA kernels). So it runs genrec's torchrec-free parts, the ones a GPU run trains with:

ran       genrec.models.tokens.TokenBuilder, genrec.models.hstu.HSTUEncoder (attention
          dispatched to genrec.models.attention_triton on CUDA: checked, a fallback to the
          reference fails the check), genrec.models.losses.sampled_softmax_loss (in-batch +
          uniform negatives, logQ), the item table as genrec's data-parallel path does it
          (genrec.embeddings.hashing's k seeded hashes into one replicated table, rows
          summed; dense gradients averaged by DDP over an NCCL process group, world size 1),
          AdamW, bf16 autocast, grad clipping
not run   TorchRec sharded tables / DMP / the train pipeline, genrec's trainer loop (its
          collectives still use CPU tensors, which NCCL rejects: issue 24, round 2), Ray

Batches are synthetic jagged sequences (lengths in [max_len/2, max_len], skewed item ids,
increasing timestamps), built on the device before timing. The JSON line holds the median
and mean step time, tokens/s (real tokens, no padding), peak CUDA memory, first and last
loss, and versions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import socket
import statistics
import sys
import time
import types

try:
    import yaml  # noqa: F401
except ImportError:  # genrec.config reads YAML files with it; this check builds its config
    sys.modules["yaml"] = types.ModuleType("yaml")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from genrec.config import ModelConfig  # noqa: E402
from genrec.embeddings.hashing import feature_seed, hash_ids  # noqa: E402
from genrec.models import attention  # noqa: E402
from genrec.models.hstu import HSTUEncoder  # noqa: E402
from genrec.models.losses import sampled_softmax_loss  # noqa: E402
from genrec.models.tokens import TokenBuilder  # noqa: E402

SIZES = {  # full: the T-ECD config's encoder (configs/tecd.yaml); dry: seconds on a CPU
    "full": dict(batch=128, max_len=200, dim=256, layers=8, heads=4, qk=64, v=64, rows=1 << 22,
                 negatives=8192, steps=40, warmup=5),
    "dry": dict(batch=4, max_len=16, dim=32, layers=1, heads=2, qk=16, v=16, rows=4096,
                negatives=32, steps=2, warmup=1),
}  # fmt: skip
NUM_HASHES = 2
NUM_ACTIONS = 8


class CheckModel(nn.Module):
    """Hashed item table (replicated) -> tokens -> HSTU -> sampled softmax, as genrec does."""

    def __init__(self, cfg: ModelConfig, rows: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.table = nn.Embedding(rows, cfg.dim)
        bound = math.sqrt(3.0 / NUM_HASHES) / math.sqrt(cfg.dim)  # genrec's init bound
        nn.init.uniform_(self.table.weight, -bound, bound)
        self.seeds = [feature_seed("item_id", j, 1) for j in range(NUM_HASHES)]
        self.tokens = TokenBuilder(cfg, cfg.dim, {})
        self.encoder = HSTUEncoder(cfg)

    def items(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.num_embeddings
        return sum(self.table(hash_ids(ids, s, rows)) for s in self.seeds)

    def forward(self, batch: dict, negatives: torch.Tensor) -> torch.Tensor:
        emb = self.items(torch.cat([batch["ids"], negatives]))
        n = batch["ids"].numel()
        tok = self.tokens(
            emb[:n], batch["actions"], batch["ts"], batch["lengths"], batch["num_targets"]
        )
        h = self.encoder(tok.x, tok.offsets, tok.max_len, tok.timestamps)
        # next-item retrieval: the state after each event but a sequence's last predicts the
        # next event's item
        last = torch.cumsum(batch["lengths"], 0) - 1
        keep = torch.ones(n, dtype=torch.bool, device=emb.device)
        keep[last] = False
        src = torch.nonzero(keep).flatten()
        states = F.normalize(h[tok.state_index[src]].float(), dim=-1)
        pos = F.normalize(emb[src + 1].float(), dim=-1)
        neg = F.normalize(emb[n:].float(), dim=-1)
        log_q = torch.full((negatives.numel(),), -math.log(batch["items"]), device=emb.device)
        return sampled_softmax_loss(
            states,
            pos,
            batch["ids"][src + 1],
            neg,
            negatives,
            log_q,
            temperature=0.05,
        )


def make_batch(size: dict, items: int, device: torch.device, g: torch.Generator) -> dict:
    b, max_len = size["batch"], size["max_len"]
    lengths = torch.randint(max(2, max_len // 2), max_len + 1, (b,), generator=g)
    n = int(lengths.sum())
    u = torch.rand(n, generator=g, dtype=torch.float64)
    ids = (items * u**3).long()  # skewed: popular items recur, as in logs
    gaps = torch.randint(1, 3600, (n,), generator=g)
    return {
        "ids": ids.to(device),
        "actions": torch.randint(0, NUM_ACTIONS, (n,), generator=g).to(device),
        "ts": torch.cumsum(gaps, 0).to(device),
        "lengths": lengths.to(device),
        "num_targets": torch.zeros(b, dtype=torch.int64, device=device),
        "items": items,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, gloo, fp32, tiny (for CI)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (0: the size's)")
    ap.add_argument("--items", type=int, default=1_000_000, help="catalog size of the ids")
    args = ap.parse_args(argv)
    size = dict(SIZES["dry" if args.dry_run else "full"])
    size["steps"] = args.steps or size["steps"]
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --dry-run on a CPU machine)")
    if cuda and attention._triton_op() is None:
        raise SystemExit("gpu_check: genrec.models.attention_triton does not import (Triton?)")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        return run(size, args.items, device, backend)
    finally:
        dist.destroy_process_group()


def run(size: dict, items: int, device: torch.device, backend: str) -> dict:
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=size["dim"],
        num_layers=size["layers"],
        num_heads=size["heads"],
        attn_dim=size["qk"],
        linear_dim=size["v"],
        max_len=size["max_len"],
        dropout=0.1,
        num_time_buckets=128,
        attn_norm="length",
    )
    model = CheckModel(cfg, size["rows"]).to(device)
    # find_unused_parameters: TokenBuilder keeps an empty context-type parameter (as in the
    # trainer, whose DMP-wrapped model sets it too)
    ddp = DistributedDataParallel(
        model, device_ids=[0] if cuda else None, find_unused_parameters=True
    )
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, fused=cuda)
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(size, items, device, g) for _ in range(4)]
    negs = [torch.randint(0, items, (size["negatives"],), generator=g).to(device) for _ in range(4)]
    used = []
    real_triton_lookup = attention._triton_op
    real_triton = real_triton_lookup()

    def traced_triton(*a, **kw):  # records that training really went through the kernel
        used.append("triton")
        return real_triton(*a, **kw)

    if cuda:
        attention._triton_op = lambda: traced_triton
    try:
        losses, times, tokens = train_steps(ddp, opt, size, batches, negs, cuda)
    finally:
        attention._triton_op = real_triton_lookup
    if cuda and not used:
        raise SystemExit("gpu_check: training did not run the Triton HSTU kernel")
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"gpu_check: a loss was not finite: {losses}")
    return summary(size, losses, times, tokens, device, backend, "triton" if used else "reference")


def train_steps(ddp, opt, size: dict, batches: list, negs: list, cuda: bool):
    """Warm-up then timed steps: (every loss, timed step seconds, tokens per timed step)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    losses, times, tokens = [], [], []
    for step in range(size["warmup"] + size["steps"]):
        batch, neg = batches[step % 4], negs[step % 4]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = ddp(batch, neg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if step == size["warmup"] - 1 and cuda:
            torch.cuda.reset_peak_memory_stats()
        if step >= size["warmup"]:
            times.append(dt)
            tokens.append(int(batch["ids"].numel()))
    return losses, times, tokens


def summary(size, losses, times, tokens, device, backend, attention_impl) -> dict:
    """The JSON line's figures."""
    cuda = device.type == "cuda"
    return {
        "check": "gpu_check",
        "dry_run": not cuda,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "backend": backend,
        "world_size": dist.get_world_size(),
        "autocast": "bf16" if cuda else "off (fp32)",
        "attention": attention_impl,
        "model": {k: size[k] for k in ("batch", "max_len", "dim", "layers", "heads", "rows")},
        "negatives": size["negatives"],
        "steps": len(times),
        "step_ms_median": round(1e3 * statistics.median(times), 2),
        "step_ms_mean": round(1e3 * statistics.fmean(times), 2),
        "tokens_per_step": round(statistics.fmean(tokens)),
        "tokens_per_s": round(sum(tokens) / sum(times)),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "torchrec_importable": _importable("torchrec"),
        "torch": torch.__version__,
        "triton": _version("triton"),
    }


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def _version(name: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(name)
    except Exception:
        return None


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(json.dumps(main()))
