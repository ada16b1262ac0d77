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

With a bias table the mask rides on the index: every disallowed (i, j) points at one extra
table entry holding half the dtype's lowest value, so SiLU(S) and its gradient are exactly
(-)0 there and no mask pass runs over the scores. Single-threaded, groups of >= 96 tokens
run as 2 row blocks (queries r0:r1 against keys 0:r1, `row_blocks`): the all-masked quarter
of the scores is never computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from genrec.models.jagged import length_groups, lengths_from_offsets, padded_rows

_PLAN_SLICE_ELEMS = 1 << 23  # (i, j) pairs whose time gaps are built at once
ROW_BLOCK_MIN_L = 96  # groups this long are split in row blocks (`row_blocks`) ...
ROW_BLOCK_MAX_THREADS = 1  # ... when torch runs at most this many intra-op threads


@dataclass
class _Group:
    L: int
    G: int  # sequences in the group
    start: int | None  # dense group: its tokens are flat rows start:start + G * L, in order
    rows: torch.Tensor | None  # int64 [G * L]: flat token row of every padded slot (not dense)
    sel: torch.Tensor | None  # int64 [n_real]: the real slots among the G * L (not dense)
    dst: torch.Tensor | None  # int64 [n_real]: their flat token rows (each token exactly once)
    scale: torch.Tensor  # float32 [G, L, 1, 1]: 1 / N on real slots, 0 on padding
    blocks: list[tuple[int, int]]  # row blocks (r0, r1): queries r0:r1 against keys 0:r1
    bias_index: list[torch.Tensor] | None  # per block int32 [G or 1, r1 - r0, r1]
    allowed: list[torch.Tensor] | None  # per block bool [G, r1 - r0, r1]; None: causal
    masked_by_index: bool = False  # disallowed scores index the table's masking entry


@dataclass
class AttentionPlan:
    """The layout-only part of the op for one batch (see `plan_attention`)."""

    groups: list[_Group]
    num_tokens: int
    num_pos: int  # rows of pos_bias the indices assume (0: no position bias)
    num_time: int  # entries of time_bias the indices assume (0: no time bias)
    scratch: dict = field(default_factory=dict)  # dtype -> flat buffer for one group's A / dA

    def score_buffer(self, like: torch.Tensor, heads: int) -> torch.Tensor:
        """A buffer shaped like one block's scores `like` ([G * H, r1 - r0, r1]) for its A,
        then dA, shared by every block, group and layer of this plan (forward and backward):
        one allocation per step instead of one per block and layer (each fresh [G, L, L]
        block costs page faults as well as memory)."""
        buf = self.scratch.get(like.dtype)
        if buf is None or buf.numel() < like.numel():
            most = max(x.G * (r1 - r0) * r1 for x in self.groups for r0, r1 in x.blocks)
            buf = self.scratch[like.dtype] = like.new_empty(most * heads)
        return buf[: like.numel()].view_as(like)


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


def row_blocks(L: int) -> list[tuple[int, int]]:
    """The row blocks of an L-token group: queries r0:r1 meet keys 0:r1 only (causal and
    target-aware masks allow no j > i), so the all-masked (early query, late key) block is
    never computed: 2 blocks skip 1/4 of the scores and products. Short groups stay one
    block, and so does every group with several intra-op threads: a block adds ~16 ops per
    layer and step, and with 2 threads on a loaded box each op costs a thread hand-off that
    outweighs the flops (RESULTS.md, issue 22 continued: 1 thread, 2 blocks 12 % faster than
    1; 2 threads, 28 % slower). Never more than 2 blocks (3 were slower at either count)."""
    if L < ROW_BLOCK_MIN_L or torch.get_num_threads() > ROW_BLOCK_MAX_THREADS:
        return [(0, L)]
    return [(0, L // 2), (L // 2, L)]


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
        blocks = row_blocks(L)
        allowed = pos = None
        if num_targets is not None:
            mask, pos = _allowed_and_positions(lens, L, num_targets[idx_b])
            allowed = [mask[:, r0:r1, :r1].contiguous() for r0, r1 in blocks]
        if num_time:
            ts = timestamps[flat] if start is None else timestamps[start : start + G * L]
            ts = _rebased(ts.view(G, L))
        index = None
        if num_pos or num_time:
            index = [
                _bias_index(r0, r1, L, pos, ts if num_time else None, num_pos, num_time, dev)
                for r0, r1 in blocks
            ]
            _mask_index_(index, blocks, allowed, max(num_pos, 1) * max(num_time, 1))
            allowed = None
        group = _Group(L, G, start, flat, sel, dst, scale[:, :, None, None], blocks, index, allowed)
        group.masked_by_index = index is not None
        groups.append(group)
    return AttentionPlan(groups, int(offsets_list[-1]) if offsets_list else 0, num_pos, num_time)


def _mask_index_(index, blocks, allowed, masked_entry: int) -> None:
    """Point every disallowed score of the blocks' indices at `masked_entry`, the bias
    table's extra last entry (`_masked_bias`): SiLU(S) and its gradient are then exactly
    (-)0 there, with no mask pass over the scores in either direction."""
    for b, (r0, r1) in enumerate(blocks):
        if allowed is None:
            ar = torch.arange(r1, device=index[b].device)
            keep = ar[None, :] <= ar[r0:r1, None]  # causal: [r1 - r0, r1], shared by the group
        else:
            keep = allowed[b]
            if index[b].shape[0] != keep.shape[0]:
                index[b] = index[b].expand(keep.shape[0], -1, -1).contiguous()
        index[b].masked_fill_(~keep, masked_entry)


def _rebased(ts: torch.Tensor) -> torch.Tensor:
    """int64 timestamps [G, L] as int32 from each row's first time when every row spans
    < 2^31 seconds (gaps are within a row; int32 gaps bucket ~3x faster), else unchanged."""
    if ts.shape[0]:
        lo, hi = ts.aminmax(dim=1, keepdim=True)
        if int((hi - lo).max()) < 2**31:
            return (ts - lo).to(torch.int32)
    return ts


def _bias_index(r0, r1, L, pos, ts, num_pos, num_time, dev) -> torch.Tensor:
    """int32 [G or 1, r1 - r0, r1]: the flat bias-table index of the scores of queries r0:r1
    against keys 0:r1: position row (pos [G, L] with targets, else the query's index) times
    num_time, plus time_bucket(ts_i - ts_j) (ts [G, L] or None). Time gaps are built in
    slices of sequences (they are the plan's largest temporaries)."""
    from genrec.models.attention import time_bucket

    pos_index = None
    if num_pos:
        if pos is None:
            ar = torch.arange(L, device=dev)
            r = (ar[r0:r1, None] - ar[None, :r1])[None]  # [1, r1 - r0, r1]
        else:
            r = pos[:, r0:r1, None] - pos[:, None, :r1]
        pos_index = (r.clamp(0, num_pos - 1) * max(num_time, 1)).to(torch.int32)
    if ts is None:
        return pos_index
    G = ts.shape[0]
    index = torch.empty(G, r1 - r0, r1, dtype=torch.int32, device=ts.device)
    step = max(1, _PLAN_SLICE_ELEMS // ((r1 - r0) * r1))
    for s in range(0, G, step):
        t, part = ts[s : s + step], index[s : s + step]
        time_bucket(t[:, r0:r1, None] - t[:, None, :r1], num_time, out=part)
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


def _in_place(full: torch.Tensor, g: _Group) -> bool:
    """Whether the group's [G * H, L, D] result can be a view of jagged [T, H, D] `full`."""
    return g.start is not None and full.shape[1] == 1 and full.is_contiguous()


def _target(full: torch.Tensor, g: _Group) -> torch.Tensor:
    """Where the group's [G * H, L, D] result is written block by block: the jagged output
    itself (a view) when the group is dense with one head, else a fresh block that
    `_finish_` scatters."""
    if _in_place(full, g):
        return full[g.start : g.start + g.G * g.L].view(g.G, g.L, -1)
    return full.new_empty(g.G * full.shape[1], g.L, full.shape[-1])


def _finish_(full: torch.Tensor, c: torch.Tensor, g: _Group, scale=None) -> None:
    """Rows of the group's result `c` (from `_target`) times `scale` [G, L, 1, 1] when given,
    into jagged [T, H, D] `full` (in place when c is already its view)."""
    H = full.shape[1]
    if _in_place(full, g):
        if scale is not None:
            c.mul_(scale.view(g.G, g.L, 1).to(c.dtype))
        return
    c = c.view(g.G, H, g.L, -1).transpose(1, 2)
    if scale is not None:
        c = c * scale.to(c.dtype)
    part = c.reshape(g.G * g.L, H, -1)
    if g.start is not None:
        full[g.start : g.start + g.G * g.L].copy_(part)
    else:
        full.index_copy_(0, g.dst, part.index_select(0, g.sel))


def _mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """out (+)= a @ b for [N, m, k] x [N, k, n]. A strided `out` (a row block's slice) takes
    a contiguous product: aten's bmm / baddbmm_ into a strided view loop over the batch in
    tiny parallel sections, ~100x slower at 2 threads on a loaded box."""
    if not out.is_contiguous():
        c = torch.bmm(a, b)
        out.add_(c) if accumulate else out.copy_(c)
    elif accumulate:
        out.baddbmm_(a, b)
    else:
        torch.bmm(a, b, out=out)


def _mask_(a: torch.Tensor, g: _Group, b: int) -> torch.Tensor:
    """Zero the disallowed scores of block b's [G * H, r1 - r0, r1] in place (nothing to do
    when the bias index carries the mask)."""
    r0, r1 = g.blocks[b]
    if g.masked_by_index:
        return a
    if g.allowed is None:
        return a.tril_(r0)  # query r0 + i sees keys j <= r0 + i
    a.view(g.G, -1, r1 - r0, r1).mul_(g.allowed[b][:, None])
    return a


def _scores(qb, kb, tab, g: _Group, b: int) -> torch.Tensor:
    """Block b's [G * H, r1 - r0, r1] Q K^T + rab (rab from the flat bias table): S starts as
    the gathered bias and takes Q K^T in place."""
    if tab is None:
        return torch.bmm(qb, kb.transpose(1, 2))
    GH, m, n = qb.shape[0], qb.shape[1], kb.shape[1]
    index = g.bias_index[b]
    bias = tab.index_select(0, index.reshape(-1)).view(-1, 1, m, n)
    if bias.shape[0] != g.G or GH != g.G:  # shared over the group or the heads: materialize
        bias = bias.expand(g.G, GH // g.G, m, n).contiguous()
    return bias.view(GH, m, n).baddbmm_(qb, kb.transpose(1, 2))


def _masked_bias(dtype: torch.dtype) -> float:
    """The bias of a disallowed score: half the dtype's lowest finite value, so that
    S = bias + <q, k> stays finite, SiLU(S) = S / (1 + exp(-S)) is exactly -0 and so is
    SiLU'(S) * dA."""
    return torch.finfo(dtype).min / 2


class _GroupedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, plan: AttentionPlan):
        T, H, _ = q.shape
        out = v.new_empty(T, H, v.shape[-1])  # every token belongs to exactly one group
        tab = None
        if table is not None:  # plus the masking entry (`_mask_index_`)
            masked = table.new_full((1,), _masked_bias(q.dtype), dtype=q.dtype)
            tab = torch.cat([table.to(q.dtype), masked])
        kept = []
        for g in plan.groups:
            qg, kg, vg = _gather(q, g), _gather(k, g), _gather(v, g)
            og = _target(out, g)
            for b, (r0, r1) in enumerate(g.blocks):
                s = _scores(qg[:, r0:r1], kg[:, :r1], tab, g, b)
                kept.append(s)  # for the backward: A and SiLU'(S) come from S
                a = _mask_(torch.ops.aten.silu.out(s, out=plan.score_buffer(s, H)), g, b)
                _mm(og[:, r0:r1], a, vg[:, :r1])
            _finish_(out, og, g, scale=g.scale)
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
        dtable = q.new_zeros(table.numel() + 1, dtype=torch.float32) if want_table else None
        dout = dout.contiguous()
        kept = iter(range(len(ctx.scores)))
        for g in plan.groups:
            G, L = g.G, g.L
            dog = _gather(dout, g).view(G, H, L, -1) * g.scale.to(dout.dtype).transpose(1, 2)
            dog = dog.view(G * H, L, -1)
            qg, kg, vg = _gather(q, g), _gather(k, g), _gather(v, g)
            dqg, dkg, dvg = _target(dq, g), _target(dk, g), _target(dv, g)
            order = [next(kept) for _ in g.blocks]
            # the last block meets every key: it writes dK and dV, earlier blocks add to them
            for b in reversed(range(len(g.blocks))):
                r0, r1 = g.blocks[b]
                s, ctx.scores[order[b]] = ctx.scores[order[b]], None
                a = _mask_(torch.ops.aten.silu.out(s, out=plan.score_buffer(s, H)), g, b)
                first = b == len(g.blocks) - 1
                _mm(dvg[:, :r1], a.transpose(1, 2), dog[:, r0:r1], accumulate=not first)
                da = torch.bmm(dog[:, r0:r1], vg[:, :r1].transpose(1, 2), out=a)  # A is spent
                ds = _mask_(torch.ops.aten.silu_backward.grad_input(da, s, grad_input=da), g, b)
                del s
                _mm(dqg[:, r0:r1], ds, kg[:, :r1])
                _mm(dkg[:, :r1], ds.transpose(1, 2), qg[:, r0:r1], accumulate=not first)
                if dtable is not None:
                    m = r1 - r0
                    w = ds.view(G, H, m, r1).sum(1) if H > 1 else ds.view(G, m, r1)
                    index = g.bias_index[b]
                    if index.shape[0] == 1 and G > 1:
                        w = w.sum(0, keepdim=True)
                    dtable.index_add_(0, index.reshape(-1), w.reshape(-1).float())
                del ds, da, a
            for full, part in ((dq, dqg), (dk, dkg), (dv, dvg)):
                _finish_(full, part, g)
        ctx.scores = ctx.plan = None  # the plan (index, scratch) goes with the last layer's
        if dtable is not None:
            dtable = dtable[:-1].to(table.dtype)  # the masking entry takes no gradient
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
