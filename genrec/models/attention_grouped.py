"""The jagged HSTU attention op as length groups of batched matmuls with a hand-written
backward: the CPU fast path of `attention.hstu_attention` (backend "grouped"; it runs on any
device). Same contract and results as the reference (module docstring of attention.py).

Two steps:

- `plan_attention(offsets, ...)` does everything that depends only on the batch layout, once
  per encoder forward and shared by every layer: the length groups (`jagged.length_groups`),
  each group's padded rows, and one int32 index per allowed score (i, j) into the flat bias
  table [P * NB] = pos_bias[:, None] + time_bias[None, :] (the exact time bucket is the costly
  part; no-target position indices are one [L, L] matrix shared by the group).
- `grouped_attention(q, k, v, table, plan)` per group: S = Q K^T (bmm) + table[index],
  A = SiLU(S) masked (tril for causal), O = A V / N, written into the jagged output. The
  backward recomputes A from the kept S and uses aten's fused silu_backward; the bias table's
  gradient is one index_add over the group's scores. Neither direction builds a [G, L, L]
  mask, position matrix or bucket tensor per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genrec.models.jagged import length_groups, lengths_from_offsets, padded_rows

_PLAN_SLICE_ELEMS = 1 << 20  # (i, j) pairs whose int64 time gaps are built at once


@dataclass
class _Group:
    L: int
    rows: torch.Tensor  # int64 [G * L]: flat token row of every padded slot
    sel: torch.Tensor  # int64 [n_real]: the real slots among the G * L
    dst: torch.Tensor  # int64 [n_real]: their flat token rows (each token exactly once)
    scale: torch.Tensor  # float32 [G, L, 1, 1]: 1 / N on real slots, 0 on padding
    bias_index: torch.Tensor | None  # int32 [G or 1, L, L] into the flat bias table
    allowed: torch.Tensor | None  # bool [G, L, L] (target-aware); None: causal (tril)


@dataclass
class AttentionPlan:
    """The layout-only part of the op for one batch (see `plan_attention`)."""

    groups: list[_Group]
    num_tokens: int
    num_pos: int  # rows of pos_bias the indices assume (0: no position bias)
    num_time: int  # entries of time_bias the indices assume (0: no time bias)


def checked_lengths(
    lengths_t: torch.Tensor, max_seq_len: int, num_targets: torch.Tensor | None
) -> list[int]:
    """The sequence lengths as a list, after the op's checks on them."""
    lengths = lengths_t.tolist()
    if lengths and max(lengths) > max_seq_len:
        raise ValueError(
            f"hstu_attention: a sequence has {max(lengths)} tokens > max_seq_len={max_seq_len}"
        )
    if num_targets is not None and bool((num_targets > lengths_t).any()):
        raise ValueError("hstu_attention: num_targets[b] exceeds the length of sequence b")
    return lengths


def plan_attention(
    offsets: torch.Tensor,
    max_seq_len: int,
    *,
    num_heads: int,
    timestamps: torch.Tensor | None,
    num_pos: int,
    num_time: int,
    num_targets: torch.Tensor | None,
    norm: str | float,
) -> AttentionPlan:
    """Plan the op for a jagged batch; num_pos / num_time are the bias tables' sizes (0 when
    the layer has no such bias). Raises on lengths past max_seq_len or bad num_targets."""
    from genrec.models.attention import _allowed_and_positions, time_bucket

    lengths_t = lengths_from_offsets(offsets)
    lengths = checked_lengths(lengths_t, max_seq_len, num_targets)
    if num_time and timestamps is None:
        raise ValueError("hstu_attention: time_bias needs timestamps")
    if norm != "length" and (isinstance(norm, bool) or not isinstance(norm, (int, float))):
        raise ValueError(f"hstu_attention: norm must be 'length' or a number, got {norm!r}")
    dev = offsets.device
    groups = []
    for members, L in length_groups(lengths, num_heads):
        idx_b = torch.tensor(members, dtype=torch.int64, device=dev)
        rows, valid = padded_rows(offsets, idx_b, L)
        lens = lengths_t[idx_b]
        flat = rows.reshape(-1)
        sel = valid.reshape(-1).nonzero().squeeze(1)
        inv = 1.0 / lens.clamp_min(1).to(torch.float32) if norm == "length" else 1.0 / norm
        scale = valid.to(torch.float32) * (inv[:, None] if norm == "length" else inv)
        allowed = None
        if num_targets is not None:
            allowed, pos = _allowed_and_positions(lens, L, num_targets[idx_b])
        index = None
        if num_pos:
            if num_targets is None:
                ar = torch.arange(L, device=dev)
                r = (ar[:, None] - ar[None, :]).clamp(0, num_pos - 1)[None]  # [1, L, L]
            else:
                r = (pos[:, :, None] - pos[:, None, :]).clamp(0, num_pos - 1)
            index = r * max(num_time, 1)
        if num_time:  # in slices of sequences: the int64 gaps are the plan's largest tensors
            ts = timestamps[rows]
            step = max(1, _PLAN_SLICE_ELEMS // (L * L))
            parts = []
            for s in range(0, len(members), step):
                t = ts[s : s + step]
                tb = time_bucket(t[:, :, None] - t[:, None, :], num_time)
                if index is not None:
                    tb += index if index.shape[0] == 1 else index[s : s + step]
                parts.append(tb.to(torch.int32))
            index = torch.cat(parts) if len(parts) > 1 else parts[0]
        elif index is not None:
            index = index.to(torch.int32)
        groups.append(_Group(L, flat, sel, flat[sel], scale[:, :, None, None], index, allowed))
    return AttentionPlan(groups, int(offsets[-1]), num_pos, num_time)


def bias_table(pos_bias: torch.Tensor | None, time_bias: torch.Tensor | None):
    """The flat [P * NB] table the plan's indices point into (None without biases)."""
    if pos_bias is not None and time_bias is not None:
        return (pos_bias[:, None] + time_bias[None, :]).reshape(-1)
    return pos_bias if pos_bias is not None else time_bias


def _heads_first(x: torch.Tensor, G: int, L: int) -> torch.Tensor:
    """[G * L, H, D] -> [G * H, L, D]."""
    _, H, D = x.shape
    return x.view(G, L, H, D).transpose(1, 2).reshape(G * H, L, D)


def _tokens_first(x: torch.Tensor, G: int) -> torch.Tensor:
    """[G * H, L, D] -> [G * L, H, D]."""
    GH, L, D = x.shape
    return x.view(G, GH // G, L, D).transpose(1, 2).reshape(G * L, GH // G, D)


def _mask_(a: torch.Tensor, g: _Group, G: int) -> torch.Tensor:
    """Zero the disallowed scores of [G * H, L, L] in place."""
    if g.allowed is None:
        return a.tril_()
    a.view(G, -1, g.L, g.L).mul_(g.allowed[:, None])
    return a


def _scores(qg, kg, tab, g: _Group, G: int) -> torch.Tensor:
    """[G * H, L, L] Q K^T + rab of one group (rab from the flat bias table)."""
    s = torch.bmm(qg, kg.transpose(1, 2))
    if tab is not None:
        bias = tab.index_select(0, g.bias_index.reshape(-1)).view(
            G if g.bias_index.shape[0] > 1 else 1, 1, g.L, g.L
        )
        s.view(G, -1, g.L, g.L).add_(bias)
    return s


class _GroupedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, plan: AttentionPlan):
        T, H, _ = q.shape
        out = v.new_zeros(T, H, v.shape[-1])
        tab = table.to(q.dtype) if table is not None else None
        kept = []
        for g in plan.groups:
            G = g.rows.numel() // g.L
            qg, kg, vg = (_heads_first(t.index_select(0, g.rows), G, g.L) for t in (q, k, v))
            s = _scores(qg, kg, tab, g, G)
            kept.append(s)  # for the backward: A and SiLU'(S) come from S
            a = _mask_(F.silu(s), g, G)
            o = _tokens_first(torch.bmm(a, vg), G).view(G, g.L, H, -1) * g.scale.to(q.dtype)
            del a, s
            out.index_copy_(0, g.dst, o.view(G * g.L, H, -1).index_select(0, g.sel))
        ctx.save_for_backward(q, k, v, table if table is not None else q.new_zeros(0))
        ctx.scores, ctx.plan, ctx.has_table = kept, plan, table is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, table = ctx.saved_tensors
        plan, H = ctx.plan, q.shape[1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        want_table = ctx.has_table and ctx.needs_input_grad[3]
        dtable = q.new_zeros(table.numel(), dtype=torch.float32) if want_table else None
        dout = dout.contiguous()
        for g, s in zip(plan.groups, ctx.scores):
            G, L = g.rows.numel() // g.L, g.L
            dog = dout.index_select(0, g.rows).view(G, L, H, -1) * g.scale.to(dout.dtype)
            dog = _heads_first(dog.view(G * L, H, -1), G, L)
            qg, kg, vg = (_heads_first(t.index_select(0, g.rows), G, L) for t in (q, k, v))
            a = _mask_(F.silu(s), g, G)
            dvg = torch.bmm(a.transpose(1, 2), dog)
            del a
            da = torch.bmm(dog, vg.transpose(1, 2))
            ds = _mask_(torch.ops.aten.silu_backward.grad_input(da, s, grad_input=da), g, G)
            del s
            dqg, dkg = torch.bmm(ds, kg), torch.bmm(ds.transpose(1, 2), qg)
            if dtable is not None:
                w = ds.view(G, H, L, L).sum(1) if H > 1 else ds.view(G, L, L)
                if g.bias_index.shape[0] == 1 and G > 1:
                    w = w.sum(0, keepdim=True)
                dtable.index_add_(0, g.bias_index.reshape(-1), w.reshape(-1).float())
            del ds, da
            for full, part in ((dq, dqg), (dk, dkg), (dv, dvg)):
                full.index_copy_(0, g.dst, _tokens_first(part, G).index_select(0, g.sel))
        ctx.scores = None
        if dtable is not None:
            dtable = dtable.to(table.dtype)
        return dq, dk, dv, dtable, None


def grouped_attention(
    q: torch.Tensor,  # [T, H, Dqk]
    k: torch.Tensor,
    v: torch.Tensor,  # [T, H, Dv]
    pos_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    plan: AttentionPlan,
) -> torch.Tensor:
    """[T, H, Dv] jagged attention by `plan` (made for these bias sizes and this batch)."""
    num_pos = pos_bias.numel() if pos_bias is not None else 0
    num_time = time_bias.numel() if time_bias is not None else 0
    if (plan.num_pos, plan.num_time, plan.num_tokens) != (num_pos, num_time, q.shape[0]):
        raise ValueError(
            f"hstu_attention: plan made for {plan.num_tokens} tokens, pos_bias {plan.num_pos}, "
            f"time_bias {plan.num_time}; got {q.shape[0]}, {num_pos}, {num_time}: make the "
            "plan with this batch and layer"
        )
    return _GroupedAttention.apply(q, k, v, bias_table(pos_bias, time_bias), plan)
