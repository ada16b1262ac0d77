"""Jagged HSTU attention on a GPU: Triton kernel vs the PyTorch reference vs padded SDPA.

    python benchmarks/bench_attention_gpu.py [--lengths 256,512,1024,2048,4096] [--dtype bf16]
    python benchmarks/bench_attention_gpu.py --goal      # the issue-22 run: L=1024,4096, bf16
    python benchmarks/bench_attention_gpu.py --dry-run   # CPU: Triton interpreter, tiny sizes

For each max length L: a batch of ~--batch-tokens tokens in sequences of random length in
[L/2, L] (one of exactly L), with position and time biases as HSTU uses them. First the
kernel's output and all five gradients are checked against the reference, run in float64 on
the CPU on the same values (on CUDA, torch's float64 log2 returns 2.9999999999999996 for
log2(8): the reference's time_bucket puts gaps 7, 63, 4095, 8191, ... one bucket low there;
on the CPU it is exact, as is the kernel's integer bucket); then forward and
forward+backward are timed with CUDA events for
  triton       genrec.models.attention_triton.triton_hstu_attention (jagged)
  reference    genrec.models.attention.hstu_attention(backend="reference") (jagged)
  grouped      genrec.models.attention.hstu_attention(backend="grouped") (jagged, bmm per
               length group with a hand-written backward: the CPU fast path)
  sdpa_padded  torch.nn.functional.scaled_dot_product_attention(is_causal=True) on the
               batch padded to [B, H, L, D] (softmax attention: the usual fast baseline)
tokens/s counts real (unpadded) tokens; TFLOP/s counts the useful causal FLOPs of the jagged
batch for all three (2 matmuls forward, 5 backward), so the numbers compare directly.
Errors are max|kernel - ref| / max|ref| (rel_err_vs_reference, the pass/fail test) and
||kernel - ref|| / ||ref|| (rel_l2_err_vs_reference). Prints one JSON line on stdout and a
summary table on stderr; without a CUDA device it prints why and no numbers.
Per phase, triton_over_sdpa is the kernel's time over padded SDPA's (goal: <= 2 forward +
backward at L = 1024 and 4096 in bf16: `--goal`, one run of a few minutes on one GPU).

--dry-run runs every step of the script on the CPU (TRITON_INTERPRET=1, lengths 32 and 64,
float32, a few hundred tokens, wall-clock timing): a check that the script runs end to end
before a short GPU window, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

DEVICE = "cuda"  # "cpu" under --dry-run


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_batch(L: int, batch_tokens: int, heads: int, dqk: int, dv: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    B = max(1, batch_tokens // (3 * L // 4))
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    lengths[0] = L
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    T = int(offsets[-1])
    dev = DEVICE
    q = (0.2 * torch.randn(T, heads, dqk, generator=g)).to(dev, dtype)
    k = (0.2 * torch.randn(T, heads, dqk, generator=g)).to(dev, dtype)
    v = torch.randn(T, heads, dv, generator=g).to(dev, dtype)
    gaps = torch.randint(0, 3600, (T,), generator=g)
    timestamps = (1_700_000_000 + gaps.cumsum(0)).to(dev)
    return {
        "q": q,
        "k": k,
        "v": v,
        "offsets": offsets.to(dev),
        "lengths": lengths.tolist(),
        "timestamps": timestamps,
        "pos_bias": (0.1 * torch.randn(L, generator=g)).to(dev),
        "time_bias": (0.1 * torch.randn(64, generator=g)).to(dev),
    }


def leaves(batch: dict, dtype=None) -> dict:
    out = {}
    for n in ("q", "k", "v", "pos_bias", "time_bias"):
        t = batch[n].detach()
        out[n] = (t.to(dtype) if dtype is not None else t.clone()).requires_grad_()
    return out


def run_jagged(op, batch: dict, x: dict, L: int, backward: bool, grad_out=None):
    out = op(
        x["q"],
        x["k"],
        x["v"],
        batch["offsets"],
        L,
        timestamps=batch["timestamps"],
        pos_bias=x["pos_bias"],
        time_bias=x["time_bias"],
        norm="length",
    )
    if backward:
        out.backward(grad_out if grad_out is not None else torch.ones_like(out))
    return out


def correctness(batch: dict, L: int, triton_op, reference_op) -> tuple[dict, dict]:
    """(max-abs, l2) errors relative to the reference (float64, CPU), output and gradients."""
    xt = leaves(batch)
    grad_out = torch.randn_like(batch["v"])
    out_t = run_jagged(triton_op, batch, xt, L, True, grad_out)
    got = {"out": out_t.detach().cpu()}
    got.update({f"d_{n}": xt[n].grad.cpu() for n in xt})
    cpu = {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in batch.items()}
    xr = leaves(cpu, torch.float64)
    out_r = run_jagged(reference_op, cpu, xr, L, True, grad_out.cpu().double())
    want = {"out": out_r.detach()}
    want.update({f"d_{n}": xr[n].grad for n in xr})

    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12))

    def rel_l2(a, b):
        return float((a.double() - b).norm() / b.norm().clamp_min(1e-12))

    return (
        {n: rel(got[n], want[n]) for n in got},
        {n: rel_l2(got[n], want[n]) for n in got},
    )


def pad(batch: dict, name: str, L: int) -> torch.Tensor:
    """[T, H, D] jagged -> [B, H, L, D] padded (for SDPA)."""
    x = batch[name]
    B = len(batch["lengths"])
    out = x.new_zeros(B, L, *x.shape[1:])
    pos = torch.cat([torch.arange(n, device=x.device) for n in batch["lengths"]])
    seq = torch.repeat_interleave(
        torch.arange(B, device=x.device), torch.tensor(batch["lengths"], device=x.device)
    )
    out[seq, pos] = x
    return out.transpose(1, 2).contiguous()


def time_ms(fn, warmup: int, iters: int, budget_ms: float = 2000.0) -> float:
    """Median of CUDA-event timings. One untimed call first (compilation, allocator); slow
    variants (the reference's backward at long lengths) get fewer warm-ups and samples, at
    least 3, so that the timed calls take about budget_ms."""

    def timed() -> float:
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    fn()
    sync()
    first = timed()
    times = [first]  # a slow variant keeps its first timed call as a sample
    if first * warmup < budget_ms:
        for _ in range(warmup):
            fn()
        sync()
        times = []
    n = max(3, min(iters, int(budget_ms / max(first, 1e-3))))
    while len(times) < n:
        times.append(timed())
    return sorted(times)[len(times) // 2]


def bench_length(L: int, args, dtype, triton_op, reference_op, grouped_op) -> dict:
    import torch.nn.functional as F

    batch = make_batch(L, args.batch_tokens, args.heads, args.dqk, args.dv, dtype, args.seed)
    T = batch["q"].shape[0]
    pairs = sum(n * (n + 1) // 2 for n in batch["lengths"])
    fwd_flops = 2.0 * pairs * args.heads * (args.dqk + args.dv)
    log(f"L={L}: {len(batch['lengths'])} sequences, {T} tokens; checking against reference")
    errs, errs_l2 = correctness(batch, L, triton_op, reference_op)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    result = {
        "max_seq_len": L,
        "sequences": len(batch["lengths"]),
        "tokens": T,
        "rel_err_vs_reference": errs,
        "rel_l2_err_vs_reference": errs_l2,
        "correct": all(e <= tol for e in errs.values()),
        "tolerance": tol,
    }
    qp, kp, vp = (pad(batch, n, L) for n in ("q", "k", "v"))
    for phase, backward in (("fwd", False), ("fwd_bwd", True)):
        flops = fwd_flops * (3.5 if backward else 1.0)
        timings = {}
        impls = (("triton", triton_op), ("grouped", grouped_op), ("reference", reference_op))
        for impl, op in impls:
            x = (
                leaves(batch)
                if backward
                else {n: batch[n] for n in ("q", "k", "v", "pos_bias", "time_bias")}
            )

            def step(op=op, x=x, backward=backward):
                with torch.set_grad_enabled(backward):
                    run_jagged(op, batch, x, L, backward)

            log(f"  {phase} {impl}")
            timings[impl] = time_ms(step, args.warmup, args.iters)
        pq, pk, pv = (t.detach().requires_grad_(backward) for t in (qp, kp, vp))

        def sdpa(pq=pq, pk=pk, pv=pv, backward=backward):
            with torch.set_grad_enabled(backward):
                out = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True)
                if backward:
                    out.backward(torch.ones_like(out))

        log(f"  {phase} sdpa_padded")
        timings["sdpa_padded"] = time_ms(sdpa, args.warmup, args.iters)
        result[phase] = {
            impl: {
                "ms": round(ms, 4),
                "tokens_per_s": round(T / (ms / 1e3)),
                "tflops": round(flops / (ms / 1e3) / 1e12, 2),
            }
            for impl, ms in timings.items()
        }
        result[phase]["triton_speedup_vs_reference"] = round(
            timings["reference"] / timings["triton"], 2
        )
        result[phase]["triton_over_sdpa"] = round(timings["triton"] / timings["sdpa_padded"], 2)
    return result


def triton_version() -> str:
    import triton

    return triton.__version__


def summary_table(results: list[dict]) -> str:
    """Markdown table of the timings (and one line of errors per length) for stderr."""
    lines = [
        "| L | impl | fwd ms | fwd tok/s | fwd TFLOP/s | fwd+bwd ms | fwd+bwd tok/s "
        "| fwd+bwd TFLOP/s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for impl in ("triton", "grouped", "reference", "sdpa_padded"):
            f, fb = r["fwd"][impl], r["fwd_bwd"][impl]
            lines.append(
                f"| {r['max_seq_len']} | {impl} | {f['ms']:.3f} | {f['tokens_per_s']:.3e} "
                f"| {f['tflops']:.1f} | {fb['ms']:.3f} | {fb['tokens_per_s']:.3e} "
                f"| {fb['tflops']:.1f} |"
            )
    lines.append("")
    for r in results:
        errs = ", ".join(
            f"{n} {e:.1e}/{r['rel_l2_err_vs_reference'][n]:.1e}"
            for n, e in r["rel_err_vs_reference"].items()
        )
        ok = "ok" if r["correct"] else "FAIL"
        lines.append(f"L={r['max_seq_len']} {ok} (max-rel/l2-rel, tol {r['tolerance']}): {errs}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="256,512,1024,2048,4096")
    p.add_argument("--batch-tokens", type=int, default=32768, help="tokens per batch (about)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dqk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goal", action="store_true", help="L=1024,4096 bf16 (issue 22's run)")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny")
    args = p.parse_args()
    global DEVICE
    if args.goal:
        args.lengths, args.dtype = "1024,4096", "bf16"
    if args.dry_run:  # before triton is imported: the interpreter runs the kernel on the CPU
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE = "cpu"
        args.lengths, args.batch_tokens, args.dtype = "32,64", 192, "fp32"
        args.heads, args.dqk, args.dv, args.warmup, args.iters = 2, 16, 16, 0, 1
    elif not torch.cuda.is_available():
        msg = "no CUDA device visible: this benchmark measures the GPU kernels only"
        log(f"bench_attention_gpu: {msg}")
        print(json.dumps({"benchmark": "attention_gpu", "status": "no_cuda", "message": msg}))
        return 0
    from genrec.models.attention import hstu_attention
    from genrec.models.attention_triton import triton_hstu_attention

    def reference_op(*a, **kw):
        return hstu_attention(*a, backend="reference", **kw)

    def grouped_op(*a, **kw):
        return hstu_attention(*a, backend="grouped", **kw)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    results = [
        bench_length(int(L), args, dtype, triton_hstu_attention, reference_op, grouped_op)
        for L in args.lengths.split(",")
    ]
    log(summary_table(results))
    print(
        json.dumps(
            {
                "benchmark": "attention_gpu",
                "status": "ok" if all(r["correct"] for r in results) else "incorrect",
                "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
                "torch": torch.__version__,
                "triton": triton_version(),
                "float32_matmul_precision": torch.get_float32_matmul_precision(),
                "dtype": args.dtype,
                "heads": args.heads,
                "dqk": args.dqk,
                "dv": args.dv,
                "batch_tokens": args.batch_tokens,
                "results": results,
            }
        )
    )
    return 0 if all(r["correct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
