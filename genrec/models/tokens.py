"""Input tokens of the encoder: items, actions, contextual tokens, timestamps.

Per sequence the token layout is

    [ctx_1 .. ctx_C]  then the events, either
    sum:        one token per event, proj(item) + action_emb(action)
    interleave: two tokens per event, proj(item) then action_emb(action)   (as in HSTU)

With model.use_actions=false the action embedding is held at zero (frozen), so a token is
its item's projection alone: for logs with a single action, where the embedding would be a
learnable constant on every token (SASRec has none).

Ranking candidates (the last num_targets events when `candidates=True`) never show their
action: in sum mode their token is proj(item) + action_emb(UNKNOWN), in interleave mode
they get an item token only. Candidates are appended after the history, so the token
sequence is ctx + history tokens + one token per candidate.

Which token's output is read:
- retrieval predicts the item of event t+1 from the "state" token of event t: the event
  token (sum) or its action token (interleave), i.e. after seeing item and action of t;
- ranking predicts a candidate's actions from that candidate's (item) token.

Contextual tokens (`model.user_feature_tokens`): one per listed feature, the mean of that
feature's embeddings over the sequence's history events (never its targets, so nothing
leaks), plus a learned per-feature type vector; prepended, timestamped with the first event.
Every token carries its event's timestamp, which feeds rab^t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genrec.config import ModelConfig


@dataclass
class Tokens:
    x: torch.Tensor  # [T_tok, D]
    offsets: torch.Tensor  # int64 [B+1]
    max_len: int
    timestamps: torch.Tensor  # int64 [T_tok]
    num_targets: torch.Tensor | None  # int64 [B] candidate tokens (ranking) or None
    state_index: torch.Tensor  # int64 [T_events]: token read for event e


@dataclass
class TokenSizes:
    """What the token layout's shapes depend on, as Python ints: passing them (the trainer
    computes them on the host, `TokenBuilder.sizes`) saves the device reads of them."""

    events: int  # sum of lengths
    total: int  # tokens in all
    max_len: int  # tokens of the longest sequence (0 without sequences)
    all_nonempty: bool  # every sequence has an event


def _local_index(lengths: torch.Tensor, total: int | None = None):
    """(sequence row, index within the sequence) of every flat element (`total`: their
    number, when known: no device read)."""
    total = int(lengths.sum()) if total is None else total
    rows = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=total
    )
    starts = torch.cumsum(lengths, 0) - lengths
    return rows, torch.arange(total, device=lengths.device) - starts[rows]


class TokenBuilder(nn.Module):
    def __init__(self, cfg: ModelConfig, item_dim: int, context_dims: dict[str, int]) -> None:
        super().__init__()
        self.mode = cfg.token_mode
        self.num_actions = cfg.num_actions
        self.context = list(cfg.user_feature_tokens)
        self.item_proj = nn.Linear(item_dim, cfg.dim) if item_dim != cfg.dim else nn.Identity()
        self.action_emb = nn.Embedding(cfg.num_actions + 1, cfg.dim)  # last row: UNKNOWN
        if cfg.action_init_std != 1.0:  # 1.0 is nn.Embedding's own N(0, 1): no second draw
            nn.init.normal_(self.action_emb.weight, std=cfg.action_init_std)
        if not cfg.use_actions:  # zero and frozen: the same tokens, export paths included
            if self.mode == "interleave":
                raise ValueError(
                    "model.use_actions=false needs model.token_mode=sum: in interleave mode "
                    "the action token is the state token the model reads"
                )
            nn.init.zeros_(self.action_emb.weight)
            self.action_emb.weight.requires_grad_(False)
        self.context_proj = nn.ModuleDict(
            {f: nn.Linear(context_dims[f], cfg.dim) for f in self.context}
        )
        self.context_type = nn.Parameter(torch.zeros(len(self.context), cfg.dim))
        nn.init.normal_(self.context_type, std=0.02)
        self.dropout = nn.Dropout(cfg.dropout)

    def check_actions(self, actions: torch.Tensor) -> None:
        if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= self.num_actions):
            raise ValueError(
                f"action codes must lie in [0, {self.num_actions}) (model.num_actions), got "
                f"[{int(actions.min())}, {int(actions.max())}]; raise model.num_actions or "
                "fix the source's action mapping"
            )

    def _token_lengths(self, lengths: torch.Tensor, num_targets: torch.Tensor, candidates: bool):
        """(tokens per sequence [B], candidates per sequence [B])."""
        has_ctx = (lengths > 0).to(torch.int64) * len(self.context)
        n_cand = num_targets if candidates else torch.zeros_like(lengths)
        per_event = 2 if self.mode == "interleave" else 1
        return has_ctx + per_event * (lengths - n_cand) + n_cand, n_cand

    def sizes(
        self,
        actions: torch.Tensor,
        lengths: torch.Tensor,
        num_targets: torch.Tensor,
        candidates: bool = False,
    ) -> TokenSizes:
        """The batch's `TokenSizes` (read on the host when the batch is there), after
        checking its action codes."""
        self.check_actions(actions)
        lengths, num_targets = lengths.to(torch.int64), num_targets.to(torch.int64)
        tok_len, _ = self._token_lengths(lengths, num_targets, candidates)
        return TokenSizes(
            events=int(lengths.sum()),
            total=int(tok_len.sum()),
            max_len=int(tok_len.max()) if lengths.numel() else 0,
            all_nonempty=bool((lengths > 0).all()),
        )

    def forward(
        self,
        item_emb: torch.Tensor,  # [T_events, Di]
        actions: torch.Tensor,  # [T_events]
        timestamps: torch.Tensor,  # [T_events]
        lengths: torch.Tensor,  # [B]
        num_targets: torch.Tensor,  # [B]
        context_emb: dict[str, torch.Tensor] | None = None,  # feature -> [T_events, Df]
        candidates: bool = False,
        sizes: TokenSizes | None = None,  # `sizes(...)` of this batch (None: read here)
    ) -> Tokens:
        if sizes is None:
            sizes = self.sizes(actions, lengths, num_targets, candidates)
        lengths = lengths.to(torch.int64)
        num_targets = num_targets.to(torch.int64)
        device = item_emb.device
        B, C = lengths.numel(), len(self.context)
        rows, t = _local_index(lengths, sizes.events)
        hist = lengths - num_targets  # history events per sequence
        is_cand = (t >= hist[rows]) if candidates else torch.zeros_like(t, dtype=torch.bool)
        tok_len, n_cand = self._token_lengths(lengths, num_targets, candidates)
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(tok_len, 0)])
        has_ctx = (lengths > 0).to(torch.int64) * C
        base = offsets[:-1][rows] + has_ctx[rows]
        if self.mode == "interleave":
            h = hist[rows]
            item_tok = torch.where(is_cand, base + 2 * h + (t - h), base + 2 * t)
            state_tok = torch.where(is_cand, item_tok, item_tok + 1)
        else:
            item_tok = state_tok = base + t
        total = sizes.total
        items = self.item_proj(item_emb)
        acts = self.action_emb(torch.where(is_cand, self.num_actions, actions.to(torch.int64)))
        x = items.new_zeros(total, items.shape[-1]).index_add(0, item_tok, items)
        keep = ~is_cand
        x = (
            x.index_add(0, state_tok[keep], acts[keep])
            if self.mode == "interleave"
            else (x.index_add(0, item_tok, acts))
        )
        ts = torch.zeros(total, dtype=torch.int64, device=device)
        ts[item_tok] = timestamps.to(torch.int64)
        ts[state_tok] = timestamps.to(torch.int64)
        if C:
            nonempty = (
                torch.arange(B, device=device)
                if sizes.all_nonempty
                else torch.nonzero(lengths > 0).flatten()
            )
            x, ts = self._add_context(
                x, ts, context_emb or {}, rows, t, hist, lengths, offsets, nonempty
            )
        return Tokens(
            x=self.dropout(x),
            offsets=offsets,
            max_len=sizes.max_len,
            timestamps=ts,
            num_targets=n_cand if candidates else None,
            state_index=state_tok,
        )

    def for_step(
        self, item_rows: torch.Tensor, step, context: dict, candidates: bool = False
    ) -> Tokens:
        """`forward` on a StepBatch's sequences, with the sizes its host stage read."""
        b = step.batch
        return self(
            item_rows,
            b.actions,
            b.timestamps,
            b.lengths,
            b.num_targets,
            context,
            candidates=candidates,
            sizes=step.tokens,
        )

    def _add_context(self, x, ts, context_emb, rows, t, hist, lengths, offsets, nonempty):
        """Write the C contextual tokens at the head of every non-empty sequence (rows
        `nonempty`)."""
        B = lengths.numel()
        in_hist = (t < hist[rows]).to(x.dtype)[:, None]
        count = torch.zeros(B, dtype=x.dtype, device=x.device).index_add(0, rows, in_hist[:, 0])
        first_ts = ts[offsets[:-1][nonempty] + len(self.context)]
        for c, f in enumerate(self.context):
            if f not in context_emb:
                raise ValueError(
                    f"model.user_feature_tokens lists {f!r} but the batch has no such feature; "
                    "add it to the data's context columns and to an embeddings table"
                )
            e = self.context_proj[f](context_emb[f]) * in_hist
            mean = x.new_zeros(B, x.shape[-1]).index_add(0, rows, e) / count.clamp_min(1)[:, None]
            pos = offsets[:-1][nonempty] + c
            x = x.index_add(0, pos, mean[nonempty] + self.context_type[c])
            ts[pos] = first_ts
        return x, ts

    def padded(
        self,
        item_emb: torch.Tensor,  # [B, L, Di], rows at or past lengths[b] are padding
        actions: torch.Tensor,  # [B, L]
        timestamps: torch.Tensor,  # [B, L]
        lengths: torch.Tensor,  # [B], >= 1
        context_emb: list[torch.Tensor] | None = None,  # per feature [B, L, Df]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """History-only tokens of a padded batch: (x [B, L', D], timestamps, token lengths).

        Static shapes only (what torch.export traces); no candidates, all events history.
        """
        B, L = actions.shape
        x = self.item_proj(item_emb)
        acts = self.action_emb(actions.to(torch.int64).clamp(0, self.num_actions - 1))
        ts = timestamps.to(torch.int64)
        tok_len = lengths.to(torch.int64)
        if self.mode == "interleave":
            x = torch.stack([x, acts], dim=2).reshape(B, 2 * L, -1)
            ts = ts.repeat_interleave(2, dim=1)
            tok_len = tok_len * 2
        else:
            x = x + acts
        if self.context:
            if context_emb is None or len(context_emb) != len(self.context):
                raise ValueError(f"encode_last needs one context tensor per {self.context}")
            valid = (torch.arange(L, device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
            denom = valid.sum(1, keepdim=True).clamp_min(1)
            ctx = [
                (self.context_proj[f](e) * valid[..., None]).sum(1) / denom + self.context_type[c]
                for c, (f, e) in enumerate(zip(self.context, context_emb))
            ]
            x = torch.cat([torch.stack(ctx, dim=1), x], dim=1)
            ts = torch.cat([ts[:, :1].expand(B, len(self.context)), ts], dim=1)
            tok_len = tok_len + len(self.context)
        return self.dropout(x), ts, tok_len
