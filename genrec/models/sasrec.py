"""SASRec baseline (Kang & McAuley, 2018): causal softmax Transformer, learned positions.

Same inputs (tokens.py), same losses and the same evaluation API as the HSTU models; only
the encoder differs: blocks of softmax multi-head attention (scaled dot product, causal or
target-aware mask, no relative biases, timestamps unused) and a point-wise feed-forward,
with a learned absolute position embedding added to the tokens. model.sasrec_block picks
the block: "pre_ln", the SASRec paper's (pre-LayerNorm, ReLU feed-forward of width dim), or
"post_ln", the S3-Rec code's BERT block that the published Amazon rows were run with
(post-LayerNorm, GELU feed-forward of width 4 dim without dropout inside it, LayerNorm on
item + position).
model.sasrec_positions picks the positions: "from_start" counts from a sequence's first
event, "from_end" gives the slots of a left-padded max_len row as SASRec's code does (the
newest event whose state is read sits in the last slot; in the jagged rows that is the
event before the final target, in the exported encoder's rows the last event).
Selected by model.kind="sasrec". The jagged forward groups sequences by similar length
and pads each group only to its own longest (the same grouping as the HSTU reference op).
As in SASRec, the input dropout acts on item + position (the token builder's own dropout,
which HSTU uses, is switched off here): dropping the items only and adding clean positions
after fit the training data faster and validated worse (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genrec.config import ModelConfig
from genrec.models.attention import _allowed_and_positions, by_length_groups
from genrec.models.hstu import max_tokens
from genrec.models.ranking import HSTURanking
from genrec.models.retrieval import HSTURetrieval


class SASRecBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(
                f"sasrec: model.dim={cfg.dim} must be divisible by num_heads={cfg.num_heads}"
            )
        self.heads = cfg.num_heads
        self.post_ln = cfg.sasrec_block == "post_ln"
        eps = 1e-12 if self.post_ln else 1e-5  # the S3-Rec code's LayerNorm eps
        ffn_dim = 4 * cfg.dim if self.post_ln else cfg.dim
        self.norm1 = nn.LayerNorm(cfg.dim, eps=eps)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=eps)
        # the SASRec paper drops the feed-forward's hidden units too; the S3-Rec code's
        # Intermediate does not (dense, GELU, dense, then the block's one dropout). Identity
        # keeps the module indices (and checkpoints) the same either way.
        inner = cfg.sasrec_ffn_dropout == "on" or (
            cfg.sasrec_ffn_dropout == "auto" and not self.post_ln
        )
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, ffn_dim),
            nn.GELU() if self.post_ln else nn.ReLU(),
            nn.Dropout(cfg.dropout) if inner else nn.Identity(),
            nn.Linear(ffn_dim, cfg.dim),
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.attn_dropout

    def _attention(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask[:, None],
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        return self.out(a.transpose(1, 2).reshape(B, L, D))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.post_ln:  # BERT's / the S3-Rec code's order
            x = self.norm1(x + self.dropout(self._attention(x, mask)))
            return self.norm2(x + self.dropout(self.ffn(x)))
        x = x + self.dropout(self._attention(self.norm1(x), mask))
        return x + self.dropout(self.ffn(self.norm2(x)))


class SASRecEncoder(nn.Module):
    """Same call signature as HSTUEncoder (jagged and padded); timestamps are ignored."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.capacity = max_tokens(cfg)
        self.from_end = cfg.sasrec_positions == "from_end"
        self.pos_emb = nn.Embedding(self.capacity, cfg.dim)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.num_layers))
        self.heads = cfg.num_heads
        post_ln = cfg.sasrec_block == "post_ln"
        # post_ln: LayerNorm on item + position before the dropout, none after the blocks
        # (each ends in one); pre_ln: none before, one after
        self.input_norm = nn.LayerNorm(cfg.dim, eps=1e-12) if post_ln else nn.Identity()
        self.final_norm = nn.Identity() if post_ln else nn.LayerNorm(cfg.dim)
        self.input_dropout = nn.Dropout(cfg.dropout)  # on item + position, as SASRec's
        for m in self.blocks.modules():  # SASRec's (S3-Rec code's) init: N(0, 0.02), zero bias
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_padded(
        self,
        x: torch.Tensor,  # [B, L, D]
        lengths: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        num_targets: torch.Tensor | None = None,
        trailing: int = 0,
    ) -> torch.Tensor:
        """`trailing`: tokens at each row's end that are targets only, never read (the
        jagged training and scoring rows end in one; the exported encoder reads its last)."""
        L = x.shape[1]
        lengths = lengths.to(torch.int64)
        allowed, pos = _allowed_and_positions(lengths, L, num_targets)
        if self.from_end:  # the newest token read takes the last slot of a max_len row
            pos = pos + (self.capacity - (lengths - trailing))[:, None]
        pos = pos.clamp(0, self.capacity - 1)
        eye = torch.eye(L, dtype=torch.bool, device=x.device)[None]
        mask = allowed | eye  # padding rows attend to themselves (no all-masked NaN rows)
        x = self.input_dropout(self.input_norm(x + self.pos_emb(pos)))
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        max_seq_len: int,
        timestamps: torch.Tensor | None = None,
        num_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # sequences grouped by similar length, each group padded only to its own longest
        # (Amazon histories average ~9 events under max_len 50: ~4x fewer padded tokens)
        # retrieval rows end in a target whose state nobody reads (ranking, whose candidates
        # come as num_targets, keeps from_start positions)
        def group(rows: torch.Tensor, lens: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
            nt = num_targets[idx_b] if num_targets is not None else None
            return self.forward_padded(x[rows], lens, None, nt, trailing=int(nt is None))

        out = by_length_groups(offsets, self.heads, group)
        return out if out is not None else self.final_norm(x)


class _SASRecModel:
    """The SASRec encoder in an HSTU task model: its tokens go in undropped (the encoder
    drops after adding positions)."""

    def make_encoder(self, cfg: ModelConfig) -> nn.Module:
        self.tokens.dropout = nn.Identity()
        return SASRecEncoder(cfg)


class SASRecRetrieval(_SASRecModel, HSTURetrieval):
    pass


class SASRecRanking(_SASRecModel, HSTURanking):
    def make_encoder(self, cfg: ModelConfig) -> nn.Module:
        if cfg.sasrec_positions == "from_end":
            raise ValueError(
                "model.sasrec_positions=from_end is for retrieval (SASRec's next-item slots); "
                "ranking candidates share one position after the history: use from_start"
            )
        return super().make_encoder(cfg)
