"""HSTU encoder forward+backward: the jagged path vs the same math padded to max length.

Sequence lengths are geometric (mean --mean-len, clipped to [1, --max-len]) as in real
interaction logs. Both variants use the same weights; tokens/s counts real (unpadded)
tokens for both. Peak memory is the highest running total of CPU allocations recorded by
the torch profiler during one forward+backward (with --device cuda: the CUDA allocator's
peak during one step, above what was allocated before it; the jagged path then runs the
Triton kernel, the padded one plain PyTorch). Prints one JSON line.

    .venv/bin/python benchmarks/bench_hstu.py --batch 32 --iters 3
    .venv/bin/python benchmarks/bench_hstu.py --ml1m-cell ragged   # the peer comparison's cell
    python benchmarks/bench_hstu.py --device cuda --batch 256 --max-len 1024 --iters 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from genrec.config import ModelConfig
from genrec.models.hstu import HSTUEncoder


def geometric_lengths(n: int, mean: float, max_len: int, g: torch.Generator) -> torch.Tensor:
    p = 1.0 / mean
    u = torch.rand(n, generator=g, dtype=torch.float64)
    lengths = torch.ceil(torch.log1p(-u) / torch.log1p(torch.tensor(-p, dtype=torch.float64)))
    return lengths.clamp(1, max_len).to(torch.int64)


def make_inputs(args: argparse.Namespace, g: torch.Generator) -> dict:
    lengths = geometric_lengths(args.batch, args.mean_len, args.max_len, g)
    lengths[0] = args.max_len  # the batch's longest sequence sets the padded width
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    T = int(offsets[-1])
    x = torch.randn(T, args.dim, generator=g)
    ts = torch.cumsum(torch.randint(1, 3600, (T,), generator=g), 0)
    L = args.max_len
    ar = torch.arange(L)
    valid = ar[None] < lengths[:, None]
    rows = (offsets[:-1, None] + ar[None]).clamp_max(T - 1)
    return dict(lengths=lengths, offsets=offsets, x=x, ts=ts, valid=valid, rows=rows, T=T)


def step_jagged(enc: HSTUEncoder, d: dict, w: torch.Tensor, max_len: int) -> None:
    x = d["x"].clone().requires_grad_(True)
    out = enc(x, d["offsets"], max_len, d["ts"])
    (out * w).sum().backward()


def step_padded(enc: HSTUEncoder, d: dict, w: torch.Tensor, max_len: int) -> None:
    valid = d["valid"]
    x = (d["x"][d["rows"]] * valid[..., None]).requires_grad_(True)
    ts = d["ts"][d["rows"]]
    out = enc.forward_padded(x, d["lengths"], ts)
    (out[valid] * w).sum().backward()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokens_per_s(fn, enc, d, w, args) -> float:
    for _ in range(args.warmup):
        fn(enc, d, w, args.max_len)
    sync(w.device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        fn(enc, d, w, args.max_len)
    sync(w.device)
    return d["T"] * args.iters / (time.perf_counter() - t0)


def cuda_peak_bytes(fn, enc, d, w, args) -> int:
    """Peak CUDA allocator bytes during one step, above those allocated before it."""
    sync(w.device)
    base = torch.cuda.memory_allocated(w.device)
    torch.cuda.reset_peak_memory_stats(w.device)
    fn(enc, d, w, args.max_len)
    sync(w.device)
    return int(torch.cuda.max_memory_allocated(w.device) - base)


def peak_bytes(fn, enc, d, w, args) -> int:
    """Peak of the running total of CPU bytes allocated during one step (torch profiler).

    Each op's self allocation counts at its start when positive and at its end when
    negative (a free inside the op); frees outside ops come as "[memory]" events.
    """
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn(enc, d, w, args.max_len)
    deltas = []
    for e in prof.events():
        b = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if b:
            deltas.append((e.time_range.start if b > 0 else e.time_range.end, b))
    deltas.sort()
    running = peak = 0
    for _, b in deltas:
        running += b
        peak = max(peak, running)
    return int(peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="sequences per batch")
    ap.add_argument("--mean-len", type=float, default=60.0)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--attn-dim", type=int, default=32)
    ap.add_argument("--linear-dim", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: Triton attention)")
    ap.add_argument(
        "--ml1m-cell",
        choices=["ragged", "full"],
        help="run only the ML-1M cell of the peer comparison (bench_hstu_ml1m.py)",
    )
    args = ap.parse_args()
    if args.ml1m_cell:
        from bench_hstu_ml1m import run_ml1m_cell

        print(json.dumps(run_ml1m_cell(args.ml1m_cell)))
        return
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        attn_dim=args.attn_dim,
        linear_dim=args.linear_dim,
        dropout=0.0,
        max_len=args.max_len,
    )
    enc = HSTUEncoder(cfg).to(device)
    d = make_inputs(args, torch.Generator().manual_seed(args.seed))
    d = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in d.items()}
    w = torch.randn(d["T"], args.dim).to(device)
    print(
        f"batch {args.batch}: {d['T']} tokens, padded {args.batch * args.max_len}", file=sys.stderr
    )
    result = {"bench": f"hstu_fwd_bwd_{device.type}", "batch": args.batch, "tokens": d["T"]}
    if device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(device)
    result["mean_len"] = round(d["T"] / args.batch, 1)
    result["max_len"] = args.max_len
    result["threads"] = torch.get_num_threads()
    for name, fn in (("jagged", step_jagged), ("padded", step_padded)):
        print(f"timing {name} ...", file=sys.stderr)
        result[f"{name}_tokens_per_s"] = round(tokens_per_s(fn, enc, d, w, args), 1)
        print(f"profiling {name} memory ...", file=sys.stderr)
        peak = cuda_peak_bytes if device.type == "cuda" else peak_bytes
        result[f"{name}_peak_mb"] = round(peak(fn, enc, d, w, args) / 2**20, 1)
    result["speedup"] = round(result["jagged_tokens_per_s"] / result["padded_tokens_per_s"], 2)
    result["memory_ratio"] = round(
        result["padded_peak_mb"] / max(result["jagged_peak_mb"], 1e-9), 1
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
