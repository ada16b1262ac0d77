"""HSTU layers (Zhai et al., 2024) over jagged token tensors, and the encoder stack.

One layer, for tokens x [T, D] of B jagged sequences:

    U, V, Q, K = split(SiLU(LN(x) W1))                 per head: Dv, Dv, Dqk, Dqk
    A V        = hstu_attention(Q, K, V, rab^p, rab^t)  SiLU(QK^T + rab) / n, causal
    Y          = W2 dropout(LN(A V) * U) + x

rab^p is a learned scalar per relative position (clamped at the encoder's token capacity)
and rab^t one per log-bucketed time gap (`time_bucket`); both are per layer and shared
across heads. `attn_dropout` drops elements of A V (the fused op has no per-weight dropout).

The same layers run on padded [B, L, D] batches (`forward_padded`), which is what export
traces; the jagged path is what training uses.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from genrec.config import ModelConfig
from genrec.models.attention import attention_plan, hstu_attention, hstu_attention_padded


def max_tokens(cfg: ModelConfig) -> int:
    """Longest token sequence the encoder sees: events (x2 when interleaved) + context."""
    per_event = 2 if cfg.token_mode == "interleave" else 1
    return cfg.max_len * per_event + len(cfg.user_feature_tokens)


def attention_norm(cfg: ModelConfig) -> str | float:
    """n of the op. "length" divides by the row's full token count, so a state also depends
    on how many events FOLLOW it in the batch row (train/serve skew: at serving the row ends
    at the state). "constant" divides by the encoder capacity and is strictly causal."""
    return "length" if cfg.attn_norm == "length" else float(max_tokens(cfg))


class _Recomputed:
    """Saved-tensor hooks for one layer's forward: a tensor registered with `register(t, fn)`
    is not kept for the backward when autograd saves it (or a view of it); its geometry is,
    and the view is rebuilt from fn(), the whole tensor recomputed from inputs that are kept
    anyway. The layer registers uvqk = SiLU(pre) (Q, K, V saved by the attention, U by the
    gate: rebuilt as SiLU(pre), the forward's own pass, from pre, which SiLU's backward
    keeps) and its two LayerNorm outputs (saved by W1 and by the gate: rebuilt from the
    LayerNorms' inputs). Between forward and backward a layer then holds pre instead of
    pre + uvqk + two [T, D] blocks; the recomputations are the forward's elementwise /
    LayerNorm passes, so the values are bitwise the same. Registered tensors stay referenced
    while the hooks are active, so no other tensor can take their address and be mistaken
    for them."""

    def __init__(self) -> None:
        self.fns: dict[int, _Rebuilt] = {}
        self.alive: list[torch.Tensor] = []

    @contextlib.contextmanager
    def active(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            try:
                yield self
            finally:
                self.fns, self.alive = {}, []

    def register(self, t: torch.Tensor, fn) -> torch.Tensor:
        self.fns[t.untyped_storage().data_ptr()] = _Rebuilt(fn)
        self.alive.append(t)
        return t

    def _pack(self, t: torch.Tensor):
        rebuilt = self.fns.get(t.untyped_storage().data_ptr())
        if rebuilt is None:
            return t
        rebuilt.pending += 1
        return (rebuilt, t.shape, t.stride(), t.storage_offset())

    @staticmethod
    def _unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        rebuilt, *geometry = saved
        with torch.no_grad():
            return rebuilt.view(*geometry)


class _Rebuilt:
    """One registered tensor in the backward: fn() runs at the first unpack of any of its
    saved views (U, V, Q, K: one SiLU pass over pre instead of one per piece) and is shared
    by the views unpacked after it; the cache is dropped with the last pending one (a second
    backward through a retained graph recomputes)."""

    def __init__(self, fn) -> None:
        self.fn, self.value, self.pending = fn, None, 0

    def view(self, shape, stride, offset) -> torch.Tensor:
        if self.value is None:
            self.value = self.fn()
        out = self.value.as_strided(shape, stride, offset)
        self.pending -= 1
        if self.pending <= 0:
            self.value = None
        return out


class _SiLUSplit(torch.autograd.Function):
    """split(SiLU(pre), sizes) whose backward writes the pieces' gradients into one block and
    takes SiLU' in place: one [T, 2 Dv + 2 Dqk] allocation in the backward instead of two
    (autograd's split backward concatenates, then SiLU's backward allocates again)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, sizes: list[int]):
        ctx.save_for_backward(pre)
        return tuple(F.silu(pre).split(sizes, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        (pre,) = ctx.saved_tensors
        g = torch.cat(grads, dim=-1)
        return torch.ops.aten.silu_backward.grad_input(g, pre, grad_input=g), None


class HSTULayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h = cfg.dim, cfg.num_heads
        self.num_heads, self.dqk, self.dv = h, cfg.attn_dim, cfg.linear_dim
        self.norm_in = nn.LayerNorm(d)
        self.w1 = nn.Linear(d, h * (2 * cfg.linear_dim + 2 * cfg.attn_dim))
        self.norm_attn = nn.LayerNorm(h * cfg.linear_dim)
        self.w2 = nn.Linear(h * cfg.linear_dim, d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = nn.Dropout(cfg.attn_dropout)
        self.pos_bias = nn.Parameter(torch.zeros(max_tokens(cfg))) if cfg.rab_position else None
        self.time_bias = nn.Parameter(torch.zeros(cfg.num_time_buckets)) if cfg.rab_time else None
        self.norm = attention_norm(cfg)

    def _project(self, x: torch.Tensor, rec: _Recomputed | None = None) -> tuple:
        """U, V, Q, K; with `rec` (training), registered for recomputation in the backward."""
        lead = x.shape[:-1]
        normed = self.norm_in(x)
        hv, hq = self.num_heads * self.dv, self.num_heads * self.dqk
        sizes = [hv, hv, hq, hq]
        if rec is None:
            u, v, q, k = torch.split(F.silu(self.w1(normed)), sizes, dim=-1)
        else:
            rec.register(normed, lambda x=x: self.norm_in(x))
            pre = self.w1(normed)
            u, v, q, k = _SiLUSplit.apply(pre, sizes)
            rec.register(u, lambda pre=pre: F.silu(pre))
        v = v.reshape(*lead, self.num_heads, self.dv)
        q = q.reshape(*lead, self.num_heads, self.dqk)
        k = k.reshape(*lead, self.num_heads, self.dqk)
        return u, v, q, k

    def _output(self, x, u, av, rec: _Recomputed | None = None) -> torch.Tensor:
        av = self.attn_dropout(av.reshape(*x.shape[:-1], -1))
        normed = self.norm_attn(av)
        if rec is not None:
            rec.register(normed, lambda av=av: self.norm_attn(av))
        return x + self.w2(self.dropout(normed * u))

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        max_seq_len: int,
        timestamps: torch.Tensor | None,
        num_targets: torch.Tensor | None = None,
        plan=None,
    ) -> torch.Tensor:
        """plan: `self.plan(...)` of this batch (from any layer of the same encoder)."""
        rec = _Recomputed() if torch.is_grad_enabled() else None
        with rec.active() if rec is not None else contextlib.nullcontext():
            u, v, q, k = self._project(x, rec)
            av = hstu_attention(
                q,
                k,
                v,
                offsets,
                max_seq_len,
                timestamps=timestamps if self.time_bias is not None else None,
                pos_bias=self.pos_bias,
                time_bias=self.time_bias,
                num_targets=num_targets,
                norm=self.norm,
                plan=plan,
            )
            return self._output(x, u, av, rec)

    def plan(
        self,
        offsets: torch.Tensor,
        max_seq_len: int,
        timestamps: torch.Tensor | None,
        num_targets: torch.Tensor | None = None,
    ):
        """The attention op's layout work for this batch (None where the op plans nothing)."""
        return attention_plan(
            offsets,
            max_seq_len,
            self.num_heads,
            timestamps,
            self.pos_bias,
            self.time_bias,
            num_targets,
            self.norm,
        )

    def forward_padded(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        timestamps: torch.Tensor | None,
        num_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        u, v, q, k = self._project(x)
        av = hstu_attention_padded(
            q,
            k,
            v,
            lengths,
            timestamps=timestamps if self.time_bias is not None else None,
            pos_bias=self.pos_bias,
            time_bias=self.time_bias,
            num_targets=num_targets,
            norm=self.norm,
        )
        return self._output(x, u, av)


class HSTUEncoder(nn.Module):
    """A stack of HSTU layers plus a final LayerNorm; jagged in, jagged out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        for name in ("num_layers", "num_heads", "attn_dim", "linear_dim", "dim", "max_len"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(cfg, name)}")
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.dim)
        self.capacity = max_tokens(cfg)

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        max_seq_len: int,
        timestamps: torch.Tensor | None,
        num_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # every layer has the same heads, bias sizes and norm: one plan serves the stack
        plan = self.layers[0].plan(offsets, max_seq_len, timestamps, num_targets)
        for layer in self.layers:
            x = layer(x, offsets, max_seq_len, timestamps, num_targets, plan=plan)
        return self.final_norm(x)

    def forward_padded(
        self,
        x: torch.Tensor,  # [B, L, D]
        lengths: torch.Tensor,  # [B]
        timestamps: torch.Tensor | None,  # [B, L]
        num_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer.forward_padded(x, lengths, timestamps, num_targets)
        return self.final_norm(x)
