"""The jagged HSTU attention op: one signature, a PyTorch reference and two fast paths
(grouped bmm with a hand-written backward for CPU, `attention_grouped.py`; Triton for CUDA).

    out = hstu_attention(q, k, v, offsets, max_seq_len, timestamps=..., pos_bias=...,
                         time_bias=..., num_targets=..., norm="length")

Inputs are jagged: sequence b owns rows offsets[b]:offsets[b+1] of q/k/v ([T, H, D]).
For a sequence of n tokens, a_ij = SiLU(<q_i, k_j> + rab_pos + rab_time) / N if allowed(i, j)
else 0, and out_i = sum_j a_ij v_j (no softmax, no 1/sqrt(d)). The contract every backend
meets (i, j local to the sequence):
- allowed(i, j) = j <= i (causal). Target-aware (num_targets given, h = n - num_targets[b]):
  allowed(i, j) = (j <= i and j < h) or i == j: candidates see the history and themselves.
- position p_i = i, but candidates share p_i = h; rab_pos = pos_bias[min(p_i - p_j, P - 1)];
  rab_time = time_bias[time_bucket(ts_i - ts_j)]; both shared across heads.
- N = n (norm="length") or the given constant; gradients reach q, k, v and both bias tables.

The reference never pads the batch to max_seq_len: sequences are grouped by similar length
(buckets at 2^k and 1.5 * 2^k), each group is padded only to its own longest sequence and
split so that one group's score tensor stays under `jagged.GROUP_SCORE_ELEMS`. Memory is then
O(sum_b n_b^2) instead of O(B * max_seq_len^2). `hstu_attention_padded` is the same math on
an already padded [B, L, ...] batch (used by export, where shapes must be static). The
grouped backend uses the same groups and must match the reference in outputs and gradients.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from genrec.models.attention_grouped import (
    AttentionPlan,
    checked_lengths,
    grouped_attention,
    plan_attention,
)
from genrec.models.jagged import length_groups, lengths_from_offsets, padded_rows


def time_bucket(
    dt: torch.Tensor, num_buckets: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 (or `out`'s int32) bucket of a time gap in seconds:
    clamp(floor(2 * log2(1 + |dt|)), 0, num_buckets-1).

    Log buckets: gaps of seconds and of months both get resolution. Exact on every device:
    floor(2 * log2(x)) = floor(log2(x^2)) >= k exactly when |dt| >= isqrt(2^k - 1) for
    x = 1 + |dt|, so the bucket is the number of those integer edges at or below |dt| (a
    float log2 is only an estimate: CUDA's returns 2.9999999999999996 for log2(8)). Gaps with
    x^2 >= 2^63 take bucket 63, as the Triton kernel does. int32 gaps (|dt| < 2^31, ~68 years
    of seconds) are searched as int32, ~3x faster on CPU than int64.
    """
    edges = _time_edges(num_buckets)
    if dt.dtype == torch.int32:  # the edges past 2^31 - 1 cannot be reached
        edges = tuple(e for e in edges if e < 2**31)
    else:
        dt = dt.to(torch.int64)
    edges_t = torch.tensor(edges, dtype=dt.dtype, device=dt.device)
    out_int32 = out is not None and out.dtype == torch.int32
    return torch.searchsorted(edges_t, dt.abs(), right=True, out_int32=out_int32, out=out)


@functools.lru_cache(maxsize=16)
def _time_edges(num_buckets: int) -> tuple[int, ...]:
    """The smallest |dt| of buckets 1, 2, ..., min(63, num_buckets - 1)."""
    return tuple(math.isqrt(2**k - 1) for k in range(1, min(63, num_buckets - 1) + 1))


def _allowed_and_positions(
    lengths: torch.Tensor, L: int, num_targets: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """([G, L, L] bool mask of allowed (i, j) incl. padding, [G, L] int64 position index)."""
    ar = torch.arange(L, device=lengths.device)
    i, j = ar[:, None], ar[None, :]
    valid = ar[None, :] < lengths[:, None]  # [G, L]
    causal = (j <= i)[None]
    if num_targets is None:
        allowed = causal
        pos = ar[None, :].expand(lengths.numel(), L)
    else:
        h = (lengths - num_targets)[:, None, None]  # history tokens per sequence
        allowed = (causal & (j[None] < h)) | (i == j)[None]
        pos = torch.minimum(ar[None, :], h[:, :, 0])  # candidates share position h
    allowed = allowed & valid[:, :, None] & valid[:, None, :]
    return allowed, pos


def hstu_attention_padded(
    q: torch.Tensor,  # [G, L, H, Dqk]
    k: torch.Tensor,
    v: torch.Tensor,  # [G, L, H, Dv]
    lengths: torch.Tensor,  # int64 [G], valid rows of each padded sequence
    *,
    timestamps: torch.Tensor | None = None,  # int64 [G, L]
    pos_bias: torch.Tensor | None = None,
    time_bias: torch.Tensor | None = None,
    num_targets: torch.Tensor | None = None,
    norm: str | float = "length",
) -> torch.Tensor:
    """The op on a padded batch; rows at or past lengths[g] come out zero.

    No data-dependent Python control flow, so torch.export can trace it.
    """
    L = q.shape[1]
    allowed, pos = _allowed_and_positions(lengths, L, num_targets)
    s = torch.einsum("gihd,gjhd->ghij", q, k)
    bias = None
    if pos_bias is not None:
        r = (pos[:, :, None] - pos[:, None, :]).clamp(0, pos_bias.numel() - 1)
        bias = pos_bias[r]
    if time_bias is not None:
        if timestamps is None:
            raise ValueError("hstu_attention: time_bias needs timestamps")
        dt = timestamps[:, :, None] - timestamps[:, None, :]
        tb = time_bias[time_bucket(dt, time_bias.numel())]
        bias = tb if bias is None else bias + tb
    if bias is not None:
        s = s + bias[:, None].to(s.dtype)
    if norm == "length":
        denom = lengths.clamp_min(1).to(s.dtype)[:, None, None, None]
    elif isinstance(norm, (int, float)) and not isinstance(norm, bool):
        denom = float(norm)
    else:
        raise ValueError(f"hstu_attention: norm must be 'length' or a number, got {norm!r}")
    a = F.silu(s) * allowed[:, None].to(s.dtype) / denom
    return torch.einsum("ghij,gjhd->gihd", a, v)


def hstu_attention_reference(
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
    """PyTorch reference of the jagged op (length-grouped, see the module docstring)."""
    T, H, _ = q.shape
    checked_lengths(lengths_from_offsets(offsets), max_seq_len, num_targets)

    def group(rows: torch.Tensor, lens: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
        return hstu_attention_padded(
            q[rows],
            k[rows],
            v[rows],
            lens,
            timestamps=timestamps[rows] if timestamps is not None else None,
            pos_bias=pos_bias,
            time_bias=time_bias,
            num_targets=num_targets[idx_b] if num_targets is not None else None,
            norm=norm,
        )

    out = by_length_groups(offsets, H, group)
    return out if out is not None else v.new_zeros(T, H, v.shape[-1]) + 0.0 * v.sum()


def by_length_groups(offsets: torch.Tensor, num_heads: int, fn) -> torch.Tensor | None:
    """Run a padded per-sequence computation group by group (`jagged.length_groups`) and return
    its outputs as jagged rows in token order, or None when there are no tokens.

    fn(rows [G, L], lengths [G], sequence indices [G]) -> [G, L, ...]: `rows` are the flat
    token rows of each group member, padded slots pointing at the sequence's first row;
    their outputs are dropped, so fn must keep padded slots out of the real ones."""
    lengths_t = lengths_from_offsets(offsets)
    rows_out: list[torch.Tensor] = []
    vals_out: list[torch.Tensor] = []
    for members, L in length_groups(lengths_t.tolist(), num_heads):
        idx_b = torch.tensor(members, dtype=torch.int64, device=offsets.device)
        rows, valid = padded_rows(offsets, idx_b, L)
        rows_out.append(rows[valid])
        vals_out.append(fn(rows, lengths_t[idx_b], idx_b)[valid])
    if not rows_out:
        return None
    all_rows = torch.cat(rows_out)
    inverse = torch.empty_like(all_rows)
    inverse[all_rows] = torch.arange(all_rows.numel(), device=offsets.device)
    return torch.cat(vals_out)[inverse]


@functools.lru_cache(maxsize=1)
def _triton_op():
    try:
        from genrec.models.attention_triton import triton_hstu_attention
    except Exception:  # no triton or no kernel module: the reference serves
        return None
    return triton_hstu_attention


def hstu_attention(
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
    backend: str = "auto",
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Jagged causal (or target-aware) HSTU attention; [T, H, Dv]. Backend dispatch here.

    backend: "triton" (CUDA), "grouped" (length groups of batched matmuls with a hand-written
    backward, any device: `attention_grouped`), "reference" (autograd through the padded op),
    or "auto" (triton on CUDA when it imports, else grouped). plan: the grouped backend's
    layout work for this batch (`attention_plan`), shared by an encoder's layers."""
    kwargs = dict(
        timestamps=timestamps,
        pos_bias=pos_bias,
        time_bias=time_bias,
        num_targets=num_targets,
        norm=norm,
    )
    if time_bias is not None and timestamps is None:
        raise ValueError("hstu_attention: time_bias needs timestamps")
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_op() is not None else "grouped"
    if backend == "grouped":
        if plan is None:
            plan = attention_plan(
                offsets,
                max_seq_len,
                q.shape[1],
                timestamps,
                pos_bias,
                time_bias,
                num_targets,
                norm,
            )
        return grouped_attention(q, k, v, pos_bias, time_bias, plan)
    if backend == "reference":
        return hstu_attention_reference(q, k, v, offsets, max_seq_len, **kwargs)
    if backend == "triton":
        op = _triton_op()
        if op is None:
            raise RuntimeError(
                "hstu_attention(backend='triton'): genrec.models.attention_triton does not "
                "import (needs triton and a CUDA device); use backend='reference'"
            )
        return op(q, k, v, offsets, max_seq_len, **kwargs)
    raise ValueError(
        f"hstu_attention: backend must be auto|grouped|reference|triton, got {backend!r}"
    )


def attention_plan(
    offsets: torch.Tensor,
    max_seq_len: int,
    num_heads: int,
    timestamps: torch.Tensor | None,
    pos_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    num_targets: torch.Tensor | None,
    norm: str | float,
) -> AttentionPlan | None:
    """The grouped backend's plan for a batch and a layer's bias tables (None on CUDA, where
    "auto" runs the Triton kernel). Layers with equal bias sizes and norm share one plan."""
    if offsets.is_cuda and _triton_op() is not None:
        return None
    return plan_attention(
        offsets,
        max_seq_len,
        num_heads=num_heads,
        timestamps=timestamps if time_bias is not None else None,
        num_pos=pos_bias.numel() if pos_bias is not None else 0,
        num_time=time_bias.numel() if time_bias is not None else 0,
        num_targets=num_targets,
        norm=norm,
    )
