"""The time model beside the memory plan: activations, all-to-all bytes, hours per pass.

Estimates from shapes and config only (nothing is run), per rank and per training step at
`trainer.batch_size` sequences. Every figure states its assumption:

tokens    T = batch_size * max_tokens (model.max_len events, x2 interleaved, + one token per
          contextual feature): full rows, an upper bound
positions P = batch_size * min(model.max_len, mean targets per (user, window) row) when the
          prepared data is known (its _meta.json), else batch_size * model.max_len (every
          event a target, the worst case)
lookups   each sparse feature is looked up on the events (batch_size * model.max_len ids per
          hash); the item feature also on the num_negatives sampled negatives

activations  encoder: per layer and token the tensors autograd keeps, 2*dim (layer input,
          LayerNorm output) + 2*H*(2*Dv + 2*Dqk) (UVQK before and after SiLU) + 3*H*Dv
          (A V, its LayerNorm, the gated product), at 2 bytes under bf16 autocast on CUDA,
          else 4; the loss: fp32 logits P x (1 + P [in-batch] + num_negatives); the looked-up
          rows: ids x dim x 4 per hash. The PyTorch reference attention also keeps a
          B x H x max_tokens^2 fp32 score matrix per layer; the Triton kernel keeps none
          (reported apart, not in the total).
all-to-all  sharded tables (TorchRec's sequence sharding): a rank sends its ids (8 bytes)
          to the shards, receives their rows forward and sends the row gradients back
          (dim x 4 bytes each way); (W-1)/W of it leaves the rank; column-wise shards see
          every id once per column shard. Replicated tables and the dense parameters are
          not all-to-all: their gradients are all-reduced (ring: 2 (W-1)/W x bytes).
hours     tokens per pass / (tokens/s per GPU x world size), where tokens per pass are the
          events (each a target once) plus, per (user, window) row, up to model.max_len
          history events re-encoded: the range [events, events + rows * max_len].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from genrec.config import Config
from genrec.data_pipeline.schemas import META_FILE

# Measured: the fp32 2-layer dim-64 HSTU encoder, forward + backward, on one H100 with the
# Triton attention kernel (benchmarks/RESULTS.md, "HSTU encoder on the GPU", batch 128):
# 2,910,306 tokens/s. Scaled by 2 / num_layers it is the default speed of `genrec plan`.
MEASURED_ENCODER_TOKENS_PER_S = 2_910_306
MEASURED_ENCODER_LAYERS = 2
SOURCE_OF_SPEED = (
    "default: 2.91M tokens/s measured for a 2-layer dim-64 fp32 HSTU encoder fwd+bwd on one "
    "H100 (benchmarks/RESULTS.md, 'HSTU encoder on the GPU') scaled to {layers} layers; "
    "encoder only, lookups, all-to-all and the loss not included: optimistic"
)


@dataclass(frozen=True)
class PassData:
    """How much one pass reads: events and (user, window) rows (0: unknown)."""

    events: int = 0
    rows: int = 0
    where: str = ""  # what the figures came from


def pass_data(cfg: Config, events: int = 0) -> PassData:
    """`events` if given, else the prepared directory's _meta.json, else unknown."""
    meta = Path(cfg.data.prepared_dir) / META_FILE
    if events:
        return PassData(events=events, where="--events")
    if meta.is_file():
        m = json.loads(meta.read_text())
        return PassData(int(m["num_events"]), int(m["num_rows"]), where=str(meta))
    return PassData()


def max_tokens(cfg: Config) -> int:
    """Tokens of a full sequence (models.hstu.max_tokens, without importing torch)."""
    m = cfg.model
    return m.max_len * (2 if m.token_mode == "interleave" else 1) + len(m.user_feature_tokens)


def positions(cfg: Config, data: PassData) -> int:
    m, b = cfg.model, cfg.trainer.batch_size
    if data.events and data.rows:
        return round(b * min(m.max_len, data.events / data.rows))
    return b * m.max_len


def activation_bytes(cfg: Config, data: PassData = PassData()) -> dict[str, float]:
    """Bytes of activations kept for backward per rank and step (module docstring)."""
    m, b = cfg.model, cfg.trainer.batch_size
    act = 2 if cfg.trainer.bf16 and cfg.sharding.topology.device == "cuda" else 4
    h, dv, dqk = m.num_heads, m.linear_dim, m.attn_dim
    per_token = 2 * m.dim + 2 * h * (2 * dv + 2 * dqk) + 3 * h * dv
    tokens = b * max_tokens(cfg)
    p = positions(cfg, data)
    r = m.retrieval
    width = 1 + (p if r.in_batch else 0) + r.num_negatives
    rows = sum(
        ids * t.dim * t.num_hashes * 4.0
        for t in cfg.embeddings.tables
        for ids in [lookups(cfg, f) for f in t.features]
    )
    return {
        "encoder": float(m.num_layers * tokens * per_token * act),
        "loss_logits": float(p * width * 4),
        "embedding_rows": rows,
        "reference_attention_scores": float(m.num_layers * b * h * max_tokens(cfg) ** 2 * 4),
    }


def lookups(cfg: Config, feature: str) -> int:
    """Ids of `feature` looked up per rank and step (per hash)."""
    ids = cfg.trainer.batch_size * cfg.model.max_len
    return ids + (cfg.model.retrieval.num_negatives if feature == "item_id" else 0)


def comm_bytes(
    cfg: Config, sharding: dict[str, tuple[str, int]], world: int, dense_params: int = 0
) -> dict[str, float]:
    """Bytes one rank sends per step: all-to-all of sharded tables, all-reduce of the rest.

    `sharding`: table -> (sharding type, number of column shards); a table missing from it
    is replicated (data_parallel). `dense_params`: the dense parameters to all-reduce.
    """
    leave = (world - 1) / world
    a2a = 0.0
    allreduce = 2 * leave * dense_params * 4.0
    for t in cfg.embeddings.tables:
        kind, col_shards = sharding.get(t.name, ("data_parallel", 1))
        if kind == "data_parallel":
            allreduce += 2 * leave * t.num_embeddings * t.dim * 4.0
            continue
        ids = sum(lookups(cfg, f) for f in t.features) * t.num_hashes
        a2a += leave * ids * (8.0 * col_shards + 2 * t.dim * 4.0)
    return {"all_to_all": a2a, "all_reduce": allreduce}


def pass_hours(
    cfg: Config, data: PassData, tokens_per_s: float, world: int
) -> tuple[float, float] | None:
    """(low, high) hours for one pass, or None when the events are unknown."""
    if not data.events:
        return None
    per_event = 2 if cfg.model.token_mode == "interleave" else 1
    low = data.events * per_event
    high = (data.events + data.rows * cfg.model.max_len) * per_event if data.rows else low
    rate = tokens_per_s * world * 3600.0
    return low / rate, high / rate


def default_tokens_per_s(cfg: Config) -> float:
    return MEASURED_ENCODER_TOKENS_PER_S * MEASURED_ENCODER_LAYERS / cfg.model.num_layers
