"""Generative retrieval over semantic IDs: the history read as codes, the next item decoded.

`HSTUGenerative(cfg)` (model.task=generative) = `SparseEmbeddings` (what DMP shards) +
the retriever's token builder and HSTU encoder + `CodeDecoder`.

Input. Every item has a code of L tokens (`genrec tokenize`: codes.parquet, L levels plus
the disambiguation token). `ItemCodes` maps raw item ids to codes (sorted ids +
searchsorted, buffers built at assembly; an id without a code fails, counted). An event's
input vector is the sum of its L code-token embeddings, looked up in the table fed by the
`sid` feature (a kind: direct table whose row of level l's code c is offset[l] + c, so
TorchRec shards it like any table), plus its item's own embedding (the item_id table) when
model.generative.item_embedding. One sparse lookup per step.

    event items      [i1,            i2            ]          lengths [2]
    sid values       [o0+c10, o1+c11, o2+c12, o0+c20, ...]    lengths [2 * L]
    input vector     sum_l E[sid(i, l)] (+ E_item[i])   -> TokenBuilder -> HSTU

Output. The encoder's state s_t after event t (the retriever's target positions,
`retrieval.target_events`) predicts the item of event t+1: a causal transformer over
[s_t, e_0(c_0), ..., e_{L-2}(c_{L-2})] (decoder-side code embeddings, a small dense table
of sum(level sizes) rows, replicated: no collective per beam step) emits level l's logits
at position l. Training is teacher-forced: the loss is the item's negative log-likelihood,
the sum over levels of each level's cross-entropy, averaged over target positions.
Decoding is `semantic.beam.beam_search` over the trie of the catalog's codes, so every
result is a real item (`generate`). With model.generative.constrained, each level's softmax
runs over the trie's children of the prefix only, in the loss (`allowed`) and in the beam
(renormalized), so training maximizes the item's probability under constrained decoding.

At T-ECD scale (30M items, 4 code tokens): the id -> code buffers are 30M x (1 + 4) int64 =
1.2 GB on every rank (int32 codes would halve it), the host trie ~2 GB (semantic/beam.py);
per step the cost is one lookup of 4 rows per event in a table of sum(level sizes) rows
(~1k: tiny next to the item table) and the decoder over P x 4 tokens, independent of the
catalog size, as is the beam search (L passes over B x beam_width rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from genrec.config import SID_FEATURE, Config, ConfigError
from genrec.data_pipeline.batch import ITEM_KEY, Batch
from genrec.data_pipeline.model_inputs import ModelInputs
from genrec.embeddings.tables import SparseEmbeddings
from genrec.models.hstu import HSTUEncoder
from genrec.models.retrieval import target_events
from genrec.models.tokens import TokenBuilder
from genrec.semantic.beam import CodeTrie, beam_search


class ItemCodes(nn.Module):
    """Raw item id -> its code [L] (buffers: sorted ids, codes in the same order)."""

    def __init__(self, item_ids: np.ndarray, codes: np.ndarray, source: str = "codes") -> None:
        super().__init__()
        order = np.argsort(item_ids, kind="stable")
        ids = torch.as_tensor(np.asarray(item_ids, dtype=np.int64)[order])
        if ids.numel() > 1 and bool((ids[1:] == ids[:-1]).any()):
            raise ValueError(f"{source}: an item id appears twice; one code per item")
        self.source = source
        # not in the state dict: rebuilt from the codes file (a checkpoint stays model-only)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("codes", torch.as_tensor(codes[order], dtype=torch.int64), False)
        self.level_sizes = [int(c) + 1 for c in codes.max(axis=0)]

    @property
    def levels(self) -> int:
        return len(self.level_sizes)

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        """[n] raw ids -> [n, L] codes; an id without a code fails, counting them."""
        ids = item_ids.to(torch.int64).contiguous()
        pos = torch.searchsorted(self.ids, ids).clamp_max(self.ids.numel() - 1)
        found = self.ids[pos] == ids
        if not bool(found.all()):
            missing = ids[~found]
            raise ValueError(
                f"{int(missing.numel())} of {ids.numel()} item ids in this batch have no "
                f"semantic-ID code in {self.source} (first: {int(missing[0])}). Fix: tokenize "
                "the whole catalog (`genrec tokenize` over vectors of every item)"
            )
        return self.codes[pos]


class CodeDecoder(nn.Module):
    """Causal transformer over [state, e(c_0), .., e(c_{t-1})]: logits of code level t."""

    def __init__(
        self,
        dim: int,
        level_sizes: list[int],
        layers: int,
        heads: int,
        dropout: float,
        temperature: float = 0.0,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.level_sizes = list(level_sizes)
        offsets = np.concatenate([[0], np.cumsum(level_sizes)])
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.int64), False)
        rows = int(offsets[-1])
        self.embed = nn.Embedding(rows, dim)
        nn.init.normal_(self.embed.weight, std=dim**-0.5)
        self.level = nn.Parameter(torch.randn(len(level_sizes), dim) * 0.02)
        block = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, rows)  # level l's logits: columns offsets[l]..offsets[l+1]

    def hidden(self, states: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """states [P, D], prefix [P, t] codes -> [P, t + 1, D] (position l predicts level l)."""
        t = prefix.shape[1]
        x = torch.cat([states[:, None], self.embed(prefix + self.offsets[:t])], dim=1)
        x = x + self.level[: t + 1]
        mask = nn.Transformer.generate_square_subsequent_mask(t + 1, device=x.device)
        return self.norm(self.blocks(x, mask=mask, is_causal=True))

    def level_logits(self, h: torch.Tensor, level: int) -> torch.Tensor:
        """h [..., D] -> [..., V_level]."""
        lo, hi = int(self.offsets[level]), int(self.offsets[level + 1])
        if self.temperature > 0:  # cosine / temperature, as the retriever scores items
            w = F.normalize(self.out.weight[lo:hi], dim=-1)
            return F.normalize(h, dim=-1) @ w.T / self.temperature
        return F.linear(h, self.out.weight[lo:hi], self.out.bias[lo:hi])

    def nll(
        self, states: torch.Tensor, codes: torch.Tensor, allowed: list | None = None
    ) -> torch.Tensor:
        """Teacher-forced: [P] negative log-likelihood of each code [P, L] (sum over levels);
        `allowed`: per level a bool mask [P, V_level] of the codes the softmax runs over."""
        h = self.hidden(states, codes[:, :-1])
        total = 0
        for lv in range(codes.shape[1]):
            logits = self.level_logits(h[:, lv], lv).float()
            if allowed is not None:
                logits = logits.masked_fill(~allowed[lv].to(logits.device), float("-inf"))
            total = total + F.cross_entropy(logits, codes[:, lv], reduction="none")
        return total


@dataclass
class GenerativeOutput:
    loss: torch.Tensor  # scalar: mean item NLL over target positions (0 with grad if none)
    num_targets: int


class HSTUGenerative(nn.Module):
    def __init__(self, cfg: Config, inputs: ModelInputs | None = None) -> None:
        super().__init__()
        self.cfg, self.gcfg = cfg, cfg.model.generative
        if inputs is None or inputs.codes is None:
            raise ValueError(
                "model.task=generative is built from its items' codes: pass "
                "inputs=data_pipeline.model_inputs.read_model_inputs(cfg) (reads "
                "model.generative.codes or PREPARED/semantic/codes.parquet)"
            )
        table = inputs.codes
        self.codes = ItemCodes(table.ids, table.codes, table.source)
        self.sparse = SparseEmbeddings.from_config(cfg, vocabularies=inputs.vocabularies)
        check_sid_table(cfg, self.codes.level_sizes)
        sizes = self.codes.level_sizes
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.register_buffer("sid_offsets", torch.as_tensor(offsets, dtype=torch.int64), False)
        self.item_feature = [ITEM_KEY] if self.gcfg.item_embedding else []
        self.context = list(cfg.model.user_feature_tokens)
        context_dims = {f: self.sparse.feature_dim(f) for f in self.context}
        self.tokens = TokenBuilder(cfg.model, self.sparse.feature_dim(SID_FEATURE), context_dims)
        self.encoder = HSTUEncoder(cfg.model)
        self.decoder = CodeDecoder(
            cfg.model.dim,
            sizes,
            self.gcfg.decoder_layers,
            self.gcfg.decoder_heads,
            self.gcfg.decoder_dropout,
            self.gcfg.temperature,
        )
        self._trie: CodeTrie | None = None

    # ------------------------------------------------------------------ internals

    def _lookup(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """One sparse lookup: (input vector [T, Di] per event, context embeddings)."""
        kjt = batch.features
        lengths = batch.lengths.to(torch.int64)
        sid = (self.codes(batch.item_ids) + self.sid_offsets).reshape(-1)
        keys = [*self.item_feature, SID_FEATURE, *self.context]
        values = [kjt[f].values().to(torch.int64) for f in self.item_feature]
        values.append(sid)
        values += [kjt[f].values().to(torch.int64) for f in self.context]
        L = self.codes.levels
        all_lengths = [lengths] * len(self.item_feature) + [lengths * L]
        all_lengths += [lengths] * len(self.context)
        out = self.sparse(
            KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(all_lengths))
        )
        rows = out[SID_FEATURE].values()
        x = rows.reshape(-1, L, rows.shape[-1]).sum(dim=1)
        if self.item_feature:
            x = x + out[ITEM_KEY].values()
        return x, {f: out[f].values() for f in self.context}

    def _states(
        self, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(state [P, D] before each target, target flat index [P], row [P], encoder out)."""
        x, context = self._lookup(batch)
        tok = self.tokens(
            x, batch.actions, batch.timestamps, batch.lengths, batch.num_targets, context
        )
        out = self.encoder(tok.x, tok.offsets, max(tok.max_len, 1), tok.timestamps)
        tgt, rows = target_events(batch)
        return out[tok.state_index[tgt - 1]], tgt, rows, out

    # ------------------------------------------------------------------ API

    def forward(self, batch: Batch) -> GenerativeOutput:
        states, tgt, _, out = self._states(batch)
        if tgt.numel() == 0:  # every parameter in the graph: DDP/DMP steps stay aligned
            zero = 0.0 * (out.sum() + sum(p.sum() for p in self.decoder.parameters()))
            return GenerativeOutput(zero, 0)
        codes = self.codes(batch.item_ids[tgt])
        allowed = self.allowed(codes) if self.gcfg.constrained else None
        nll = self.decoder.nll(states, codes, allowed)
        return GenerativeOutput(nll.mean(), int(tgt.numel()))

    def trie(self) -> CodeTrie:
        """The trie of every coded item (built once, on the host)."""
        if self._trie is None:
            self._trie = CodeTrie(self.codes.codes.cpu().numpy(), self.codes.ids.cpu().numpy())
        return self._trie

    def allowed(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Per level l, [P, V_l] bool: the codes that continue each code's prefix
        codes[:, :l] to some item (the trie's children of that prefix's node)."""
        trie, codes = self.trie(), codes.cpu()
        nodes = torch.zeros(codes.shape[0], dtype=torch.long)
        out = []
        for lv, size in enumerate(self.codes.level_sizes):
            row, token, child = trie.children(nodes)
            mask = torch.zeros(codes.shape[0], size, dtype=torch.bool)
            mask[row, token] = True
            out.append(mask)
            hit = token == codes[row, lv]
            nodes = torch.zeros_like(nodes).index_copy_(0, row[hit], child[hit])
        return out

    def decode(self, states: torch.Tensor, beam_width: int, top_k: int):
        """Constrained beam search from user states [B, D]: (items [B, top_k], log-probs)."""
        w = beam_width
        rep = states.repeat_interleave(w, dim=0)

        def step(prefix: torch.Tensor) -> torch.Tensor:
            t = prefix.shape[1]
            h = self.decoder.hidden(rep, prefix.to(rep.device))[:, t]
            logits = self.decoder.level_logits(h, t).float().cpu()
            pad = self.trie().vocab - logits.shape[1]
            return F.pad(logits, (0, max(pad, 0)), value=float("-inf"))

        return beam_search(
            step, self.trie(), states.shape[0], w, top_k, renormalize=self.gcfg.constrained
        )

    @torch.no_grad()
    def generate(
        self, batch: Batch, beam_width: int, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per target position: (items [P, top_k] on the host, log-probs, targets [P], target
        flat index [P], sequence row [P])."""
        states, tgt, rows, _ = self._states(batch)
        if tgt.numel() == 0:
            empty = torch.zeros(0, top_k, dtype=torch.int64)
            return empty, empty.float(), batch.item_ids[tgt].cpu(), tgt, rows
        items, scores = self.decode(states, beam_width, top_k)
        return items, scores, batch.item_ids[tgt].cpu(), tgt, rows


def check_sid_table(cfg: Config, level_sizes: list[int]) -> None:
    """The sid table is kind: direct with a row for every level's every code."""
    t = next(t for t in cfg.embeddings.tables if SID_FEATURE in t.features)
    need = sum(level_sizes)
    if t.kind != "direct" or t.num_embeddings < need:
        raise ConfigError(
            f"embeddings table {t.name!r} (feature {SID_FEATURE!r}): expected kind: direct "
            f"with num_embeddings >= {need} (the codes' level sizes {level_sizes} summed), got "
            f"kind: {t.kind} with {t.num_embeddings}; fix the table"
        )


def drop_history(
    batch: Batch, items: torch.Tensor, tgt: torch.Tensor, rows: torch.Tensor, k: int
) -> torch.Tensor:
    """items [P, W] (host) without each position's earlier events, best first: [P, k]
    (-1 where fewer than k remain)."""
    offsets = batch.offsets.to(torch.int64).cpu()
    seq = batch.item_ids.cpu()
    starts, tgt = offsets[rows.cpu()], tgt.cpu()
    n = tgt - starts
    width = max(int(n.max()) if n.numel() else 0, 1)
    ar = torch.arange(width)
    idx = (starts[:, None] + ar[None, :]).clamp_max(max(seq.numel() - 1, 0))
    hist = torch.where(ar[None, :] < n[:, None], seq[idx], torch.full_like(idx, -1))
    seen = (items[:, :, None] == hist[:, None, :]).any(dim=2) | (items < 0)
    order = torch.argsort(seen.to(torch.int8), dim=1, stable=True)[:, :k]
    kept = torch.gather(items, 1, order)
    return torch.where(torch.gather(seen, 1, order), torch.full_like(kept, -1), kept)
