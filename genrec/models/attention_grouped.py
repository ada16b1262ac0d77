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

A group whose members are consecutive sequences of exactly L tokens (every group when all rows
are full) is "dense": its tokens are the contiguous flat rows start:start + G * L, so Q, K, V
are views, the products are written straight into the jagged outputs and gradients, and no
row index is built or gathered. The scores S start as the gathered bias and take Q K^T in
place (baddbmm_). The backward computes A, then dA, in one buffer that the plan holds for all
groups and layers (`AttentionPlan.score_buffer`; released with the plan after the first
layer's backward). Time gaps are taken in int32 when every row spans < 2^31 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from genrec.models.jagged import length_groups, lengths_from_offsets, padded_rows

_PLAN_SLICE_ELEMS = 1 << 20  # (i, j) pairs whose time gaps are built at once


@dataclass
class _Group:
    L: int
    G: int  # sequences in the group
    start: int | None  # dense group: its tokens are flat rows start:start + G * L, in order
    rows: torch.Tensor | None  # int64 [G * L]: flat token row of every padded slot (not dense)
    sel: torch.Tensor | None  # int64 [n_real]: the real slots among the G * L (not dense)
    dst: torch.Tensor | None  # int64 [n_real]: their flat token rows (each token exactly once)
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
    scratch: dict = field(default_factory=dict)  # dtype -> flat buffer for one group's A / dA

    def score_buffer(self, g: _Group, heads: int, like: torch.Tensor) -> torch.Tensor:
        """A [G * H, L, L] buffer for group g's A (then dA) in the backward, shared by every
        group and layer of this plan: one allocation per step instead of one per group and
        layer (each fresh [G, L, L] block costs page faults as well as memory)."""
        n = g.G * heads * g.L * g.L
        buf = self.scratch.get(like.dtype)
        if buf is None or buf.numel() < n:
            most = max(x.G * heads * x.L * x.L for x in self.groups)
            buf = self.scratch[like.dtype] = like.new_empty(most)
        return buf[:n].view(g.G * heads, g.L, g.L)


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


def _dense_start(members: list[int], L: int, lengths: list[int], offsets: list[int]):
    """The group's first flat row when its members are consecutive sequences of exactly L
    tokens (the group is then the contiguous rows start:start + G * L), else None."""
    consecutive = members[-1] - members[0] == len(members) - 1
    if consecutive and all(lengths[b] == L for b in members):
        return offsets[members[0]]
    return None


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
    from genrec.models.attention import _allowed_and_positions

    lengths_t = lengths_from_offsets(offsets)
    lengths = checked_lengths(lengths_t, max_seq_len, num_targets)
    if num_time and timestamps is None:
        raise ValueError("hstu_attention: time_bias needs timestamps")
    if norm != "length" and (isinstance(norm, bool) or not isinstance(norm, (int, float))):
        raise ValueError(f"hstu_attention: norm must be 'length' or a number, got {norm!r}")
    dev = offsets.device
    offsets_list = offsets.tolist()
    groups = []
    for members, L in length_groups(lengths, num_heads):
        G = len(members)
        idx_b = torch.tensor(members, dtype=torch.int64, device=dev)
        lens = lengths_t[idx_b]
        start = _dense_start(members, L, lengths, offsets_list)
        if start is None:
            rows, valid = padded_rows(offsets, idx_b, L)
            flat = rows.reshape(-1)
            sel = valid.reshape(-1).nonzero().squeeze(1)
            dst = flat[sel]
            valid_f = valid.to(torch.float32)
        else:
            flat = sel = dst = None
            valid_f = torch.ones(G, L, device=dev)
        inv = 1.0 / lens.clamp_min(1).to(torch.float32) if norm == "length" else 1.0 / norm
        scale = valid_f * (inv[:, None] if norm == "length" else inv)
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
            index = (r * max(num_time, 1)).to(torch.int32)
        if num_time:
            if start is None:
                ts = timestamps[flat].view(G, L)
            else:
                ts = timestamps[start : start + G * L].view(G, L)
            index = _time_index(ts, num_time, index)
        groups.append(_Group(L, G, start, flat, sel, dst, scale[:, :, None, None], index, allowed))
    return AttentionPlan(groups, int(offsets_list[-1]) if offsets_list else 0, num_pos, num_time)


def _time_index(ts: torch.Tensor, num_time: int, pos_index: torch.Tensor | None):
    """int32 [G, L, L]: time_bucket(ts_i - ts_j) (+ pos_index, int32 [G or 1, L, L]) of int64
    timestamps [G, L]. Gaps are taken in int32 when every row spans < 2^31 seconds, and in
    slices of sequences (the gaps are the plan's largest temporaries)."""
    from genrec.models.attention import time_bucket

    G, L = ts.shape
    if G:  # gaps are within a row: each row may start from its own first time
        lo, hi = ts.aminmax(dim=1, keepdim=True)
        if int((hi - lo).max()) < 2**31:
            ts = (ts - lo).to(torch.int32)
    index = torch.empty(G, L, L, dtype=torch.int32, device=ts.device)
    step = max(1, _PLAN_SLICE_ELEMS // (L * L))
    for s in range(0, G, step):
        t, part = ts[s : s + step], index[s : s + step]
        time_bucket(t[:, :, None] - t[:, None, :], num_time, out=part)
        if pos_index is not None:
            part += pos_index if pos_index.shape[0] == 1 else pos_index[s : s + step]
    return index


def bias_table(pos_bias: torch.Tensor | None, time_bias: torch.Tensor | None):
    """The flat [P * NB] table the plan's indices point into (None without biases)."""
    if pos_bias is not None and time_bias is not None:
        return (pos_bias[:, None] + time_bias[None, :]).reshape(-1)
    return pos_bias if pos_bias is not None else time_bias


def _gather(x: torch.Tensor, g: _Group) -> torch.Tensor:
    """The group's rows of jagged [T, H, D] as [G * H, L, D] (a view for a dense group with
    one head)."""
    rows = x[g.start : g.start + g.G * g.L] if g.start is not None else x.index_select(0, g.rows)
    _, H, D = x.shape
    return rows.view(g.G, g.L, H, D).transpose(1, 2).reshape(g.G * H, g.L, D)


def _scatter_(full: torch.Tensor, part: torch.Tensor, g: _Group) -> None:
    """Write the group's real rows of [G * L, H, D] `part` into jagged [T, H, D] `full`."""
    if g.start is not None:
        full[g.start : g.start + g.G * g.L].copy_(part)
    else:
        full.index_copy_(0, g.dst, part.index_select(0, g.sel))


def _bmm_into(full, a, b, g: _Group, scale: torch.Tensor | None = None) -> None:
    """full[group rows] = a @ b for [G * H, L, *] operands, rows times `scale` [G, L, 1, 1]
    when given (written in place when dense with one head: no [G * L, H, D] temporary)."""
    H = full.shape[1]
    if g.start is not None and H == 1 and full.is_contiguous():
        rows = full[g.start : g.start + g.G * g.L].view(g.G, g.L, -1)
        torch.bmm(a, b, out=rows)
        if scale is not None:
            rows.mul_(scale.view(g.G, g.L, 1).to(rows.dtype))
        return
    c = torch.bmm(a, b).view(g.G, H, g.L, -1).transpose(1, 2)
    if scale is not None:
        c = c * scale.to(c.dtype)
    _scatter_(full, c.reshape(g.G * g.L, H, -1), g)


def _mask_(a: torch.Tensor, g: _Group) -> torch.Tensor:
    """Zero the disallowed scores of [G * H, L, L] in place."""
    if g.allowed is None:
        return a.tril_()
    a.view(g.G, -1, g.L, g.L).mul_(g.allowed[:, None])
    return a


def _scores(qg, kg, tab, g: _Group) -> torch.Tensor:
    """[G * H, L, L] Q K^T + rab of one group (rab from the flat bias table): S starts as the
    gathered bias and takes Q K^T in place."""
    if tab is None:
        return torch.bmm(qg, kg.transpose(1, 2))
    GH, L = qg.shape[0], g.L
    bias = tab.index_select(0, g.bias_index.reshape(-1)).view(-1, 1, L, L)
    if bias.shape[0] != g.G or GH != g.G:  # shared over the group or the heads: materialize
        bias = bias.expand(g.G, GH // g.G, L, L).contiguous()
    return bias.view(GH, L, L).baddbmm_(qg, kg.transpose(1, 2))


class _GroupedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, plan: AttentionPlan):
        T, H, _ = q.shape
        out = v.new_empty(T, H, v.shape[-1])  # every token belongs to exactly one group
        tab = table.to(q.dtype) if table is not None else None
        kept = []
        for g in plan.groups:
            qg, kg, vg = _gather(q, g), _gather(k, g), _gather(v, g)
            s = _scores(qg, kg, tab, g)
            kept.append(s)  # for the backward: A and SiLU'(S) come from S
            a = _mask_(F.silu(s), g)  # transient (the backward's buffer is not held here)
            _bmm_into(out, a, vg, g, scale=g.scale)
            del a, s
        ctx.save_for_backward(q, k, v, table if table is not None else q.new_zeros(0))
        ctx.scores, ctx.plan, ctx.has_table = kept, plan, table is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.scores is None:
            raise RuntimeError(
                "hstu_attention (grouped): backward through the same graph twice is not "
                "supported (its scores are freed); run the forward again"
            )
        q, k, v, table = ctx.saved_tensors
        plan, H = ctx.plan, q.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        want_table = ctx.has_table and ctx.needs_input_grad[3]
        dtable = q.new_zeros(table.numel(), dtype=torch.float32) if want_table else None
        dout = dout.contiguous()
        for i, g in enumerate(plan.groups):
            G, L = g.G, g.L
            dog = _gather(dout, g).view(G, H, L, -1) * g.scale.to(dout.dtype).transpose(1, 2)
            dog = dog.view(G * H, L, -1)
            qg, kg, vg = _gather(q, g), _gather(k, g), _gather(v, g)
            s, ctx.scores[i] = ctx.scores[i], None
            a = _mask_(torch.ops.aten.silu.out(s, out=plan.score_buffer(g, H, s)), g)
            _bmm_into(dv, a.transpose(1, 2), dog, g)
            da = torch.bmm(dog, vg.transpose(1, 2), out=a)  # A is spent: its buffer takes dA
            ds = _mask_(torch.ops.aten.silu_backward.grad_input(da, s, grad_input=da), g)
            del s
            _bmm_into(dq, ds, kg, g)
            _bmm_into(dk, ds.transpose(1, 2), qg, g)
            if dtable is not None:
                w = ds.view(G, H, L, L).sum(1) if H > 1 else ds.view(G, L, L)
                if g.bias_index.shape[0] == 1 and G > 1:
                    w = w.sum(0, keepdim=True)
                dtable.index_add_(0, g.bias_index.reshape(-1), w.reshape(-1).float())
            del ds, da, a
        ctx.scores = ctx.plan = None  # the plan (index, scratch) goes with the last layer's
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
