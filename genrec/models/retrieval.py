"""Generative retrieval: next-item prediction at every target position, sampled softmax.

`HSTURetrieval(cfg)` = `SparseEmbeddings` (the only TorchRec part; DMP shards `sparse.ec`)
+ token builder + encoder. A forward step does exactly ONE sparse lookup: the batch's
sequences and the step's sampled negatives travel in one KJT (the negatives are one extra
"sample" of the item_id key, every other key has length 0 there), so every rank runs the
same collectives once per step.

Target positions: event t of sequence b is a target if it is among the last num_targets[b]
events and t >= 1; it is predicted from the state after event t-1 (see `tokens.py`).
Item scores are cosines of L2-normalized user states and item embeddings (the input item
table, projected to model.dim when the table is narrower/wider), divided by temperature;
with retrieval.similarity=dot (SASRec's) they are raw inner products of the same vectors.

Export: `encode_last(item_emb, actions, timestamps, lengths[, context_emb])` takes plain
PADDED tensors ([B, L, ...], the item rows already looked up, so no KJT and no hashing
inside) and returns the (scored) state after each sequence's last event, [B, D]. It has
no data-dependent Python control flow, so torch.export can trace it with B and L dynamic.
The jagged training path groups sequences by length in Python, which export cannot trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from genrec.config import Config, ModelConfig
from genrec.data_pipeline.batch import ITEM_KEY, Batch, StepBatch
from genrec.data_pipeline.model_inputs import ModelInputs
from genrec.embeddings.tables import SparseEmbeddings
from genrec.models.hstu import HSTUEncoder
from genrec.models.losses import bce_one_negative_loss, full_softmax_loss, sampled_softmax_loss
from genrec.models.tokens import TokenBuilder


@dataclass
class RetrievalOutput:
    loss: torch.Tensor  # scalar, mean over target positions (0 with grad when there are none)
    num_targets: int  # target positions in this batch
    num_candidates: int  # columns of the softmax per position


def _target_counts(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lengths, first target event per sequence (>= 1), target positions per sequence)."""
    lengths = batch.lengths.to(torch.int64)
    first = torch.clamp(lengths - batch.num_targets.to(torch.int64), min=1)
    return lengths, first, torch.clamp(lengths - first, min=0)


def target_events(batch: Batch, num: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat index of each target event with a preceding event, its sequence row); `num`:
    how many there are, when known (no device read)."""
    lengths, first, n = _target_counts(batch)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    num = int(n.sum()) if num is None else num
    rows = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=lengths.device), n, output_size=num
    )
    start = torch.repeat_interleave(offsets[:-1] + first, n, output_size=num)
    within = torch.arange(num, device=lengths.device) - torch.repeat_interleave(
        n.cumsum(0) - n, n, output_size=num
    )
    return start + within, rows


def lookup_kjt(batch: Batch, features: list[str], extra_items: torch.Tensor) -> KeyedJaggedTensor:
    """The step's one KJT: batch sequences + `extra_items` as one more item_id sample."""
    kjt = batch.features
    lengths = batch.lengths.to(torch.int64)
    n_extra = lengths.new_tensor([extra_items.numel()])
    zero = lengths.new_zeros(1)
    values, all_lengths = [], []
    for f in features:
        if f not in kjt.keys():
            raise ValueError(f"batch has no feature {f!r} (has {kjt.keys()})")
        values.append(kjt[f].values().to(torch.int64))
        if f == ITEM_KEY:
            values.append(extra_items.to(torch.int64))
        all_lengths += [lengths, n_extra if f == ITEM_KEY else zero]
    return KeyedJaggedTensor(
        keys=features, values=torch.cat(values), lengths=torch.cat(all_lengths)
    )


def sharded_lookups(sparse: SparseEmbeddings, step: StepBatch) -> tuple:
    """(EmbeddingCollection output, managed-collision output), None where there is no such
    collection. Called on attributes of `step`, so TorchRec's pipeline can pipeline them."""
    ec_out = sparse.ec(step.ec_rows) if sparse.ec is not None else None
    mc_out = sparse.mc_ec(step.mc_rows)[0] if sparse.mc_ec is not None else None
    return ec_out, mc_out


def step_rows(sparse: SparseEmbeddings, features: list[str], step: StepBatch, ec_out, mc_out):
    """(sequence item rows, extra item rows, {context feature: rows}) of a step's lookup."""
    groups = {"dp": step.dp_rows} if step.dp_rows is not None else {}
    values = sparse.feature_values(features, groups, ec_out, mc_out)
    items = values[ITEM_KEY]
    n = step.num_events
    return items[:n], items[n:], {f: values[f] for f in features[1:]}


class HSTURetrieval(nn.Module):
    def __init__(self, cfg: Config, inputs: ModelInputs | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.rcfg = cfg.model.retrieval
        vocabularies = inputs.vocabularies if inputs is not None else None
        self.sparse = SparseEmbeddings.from_config(cfg, vocabularies=vocabularies)
        self.features = [ITEM_KEY, *cfg.model.user_feature_tokens]
        context_dims = {f: self.sparse.feature_dim(f) for f in cfg.model.user_feature_tokens}
        self.tokens = TokenBuilder(cfg.model, self.sparse.feature_dim(ITEM_KEY), context_dims)
        self.encoder = self.make_encoder(cfg.model)

    def make_encoder(self, cfg: ModelConfig) -> nn.Module:
        return HSTUEncoder(cfg)

    # ------------------------------------------------------------------ internals

    def _encode(self, step: StepBatch, item_rows: torch.Tensor, context: dict):
        tok = self.tokens.for_step(item_rows, step, context)
        out = self.encoder(tok.x, tok.offsets, max(tok.max_len, 1), tok.timestamps)
        return out, tok

    def _scored(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors as they are scored: L2-normalized (cosine) or raw (dot, SASRec's)."""
        return F.normalize(x, dim=-1) if self.rcfg.similarity == "cosine" else x

    def _item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        return self._scored(self.tokens.item_proj(rows))

    def _states(self, step: StepBatch, item_rows: torch.Tensor, context: dict):
        out, tok = self._encode(step, item_rows, context)
        tgt, rows = target_events(step.batch, step.num_targets)
        states = self._scored(out[tok.state_index[tgt - 1]])
        return states, tgt, rows, out

    # ------------------------------------------------------------------ API

    def prepare(self, batch: Batch, negatives: torch.Tensor, neg_log_q: torch.Tensor) -> StepBatch:
        """The step's input: the one lookup KJT (sequences + negatives) hashed into table
        rows, split by collection; on the batch's device (the trainer: on the host)."""
        groups = self.sparse.row_groups(lookup_kjt(batch, self.features, negatives))
        sizes = self.tokens.sizes(batch.actions, batch.lengths, batch.num_targets)
        return StepBatch(
            batch=batch,
            ec_rows=groups.get("ec"),
            mc_rows=groups.get("mc"),
            dp_rows=groups.get("dp"),
            negatives=negatives.to(torch.int64),
            neg_log_q=neg_log_q,
            num_events=int(batch.item_ids.numel()),
            num_targets=int(_target_counts(batch)[2].sum()),
            tokens=sizes,
        )

    def forward(
        self,
        batch: Batch | StepBatch,
        negatives: torch.Tensor | None = None,
        neg_log_q: torch.Tensor | None = None,
    ) -> RetrievalOutput:
        """Sampled (or, with retrieval.full_softmax, exact) softmax loss of the batch.

        With full_softmax, `negatives` must be the whole catalog's raw ids (neg_log_q unused).
        A `StepBatch` (the trainer's, `prepare`d on the host) carries its negatives. This
        body is what TorchRec's train pipeline traces: the sharded collections are called on
        attributes of the step batch (so their input distribution can start a step early);
        everything after them is `_retrieval_loss`, opaque to the trace.
        """
        if isinstance(batch, Batch):  # eager callers: the step input is built here
            batch = self.prepare(batch, negatives, neg_log_q)
        ec_out, mc_out = sharded_lookups(self.sparse, batch)
        return _retrieval_loss(self, batch, ec_out, mc_out)

    def _loss(self, step: StepBatch, ec_out, mc_out) -> RetrievalOutput:
        batch, negatives, neg_log_q = step.batch, step.negatives, step.neg_log_q
        item_rows, neg_rows, context = step_rows(self.sparse, self.features, step, ec_out, mc_out)
        states, tgt, _, out = self._states(step, item_rows, context)
        neg_emb = self._item_vectors(neg_rows)
        P = int(tgt.numel())
        if P == 0:  # keep every parameter in the graph so DDP/DMP steps stay aligned
            zero = 0.0 * (out.sum() + neg_emb.sum())
            return RetrievalOutput(zero, 0, 0)
        pos_ids = batch.item_ids[tgt]
        pos_emb = self._item_vectors(item_rows[tgt])
        if self.rcfg.loss == "bce":
            if self.rcfg.full_softmax or negatives.numel() == 0:
                raise ValueError(
                    "model.retrieval.loss=bce needs sampled negatives: set "
                    "model.retrieval.full_softmax=false and num_negatives > 0"
                )
            if self.rcfg.bce_negatives == "per_position":  # negative i for position i
                if negatives.numel() != P:
                    raise ValueError(
                        f"model.retrieval.bce_negatives=per_position: {negatives.numel()} "
                        f"negatives for {P} target positions (pass one per position, in "
                        "target order, or set bce_negatives=pool)"
                    )
                pick = torch.arange(P, device=states.device)
            else:  # one of the step's pool per position (the trainer seeds the RNG)
                pick = torch.randint(int(negatives.numel()), (P,), device=states.device)
            loss = bce_one_negative_loss(
                states,
                pos_emb,
                neg_emb[pick],
                pos_ids,
                negatives.to(states.device)[pick],
                temperature=self.rcfg.temperature,
            )
            return RetrievalOutput(loss, P, 2)
        if self.rcfg.full_softmax:
            index = catalog_index(negatives, pos_ids)
            loss = full_softmax_loss(states, neg_emb, index, temperature=self.rcfg.temperature)
            return RetrievalOutput(loss, P, int(negatives.numel()))
        loss = sampled_softmax_loss(
            states,
            pos_emb,
            pos_ids,
            neg_emb,
            negatives,
            neg_log_q,
            temperature=self.rcfg.temperature,
            in_batch=self.rcfg.in_batch,
            logq=self.rcfg.logq_correction,
        )
        n_cand = 1 + (P if self.rcfg.in_batch else 0) + int(negatives.numel())
        return RetrievalOutput(loss, P, n_cand)

    def user_states(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states [P, D] as scored, target raw ids [P], sequence row [P]) per target position."""
        none = batch.item_ids.new_zeros(0)
        step = self.prepare(batch, none, none.to(torch.float32))
        item_rows, _, context = step_rows(
            self.sparse, self.features, step, *sharded_lookups(self.sparse, step)
        )
        states, tgt, rows, _ = self._states(step, item_rows, context)
        return states, batch.item_ids[tgt], rows

    def item_embeddings(self, raw_ids: torch.Tensor) -> torch.Tensor:
        """[n, D] output embeddings of raw item ids as scored (one sparse lookup)."""
        kjt = KeyedJaggedTensor(
            keys=[ITEM_KEY],
            values=raw_ids.to(torch.int64),
            lengths=torch.tensor([raw_ids.numel()], dtype=torch.int64, device=raw_ids.device),
        )
        return self._item_vectors(self.sparse(kjt)[ITEM_KEY].values())

    @torch.no_grad()
    def top_k(
        self,
        batch: Batch,
        catalog_ids: torch.Tensor,
        k: int,
        exclude_history: bool = True,
        block: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best min(k, |catalog|) items per target position: (ids [P, k], cosines, targets [P]).

        The catalog is scored in blocks of `block` rows (default retrieval.top_k_block);
        with exclude_history, items of the sequence's events before the target are skipped.
        Every rank must call this with the same catalog (each block is a sparse lookup).
        """
        block = block or self.rcfg.top_k_block
        states, targets, rows = self.user_states(batch)
        tgt, _ = target_events(batch)
        k = min(k, int(catalog_ids.numel()))
        seen_p, seen_col = (
            history_columns(batch, tgt, rows, catalog_ids) if exclude_history else (None, None)
        )
        best_i, best_s = blocked_top_k(
            states, catalog_ids, self.item_embeddings, k, block, seen_p, seen_col
        )
        return best_i, best_s, targets

    def encode_last(
        self,
        item_emb: torch.Tensor,
        actions: torch.Tensor,
        timestamps: torch.Tensor,
        lengths: torch.Tensor,
        context_emb: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Exportable: padded item rows [B, L, Di], actions/timestamps [B, L], lengths [B]
        (>= 1; events left-aligned) -> user state (as scored) after the last event, [B, D]."""
        x, ts, tok_len = self.tokens.padded(item_emb, actions, timestamps, lengths, context_emb)
        out = self.encoder.forward_padded(x, tok_len, ts)
        last = (tok_len - 1).clamp_min(0)
        idx = last[:, None, None].expand(-1, 1, out.shape[-1])
        return self._scored(torch.gather(out, 1, idx)[:, 0])


def _retrieval_loss(model: HSTURetrieval, step: StepBatch, ec_out, mc_out) -> RetrievalOutput:
    """The loss after the sharded lookups (a plain call outside TorchRec's trace)."""
    return model._loss(step, ec_out, mc_out)


torch.fx.wrap("_retrieval_loss")


def catalog_index(catalog_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row of each id in the catalog; fails naming an id that is not in it."""
    order = torch.argsort(catalog_ids)
    sorted_ids = catalog_ids[order]
    pos = torch.searchsorted(sorted_ids, ids).clamp_max(max(sorted_ids.numel() - 1, 0))
    found = sorted_ids[pos] == ids
    if not bool(found.all()):
        missing = int(ids[~found][0])
        raise ValueError(
            f"full_softmax: target item {missing} is not in the catalog passed as negatives; "
            "pass the whole catalog or set model.retrieval.full_softmax=false"
        )
    return order[pos]


def history_columns(
    batch: Batch, tgt: torch.Tensor, rows: torch.Tensor, catalog_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, catalog column) pairs of items seen before each target position."""
    starts = batch.offsets.to(torch.int64)[rows]
    n = tgt - starts  # events before the target
    p = torch.repeat_interleave(torch.arange(tgt.numel(), device=tgt.device), n)
    within = torch.arange(int(n.sum()), device=tgt.device) - torch.repeat_interleave(
        n.cumsum(0) - n, n
    )
    ids = batch.item_ids[starts[p] + within]
    order = torch.argsort(catalog_ids)
    sorted_ids = catalog_ids[order]
    pos = torch.searchsorted(sorted_ids, ids).clamp_max(max(sorted_ids.numel() - 1, 0))
    found = sorted_ids[pos] == ids
    return p[found], order[pos[found]]


def blocked_top_k(
    states: torch.Tensor,
    ids: torch.Tensor,
    item_vectors,
    k: int,
    block: int,
    seen_p: torch.Tensor | None = None,
    seen_col: torch.Tensor | None = None,
    first_col: int = 0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k of `ids` ([n] raw ids, scored in blocks of `block` by `item_vectors(ids)` ->
    [b, D]) for each state ([P, D]): (ids [P, k], scores [P, k]).

    `seen_p`, `seen_col`: (position, catalog column) pairs scored -inf (history excluded);
    `ids` are catalog columns first_col.. (a slice of the catalog). `valid` [n] bool: False
    columns (padding of a slice) score -inf."""
    P = states.shape[0]
    best_s = states.new_full((P, 0), float("-inf"))
    best_i = torch.zeros(P, 0, dtype=torch.int64, device=states.device)
    for s in range(0, int(ids.numel()), block):
        part = ids[s : s + block].to(states.device)
        scores = states @ item_vectors(part).T
        if valid is not None:
            scores[:, ~valid[s : s + block].to(scores.device)] = float("-inf")
        if seen_p is not None:
            lo = first_col + s
            m = (seen_col >= lo) & (seen_col < lo + part.numel())
            scores[seen_p[m], seen_col[m] - lo] = float("-inf")
        cand_s = torch.cat([best_s, scores], dim=1)
        cand_i = torch.cat([best_i, part[None, :].expand(P, -1)], dim=1)
        best_s, top = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
        best_i = torch.gather(cand_i, 1, top)
    return best_i, best_s
