"""Triton fast path of the jagged HSTU attention op (same contract as attention.py).

    out = triton_hstu_attention(q, k, v, offsets, max_seq_len, timestamps=..., pos_bias=...,
                                time_bias=..., num_targets=..., norm="length")

One program per (query block, sequence, head) in the forward pass; it walks only the key
blocks that hold an allowed (i, j): causal blocks up to the diagonal, and in target-aware
mode the history blocks plus the diagonal block (candidates see history and themselves).
Nothing is padded to max_seq_len and no [n, n] score matrix ever reaches memory.

The relative attention bias is built inside the kernel from the two tables: position
pos_bias[min(p_i - p_j, P-1)] and time time_bias[bucket(ts_i - ts_j)], where the bucket
floor(2 * log2(1 + |dt|)) is computed in exact integer arithmetic (floor(log2((1+|dt|)^2))),
so bucket edges never depend on float rounding. Gaps of 2^32 s (136 years) or more land in
bucket min(63, NB-1).

Backward: one program per (block, sequence, head) computes dK, dV of key block `block`
(walking the query blocks that see it) and dQ of query block `block` (walking the key blocks
it sees); SiLU attention needs no softmax statistics, so nothing but the inputs is saved.
Bias-table gradients are summed with atomic adds into float32 buffers (tables are shared
across heads; only launched when the table requires grad), reduced inside each tile first:
per time bucket, and per diagonal of the tile for positions (see _pos_grad_add).

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1 before triton is
imported); this is how the tests check them against the PyTorch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _time_bucket(dt, NB):
    """floor(2 * log2(1 + |dt|)) = floor(log2(x^2)), x = 1 + |dt|, in integer arithmetic."""
    x = tl.minimum(tl.abs(dt) + 1, 4294967295)  # 2^32 - 1: x * x fits in uint64
    bits = x.to(tl.float64).to(tl.int64, bitcast=True)  # x < 2^53: exact in float64
    e = ((bits >> 52) & 0x7FF) - 1023  # floor(log2 x)
    xu = x.to(tl.uint64)
    half = ((xu * xu) >> (2 * e).to(tl.uint64)) >= 2  # x^2 >= 2^(2e+1)?
    return tl.minimum(2 * e + half.to(tl.int64), NB - 1)


@triton.jit
def _tile_bias(
    qi,
    kj,
    n,
    h,
    start,
    TS,
    PB,
    TB,
    P,
    NB,
    HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr,
    TARGET_AWARE: tl.constexpr,
):
    """Allowed mask, rab bias and table indices of a tile; qi/kj broadcast to its shape."""
    allowed = (kj <= qi) & (qi < n) & (kj < n)
    if TARGET_AWARE:
        allowed = allowed & ((kj < h) | (kj == qi))
    zero = (qi + kj) * 0
    bias = zero.to(tl.float32)
    pos_idx = zero
    time_idx = zero.to(tl.int64)
    if HAS_POS:
        r = tl.minimum(qi, h) - tl.minimum(kj, h)  # candidates share position h
        pos_idx = tl.minimum(tl.maximum(r, 0), P - 1)
        bias += tl.load(PB + pos_idx, mask=allowed, other=0.0).to(tl.float32)
    if HAS_TIME:
        ts_q = tl.load(TS + start + qi, mask=qi < n, other=0)
        ts_k = tl.load(TS + start + kj, mask=kj < n, other=0)
        time_idx = _time_bucket(ts_q - ts_k, NB)
        bias += tl.load(TB + time_idx, mask=allowed, other=0.0).to(tl.float32)
    return allowed, bias, pos_idx, time_idx


@triton.jit
def _pos_grad_add(DPB, dst, pos_idx, allowed, d0, i0, h, P, BLOCK: tl.constexpr,
                  TARGET_AWARE: tl.constexpr):  # fmt: skip
    """dPB[r] += dst summed over each diagonal of a [key j, query i] tile.

    Where r = i - j (every causal tile; target-aware tiles with no candidate row past h),
    the tile is skewed (row jj rotated left by jj) so that column c holds the diagonals
    i - j = d0 + c and d0 + c - BLOCK: 2 * BLOCK atomic adds instead of BLOCK^2.
    Other tiles add element by element.
    """
    if (not TARGET_AWARE) or (i0 + BLOCK - 1 <= h):
        jj = tl.arange(0, BLOCK)[:, None]
        cc = tl.arange(0, BLOCK)[None, :]
        sk = tl.gather(dst, (cc + jj) & (BLOCK - 1), axis=1)
        wrap = (cc + jj) >= BLOCK
        c = tl.arange(0, BLOCK)
        r_lo = d0 + c
        r_hi = r_lo - BLOCK
        tl.atomic_add(DPB + tl.minimum(r_lo, P - 1), tl.sum(tl.where(wrap, 0.0, sk), axis=0),
                      mask=r_lo >= 0)  # fmt: skip
        tl.atomic_add(DPB + tl.minimum(r_hi, P - 1), tl.sum(tl.where(wrap, sk, 0.0), axis=0),
                      mask=r_hi >= 0)  # fmt: skip
    else:
        tl.atomic_add(DPB + pos_idx, dst, mask=allowed)


@triton.jit
def _time_grad_add(DTB, dst, time_idx, allowed, NB):
    """dTB[t] += dst summed over the tile's entries in bucket t: one atomic add per bucket.

    A tile spans few buckets (gaps within it differ little on a log scale), except near the
    diagonal; per-element atomics would make every lane of a warp hit the same address.
    """
    t_idx = time_idx.to(tl.int32)
    t_lo = tl.min(tl.where(allowed, t_idx, NB))
    t_hi = tl.max(tl.where(allowed, t_idx, -1))
    for t in range(t_lo, t_hi + 1):
        tl.atomic_add(DTB + t, tl.sum(tl.where(t_idx == t, dst, 0.0)))


@triton.jit
def _seq_info(OFFS, NUM_TARGETS, b, TARGET_AWARE: tl.constexpr):
    start = tl.load(OFFS + b)
    n = (tl.load(OFFS + b + 1) - start).to(tl.int32)
    h = n
    if TARGET_AWARE:
        h = n - tl.load(NUM_TARGETS + b).to(tl.int32)
    return start, n, h


@triton.jit
def _hstu_fwd_kernel(
    Q, K, V, OUT, OFFS, NUM_TARGETS, TS, PB, TB,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
    P, NB, inv_const, num_m_blocks,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr, TARGET_AWARE: tl.constexpr, NORM_LENGTH: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = num_m_blocks - 1 - tl.program_id(0)  # heaviest (last) query blocks start first
    b = tl.program_id(1)
    hd = tl.program_id(2)
    start, n, h = _seq_info(OFFS, NUM_TARGETS, b, TARGET_AWARE)
    m0 = pid_m * BLOCK_M
    if m0 >= n:
        return
    inv_norm = inv_const
    if NORM_LENGTH:
        inv_norm = 1.0 / n.to(tl.float32)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + (start + offs_m)[:, None] * sq_t + hd * sq_h + offs_dqk[None, :],
        mask=(offs_m < n)[:, None] & (offs_dqk < D_QK)[None, :],
        other=0.0,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # keys [0, end1) hold every allowed j of a causal block; in target-aware mode the
    # candidate keys (>= h) are only seen on the diagonal, walked by the second loop.
    end1 = tl.minimum(m0 + BLOCK_M, h)
    hi1 = tl.cdiv(end1, BLOCK_N) * BLOCK_N
    lo2 = tl.maximum(hi1, m0)
    hi2 = lo2
    if TARGET_AWARE:
        hi2 = tl.minimum(m0 + BLOCK_M, n)
    for n0 in range(0, hi1 + tl.maximum(hi2 - lo2, 0), BLOCK_N):
        n_start = n0
        if n0 >= hi1:
            n_start = lo2 + (n0 - hi1)
        offs_n = n_start + tl.arange(0, BLOCK_N)
        kt = tl.load(
            K + (start + offs_n)[None, :] * sk_t + hd * sk_h + offs_dqk[:, None],
            mask=(offs_n < n)[None, :] & (offs_dqk < D_QK)[:, None],
            other=0.0,
        )
        s = tl.dot(q, kt, input_precision=PRECISION)
        allowed, bias, _, _ = _tile_bias(
            offs_m[:, None], offs_n[None, :], n, h, start, TS, PB, TB, P, NB,
            HAS_POS, HAS_TIME, TARGET_AWARE,
        )  # fmt: skip
        s = s + bias
        a = tl.where(allowed, s * tl.sigmoid(s), 0.0) * inv_norm
        v = tl.load(
            V + (start + offs_n)[:, None] * sv_t + hd * sv_h + offs_dv[None, :],
            mask=(offs_n < n)[:, None] & (offs_dv < D_V)[None, :],
            other=0.0,
        )
        acc += tl.dot(a.to(v.dtype), v, input_precision=PRECISION)
    tl.store(
        OUT + (start + offs_m)[:, None] * so_t + hd * so_h + offs_dv[None, :],
        acc.to(OUT.dtype.element_ty),
        mask=(offs_m < n)[:, None] & (offs_dv < D_V)[None, :],
    )


@triton.jit
def _hstu_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, DPB, DTB, OFFS, NUM_TARGETS, TS, PB, TB,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h, sdk_t, sdk_h, sdv_t, sdv_h,
    P, NB, inv_const,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr, TARGET_AWARE: tl.constexpr,
    NORM_LENGTH: tl.constexpr, PRECISION: tl.constexpr, GRAD_SLICES: tl.constexpr,
):  # fmt: skip
    blk0 = tl.program_id(0) * BLOCK
    b = tl.program_id(1)
    hd = tl.program_id(2)
    start, n, h = _seq_info(OFFS, NUM_TARGETS, b, TARGET_AWARE)
    if blk0 >= n:
        return
    inv_norm = inv_const
    if NORM_LENGTH:
        inv_norm = 1.0 / n.to(tl.float32)
    offs_blk = blk0 + tl.arange(0, BLOCK)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_blk < n
    qk_mask = row_ok[:, None] & (offs_dqk < D_QK)[None, :]
    v_mask = row_ok[:, None] & (offs_dv < D_V)[None, :]

    # ---- dK, dV of key block blk0: rows i >= blk0 see it; candidate-only keys only i == j
    k = tl.load(K + (start + offs_blk)[:, None] * sk_t + hd * sk_h + offs_dqk[None, :],
                mask=qk_mask, other=0.0)  # fmt: skip
    v = tl.load(V + (start + offs_blk)[:, None] * sv_t + hd * sv_h + offs_dv[None, :],
                mask=v_mask, other=0.0)  # fmt: skip
    # bias-table grads go to one of GRAD_SLICES copies (summed on the host): fewer programs
    # contend for the same few addresses
    grad_slice = (b * tl.num_programs(2) + hd) % GRAD_SLICES
    dk = tl.zeros([BLOCK, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
    q_hi = n
    if TARGET_AWARE:
        if blk0 >= h:
            q_hi = tl.minimum(blk0 + BLOCK, n)
    for i0 in range(blk0, q_hi, BLOCK):
        offs_i = i0 + tl.arange(0, BLOCK)
        i_ok = offs_i < n
        q = tl.load(Q + (start + offs_i)[:, None] * sq_t + hd * sq_h + offs_dqk[None, :],
                    mask=i_ok[:, None] & (offs_dqk < D_QK)[None, :], other=0.0)  # fmt: skip
        do = tl.load(DO + (start + offs_i)[:, None] * sdo_t + hd * sdo_h + offs_dv[None, :],
                     mask=i_ok[:, None] & (offs_dv < D_V)[None, :], other=0.0)  # fmt: skip
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [j, i]
        allowed, bias, pos_idx, time_idx = _tile_bias(
            offs_i[None, :], offs_blk[:, None], n, h, start, TS, PB, TB, P, NB,
            HAS_POS, HAS_TIME, TARGET_AWARE,
        )  # fmt: skip
        st = st + bias
        sig = tl.sigmoid(st)
        at = tl.where(allowed, st * sig, 0.0) * inv_norm
        dv += tl.dot(at.to(do.dtype), do, input_precision=PRECISION)
        dat = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [j, i]
        dst = tl.where(allowed, dat * sig * (1.0 + st * (1.0 - sig)), 0.0) * inv_norm
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        if POS_GRAD:
            _pos_grad_add(DPB + grad_slice * P, dst, pos_idx, allowed, i0 - blk0, i0, h, P,
                          BLOCK, TARGET_AWARE)  # fmt: skip
        if TIME_GRAD:
            _time_grad_add(DTB + grad_slice * NB, dst, time_idx, allowed, NB)
    tl.store(DK + (start + offs_blk)[:, None] * sdk_t + hd * sdk_h + offs_dqk[None, :],
             dk.to(DK.dtype.element_ty), mask=qk_mask)  # fmt: skip
    tl.store(DV + (start + offs_blk)[:, None] * sdv_t + hd * sdv_h + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=v_mask)  # fmt: skip

    # ---- dQ of query block blk0: the same key ranges as the forward pass
    q = tl.load(Q + (start + offs_blk)[:, None] * sq_t + hd * sq_h + offs_dqk[None, :],
                mask=qk_mask, other=0.0)  # fmt: skip
    do = tl.load(DO + (start + offs_blk)[:, None] * sdo_t + hd * sdo_h + offs_dv[None, :],
                 mask=v_mask, other=0.0)  # fmt: skip
    dq = tl.zeros([BLOCK, BLOCK_DQK], dtype=tl.float32)
    end1 = tl.minimum(blk0 + BLOCK, h)
    hi1 = tl.cdiv(end1, BLOCK) * BLOCK
    lo2 = tl.maximum(hi1, blk0)
    hi2 = lo2
    if TARGET_AWARE:
        hi2 = tl.minimum(blk0 + BLOCK, n)
    for j0 in range(0, hi1 + tl.maximum(hi2 - lo2, 0), BLOCK):
        j_start = j0
        if j0 >= hi1:
            j_start = lo2 + (j0 - hi1)
        offs_j = j_start + tl.arange(0, BLOCK)
        j_ok = offs_j < n
        kj = tl.load(K + (start + offs_j)[:, None] * sk_t + hd * sk_h + offs_dqk[None, :],
                     mask=j_ok[:, None] & (offs_dqk < D_QK)[None, :], other=0.0)  # fmt: skip
        vj = tl.load(V + (start + offs_j)[:, None] * sv_t + hd * sv_h + offs_dv[None, :],
                     mask=j_ok[:, None] & (offs_dv < D_V)[None, :], other=0.0)  # fmt: skip
        s = tl.dot(q, tl.trans(kj), input_precision=PRECISION)  # [i, j]
        allowed, bias, _, _ = _tile_bias(
            offs_blk[:, None], offs_j[None, :], n, h, start, TS, PB, TB, P, NB,
            HAS_POS, HAS_TIME, TARGET_AWARE,
        )  # fmt: skip
        s = s + bias
        sig = tl.sigmoid(s)
        da = tl.dot(do, tl.trans(vj), input_precision=PRECISION)
        ds = tl.where(allowed, da * sig * (1.0 + s * (1.0 - sig)), 0.0) * inv_norm
        dq += tl.dot(ds.to(kj.dtype), kj, input_precision=PRECISION)
    tl.store(DQ + (start + offs_blk)[:, None] * sdq_t + hd * sdq_h + offs_dqk[None, :],
             dq.to(DQ.dtype.element_ty), mask=qk_mask)  # fmt: skip


INTERPRETED = bool(triton.knobs.runtime.interpret)  # decided when the kernels were decorated


def _launch_config(
    d_qk: int, d_v: int, interpreted: bool, dtype: torch.dtype = torch.bfloat16
) -> dict[str, int]:
    """Tile sizes: 16 under the interpreter (cheap, many blocks); H100-sized on CUDA.

    Measured on an H100 (2026-11-22, H=4, d=64): 64-wide tiles suit bf16. Float32 operands
    take twice the registers, and 64-wide backward tiles then spill (fwd+bwd at L=1024:
    139 ms with 64, 9.2 ms with 32), while the float32 forward is faster with 64-wide key
    tiles (L=4096: 4.9 ms vs 7.2 ms with 32); d > 64 uses 32-wide key and backward tiles.
    """
    if interpreted:
        return {"fwd_m": 16, "fwd_n": 16, "bwd": 16, "warps": 1, "stages": 1, "slices": 1}
    wide = max(d_qk, d_v) > 64
    return {
        "fwd_m": 64,
        "fwd_n": 32 if wide else 64,
        "bwd": 32 if wide or dtype == torch.float32 else 64,
        "warps": 4,
        "stages": 2,
        "slices": 32,
    }


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul precision setting; bf16/fp16 dots are exact-input."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _check_inputs(
    q, k, v, offsets, max_seq_len, timestamps, pos_bias, time_bias, num_targets, norm
) -> None:
    """Fail early, naming the argument and the fix (one host sync for the value checks)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("triton_hstu_attention: q, k, v must be [T, H, D] jagged values")
    if q.shape != k.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"triton_hstu_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v "
            f"{tuple(v.shape)} must share T and H (and q, k their D)"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        raise ValueError("triton_hstu_attention: q, k, v must share one float32/16/bf16 dtype")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError("triton_hstu_attention: offsets must be int64 [B+1]")
    if time_bias is not None and (timestamps is None or timestamps.shape != (q.shape[0],)):
        raise ValueError("triton_hstu_attention: time_bias needs int64 timestamps of shape [T]")
    if timestamps is not None and timestamps.dtype != torch.int64:
        raise ValueError("triton_hstu_attention: timestamps must be int64 seconds")
    for name, table in (("pos_bias", pos_bias), ("time_bias", time_bias)):
        if table is not None and (table.dim() != 1 or table.numel() == 0):
            raise ValueError(f"triton_hstu_attention: {name} must be a non-empty 1-D table")
    named = {"k": k, "v": v, "offsets": offsets, "timestamps": timestamps, "pos_bias": pos_bias}
    named.update(time_bias=time_bias, num_targets=num_targets)
    for name, t in named.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"triton_hstu_attention: {name} is on {t.device}, q on {q.device}")
    B = offsets.numel() - 1
    if num_targets is not None and (num_targets.shape != (B,) or num_targets.dtype != torch.int64):
        raise ValueError(f"triton_hstu_attention: num_targets must be int64 [B={B}]")
    if norm != "length" and (isinstance(norm, bool) or not isinstance(norm, (int, float))):
        raise ValueError(f"triton_hstu_attention: norm must be 'length' or a number, got {norm!r}")
    if norm != "length" and not norm > 0:
        raise ValueError(f"triton_hstu_attention: norm constant must be > 0, got {norm}")
    lengths = offsets[1:] - offsets[:-1]
    stats = [offsets[0], offsets[-1], lengths.min() if B else offsets[0] * 0]
    stats.append(lengths.max() if B else offsets[0] * 0)
    if num_targets is not None and B:
        stats += [num_targets.min(), (num_targets - lengths).max()]
    vals = torch.stack([s.to(torch.int64) for s in stats]).tolist()
    if vals[0] != 0 or vals[1] != q.shape[0] or vals[2] < 0:
        raise ValueError(
            f"triton_hstu_attention: offsets must rise from 0 to T={q.shape[0]}, "
            f"got first={vals[0]}, last={vals[1]}, min length={vals[2]}"
        )
    if vals[3] > max_seq_len:
        raise ValueError(
            f"triton_hstu_attention: a sequence has {vals[3]} tokens > max_seq_len={max_seq_len}"
        )
    if num_targets is not None and B and (vals[4] < 0 or vals[5] > 0):
        raise ValueError("triton_hstu_attention: num_targets[b] must lie in [0, length of b]")
    if not (q.is_cuda or INTERPRETED):
        raise ValueError(
            "triton_hstu_attention: tensors are on the CPU; use CUDA tensors, set "
            "TRITON_INTERPRET=1 before triton is imported, or call "
            "hstu_attention(backend='reference')"
        )


class _HSTUAttention(torch.autograd.Function):
    """Forward and backward kernels; saves only the inputs (SiLU needs no row statistics)."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, max_seq_len, timestamps, pos_bias, time_bias, num_targets,
                norm):  # fmt: skip
        T, H, d_qk = q.shape
        d_v = v.shape[-1]
        B = offsets.numel() - 1
        cfg = _launch_config(d_qk, d_v, INTERPRETED, q.dtype)
        out = torch.empty((T, H, d_v), dtype=v.dtype, device=v.device)  # every row is written
        ctx.save_for_backward(q, k, v, offsets, timestamps, pos_bias, time_bias, num_targets)
        ctx.max_seq_len, ctx.norm, ctx.cfg = max_seq_len, norm, cfg
        if T == 0 or B == 0 or max_seq_len == 0:
            return out.zero_()
        num_m = triton.cdiv(max_seq_len, cfg["fwd_m"])
        dummy = offsets
        _hstu_fwd_kernel[(num_m, B, H)](
            q, k, v, out, offsets,
            num_targets if num_targets is not None else dummy,
            timestamps if timestamps is not None else dummy,
            pos_bias if pos_bias is not None else q,
            time_bias if time_bias is not None else q,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            pos_bias.numel() if pos_bias is not None else 1,
            time_bias.numel() if time_bias is not None else 1,
            1.0 / float(norm) if norm != "length" else 1.0,
            num_m,
            D_QK=d_qk, D_V=d_v,
            BLOCK_DQK=max(16, triton.next_power_of_2(d_qk)),
            BLOCK_DV=max(16, triton.next_power_of_2(d_v)),
            BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"],
            HAS_POS=pos_bias is not None, HAS_TIME=time_bias is not None,
            TARGET_AWARE=num_targets is not None, NORM_LENGTH=norm == "length",
            PRECISION=_precision(q.dtype),
            num_warps=cfg["warps"], num_stages=cfg["stages"],
        )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, offsets, timestamps, pos_bias, time_bias, num_targets = ctx.saved_tensors
        norm, cfg = ctx.norm, ctx.cfg
        T, H, d_qk = q.shape
        d_v = v.shape[-1]
        B = offsets.numel() - 1
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
        pos_grad = pos_bias is not None and ctx.needs_input_grad[6]
        time_grad = time_bias is not None and ctx.needs_input_grad[7]
        slices = cfg["slices"]
        dpb = q.new_zeros((slices, pos_bias.numel()), dtype=torch.float32) if pos_grad else None
        dtb = q.new_zeros((slices, time_bias.numel()), dtype=torch.float32) if time_grad else None
        if T and B and ctx.max_seq_len:
            num_blocks = triton.cdiv(ctx.max_seq_len, cfg["bwd"])
            dummy = offsets
            _hstu_bwd_kernel[(num_blocks, B, H)](
                q, k, v, dout, dq, dk, dv,
                dpb if dpb is not None else q, dtb if dtb is not None else q,
                offsets,
                num_targets if num_targets is not None else dummy,
                timestamps if timestamps is not None else dummy,
                pos_bias if pos_bias is not None else q,
                time_bias if time_bias is not None else q,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
                dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                pos_bias.numel() if pos_bias is not None else 1,
                time_bias.numel() if time_bias is not None else 1,
                1.0 / float(norm) if norm != "length" else 1.0,
                D_QK=d_qk, D_V=d_v,
                BLOCK_DQK=max(16, triton.next_power_of_2(d_qk)),
                BLOCK_DV=max(16, triton.next_power_of_2(d_v)),
                BLOCK=cfg["bwd"],
                HAS_POS=pos_bias is not None, HAS_TIME=time_bias is not None,
                POS_GRAD=pos_grad, TIME_GRAD=time_grad,
                TARGET_AWARE=num_targets is not None, NORM_LENGTH=norm == "length",
                PRECISION=_precision(q.dtype), GRAD_SLICES=slices,
                num_warps=cfg["warps"], num_stages=cfg["stages"],
            )  # fmt: skip
        return (
            dq,
            dk,
            dv,
            None,
            None,
            None,
            dpb.sum(0).to(pos_bias.dtype) if dpb is not None else None,
            dtb.sum(0).to(time_bias.dtype) if dtb is not None else None,
            None,
            None,
        )


def triton_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_seq_len: int,
    *,
    timestamps: torch.Tensor | None = None,
    pos_bias: torch.Tensor | None = None,
    time_bias: torch.Tensor | None = None,
    num_targets: torch.Tensor | None = None,
    norm: str | float = "length",
) -> torch.Tensor:
    """Jagged causal / target-aware HSTU attention, [T, H, Dv]; same contract as genrec.models.attention."""
    _check_inputs(q, k, v, offsets, max_seq_len, timestamps, pos_bias, time_bias, num_targets, norm)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _HSTUAttention.apply(
        q,
        k,
        v,
        offsets.contiguous(),
        int(max_seq_len),
        timestamps.contiguous() if timestamps is not None else None,
        pos_bias.contiguous() if pos_bias is not None else None,
        time_bias.contiguous() if time_bias is not None else None,
        num_targets.contiguous() if num_targets is not None else None,
        norm,
    )
