"""The exported programs and the numpy pre-processing that feeds them.

Hashing stays OUTSIDE the programs: raw ids are hashed in numpy (`hash_ids_np`, the bit-for-bit
twin of training's torch hash) into table rows, and the programs take those rows (a direct
table's row is the raw id itself; an id beyond its rows is refused before the program). Reasons:
the hash relies on int64 wraparound, which is undefined behaviour in the C++ that
AOTInductor emits; and the rows are what a test can compare with training's
`SparseEmbeddings.hash_features` directly. A vocab table's rows come from its vocabulary,
which the artifact carries (vocab/FEATURE.parquet, sha256 in the manifest) and maps with the
numpy twin (`Vocabulary.rows`) of training's torch mapping. The table lookup (sum of the k hashed rows) is
inside the program, so the program's weights are the embedding table(s) + the dense model.

Inputs (B sequences, L events, k hashes of item_id, C candidates; all int64):

    UserEncoderProgram(item_rows [B, L, k], actions [B, L], timestamps [B, L], lengths [B])
        -> [B, D] user state after each sequence's last event (L2-normalized unless
           retrieval.similarity=dot)
    RankerProgram(item_rows, actions, timestamps, lengths, cand_rows [B, C, k], cand_ts [B, C])
        -> [B, C, K] per-task logits of the candidates (target-aware, as in training)

Events are left-aligned; slots at or past lengths[b] are padding (ignored). B and L (and C)
are dynamic dimensions of the exported program.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genrec.config import Config
from genrec.data_pipeline.batch import ITEM_KEY
from genrec.data_pipeline.vocabulary import Vocabulary, vocab_path
from genrec.embeddings.hashing import HASH_VERSION, feature_seed, hash_ids_np


def hashing_spec(cfg: Config, vocab_sha256: dict[str, str] | None = None) -> dict:
    """Per embedded feature: its table, its kind, bucket count and the seeds of its k hashes;
    a vocab feature: its vocabulary file in the artifact and that file's sha256
    (`vocab_sha256`, {feature: digest}, as export writes them)."""
    out = {}
    for t in cfg.embeddings.tables:
        for f in t.features:
            if t.kind == "vocab":
                out[f] = {
                    "table": t.name,
                    "kind": "vocab",
                    "num_buckets": t.num_embeddings,
                    "num_hashes": 1,
                    "seeds": [],
                    "vocab_file": vocab_path("", f).as_posix(),
                    "vocab_sha256": (vocab_sha256 or {}).get(f),
                }
                continue
            out[f] = {
                "table": t.name,
                "kind": t.kind,
                "num_buckets": t.num_embeddings,
                "num_hashes": t.num_hashes,
                "seeds": [
                    feature_seed(f, j, cfg.embeddings.hash_version) for j in range(t.num_hashes)
                ]
                if t.kind == "hashed"
                else [],  # direct: the row is the raw id
            }
    return {
        "version": HASH_VERSION,
        "function": "splitmix64 (genrec.embeddings.hashing)",
        "features": out,
    }


def direct_rows_beyond(raw_ids, item_hashing: dict) -> int | None:
    """Index of the first raw id a direct item table has no row for (None: all have one, or
    the table is hashed and every id has rows)."""
    if item_hashing.get("kind") != "direct":
        return None
    raw = np.asarray(raw_ids, dtype=np.int64).reshape(-1)
    bad = np.flatnonzero((raw < 0) | (raw >= item_hashing["num_buckets"]))
    return int(bad[0]) if bad.size else None


def load_item_vocabulary(directory, item_hashing: dict) -> Vocabulary | None:
    """The item vocabulary an artifact carries (None: the item table is not kind vocab),
    checked against the table's row count; a missing or foreign file fails naming it."""
    if item_hashing.get("kind") != "vocab":
        return None
    vocab = Vocabulary.read(
        str(directory),
        ITEM_KEY,
        fix="the artifact is incomplete or was changed: re-export it with `genrec export`",
    )
    if vocab.num_rows != item_hashing["num_buckets"]:
        raise ValueError(
            f"{vocab.source}: {vocab.num_rows} rows but the artifact's item table has "
            f"{item_hashing['num_buckets']}: the file is not the one exported; re-export"
        )
    return vocab


def item_rows_np(
    raw_ids: np.ndarray, item_hashing: dict, vocab: Vocabulary | None = None
) -> np.ndarray:
    """Raw int64 ids (any shape) -> table rows [..., k], exactly as training maps them
    (k seeded hashes; a direct table's row is the id itself, k=1; a vocab table's row is
    the vocabulary's, `vocab` from `load_item_vocabulary`, k=1)."""
    raw = np.asarray(raw_ids, dtype=np.int64)
    if item_hashing.get("kind") == "vocab":
        if vocab is None:
            raise ValueError("the item table is kind: vocab: pass the artifact's vocabulary")
        return vocab.rows(raw)[..., None]
    if item_hashing.get("kind") == "direct":
        i = direct_rows_beyond(raw, item_hashing)
        if i is not None:
            raise ValueError(
                f"item id {int(raw.reshape(-1)[i])} has no row in the direct item table "
                f"(ids 0..{item_hashing['num_buckets'] - 1}): the model never saw it"
            )
        return raw[..., None].copy()
    cols = [hash_ids_np(raw, s, item_hashing["num_buckets"]) for s in item_hashing["seeds"]]
    return np.stack(cols, axis=-1)


def _core(model: nn.Module) -> nn.Module:
    """A shallow view of `model` without its TorchRec `sparse` part (not traced, not saved)."""
    core = copy.copy(model)
    core._modules = {k: v for k, v in model._modules.items() if k != "sparse"}
    return core


def _item_table(model: nn.Module, cfg: Config) -> torch.Tensor:
    """The weight of the table that embeds item_id (a plain copy, unsharded)."""
    table = next(t for t in cfg.embeddings.tables if ITEM_KEY in t.features)
    if table.kind == "managed_collision":
        raise ValueError(
            f"export: table {table.name!r} is managed_collision; only hashed, direct or vocab item "
            "tables can be exported (the MCH remapping is stateful); use kind: hashed or "
            "direct for serving models"
        )
    return model.sparse.table_weight(table.name).detach().clone()


def check_exportable(cfg: Config) -> None:
    if cfg.model.user_feature_tokens:
        raise ValueError(
            f"export: model.user_feature_tokens={cfg.model.user_feature_tokens} needs context "
            "features that the serving API does not carry; export a model without them"
        )


class UserEncoderProgram(nn.Module):
    """Item rows -> table lookup -> tokens -> HSTU -> last state (see module docstring)."""

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__()
        check_exportable(cfg)
        self.item_table = nn.Parameter(_item_table(model, cfg), requires_grad=False)
        self.core = _core(model)

    def forward(self, item_rows, actions, timestamps, lengths) -> torch.Tensor:
        emb = F.embedding(item_rows, self.item_table).sum(dim=2)
        return self.core.encode_last(emb, actions, timestamps, lengths)


class RankerProgram(nn.Module):
    """History then candidates in one padded sequence, target-aware attention, task heads.

    Mirrors `TokenBuilder(candidates=True)` on padded tensors: candidate tokens are the item
    projection plus the UNKNOWN action (sum mode) or the item token alone (interleave mode),
    placed right after each sequence's history; every candidate sees the history and itself.
    """

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__()
        check_exportable(cfg)
        self.item_table = nn.Parameter(_item_table(model, cfg), requires_grad=False)
        self.core = _core(model)
        self.interleave = cfg.model.token_mode == "interleave"
        self.num_actions = cfg.model.num_actions

    def forward(self, item_rows, actions, timestamps, lengths, cand_rows, cand_ts):
        tok = self.core.tokens
        B, L = actions.shape
        C = cand_rows.shape[1]
        hist = tok.item_proj(F.embedding(item_rows, self.item_table).sum(dim=2))
        acts = tok.action_emb(actions.clamp(0, self.num_actions - 1))
        cand = tok.item_proj(F.embedding(cand_rows, self.item_table).sum(dim=2))
        ts = timestamps
        h = lengths
        if self.interleave:
            hist = torch.stack([hist, acts], dim=2).reshape(B, 2 * L, -1)
            ts = ts.repeat_interleave(2, dim=1)
            h = h * 2
            Lt = 2 * L
        else:
            hist = hist + acts
            unknown = tok.action_emb.weight[self.num_actions]
            cand = cand + unknown
            Lt = L
        x_all = torch.cat([hist, cand], dim=1)  # [B, Lt + C, D]
        ts_all = torch.cat([ts, cand_ts], dim=1)
        j = torch.arange(Lt + C, device=x_all.device)[None, :]
        hb = h[:, None]
        src = torch.where(j < hb, j, Lt + j - hb)
        src = torch.where(j < hb + C, src, torch.zeros_like(src))
        x = torch.gather(x_all, 1, src[:, :, None].expand(-1, -1, x_all.shape[-1]))
        ts_tok = torch.gather(ts_all, 1, src)
        n_cand = torch.full_like(h, C)
        out = self.core.encoder.forward_padded(x, h + n_cand, ts_tok, n_cand)
        pos = hb + torch.arange(C, device=x.device)[None, :]
        cand_out = torch.gather(out, 1, pos[:, :, None].expand(-1, -1, out.shape[-1]))
        return self.core.head(cand_out)


def dynamic_shapes(ranker: bool, max_len: int, max_batch: int, max_candidates: int):
    b = torch.export.Dim("batch", min=1, max=max_batch)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    shapes = [{0: b, 1: seq}, {0: b, 1: seq}, {0: b, 1: seq}, {0: b}]
    if ranker:
        c = torch.export.Dim("candidates", min=1, max=max_candidates)
        shapes += [{0: b, 1: c}, {0: b, 1: c}]
    return tuple(shapes)


def example_inputs(ranker: bool, num_hashes: int, num_buckets: int) -> tuple[torch.Tensor, ...]:
    """Sample inputs for tracing (sizes > 1 so no dimension specializes to 0 or 1)."""
    g = torch.Generator().manual_seed(0)
    B, L, C = 3, 5, 4
    rows = torch.randint(0, num_buckets, (B, L, num_hashes), generator=g)
    actions = torch.randint(0, 2, (B, L), generator=g)
    ts = torch.cumsum(torch.randint(0, 100, (B, L), generator=g), 1)
    lengths = torch.tensor([5, 2, 4])
    if not ranker:
        return rows, actions, ts, lengths
    cand = torch.randint(0, num_buckets, (B, C, num_hashes), generator=g)
    return rows, actions, ts, lengths, cand, ts[:, -1:].expand(B, C).contiguous()


def pad_histories(
    histories: list[np.ndarray],
    timestamps: list[np.ndarray],
    actions: list[np.ndarray],
    max_len: int,
    item_hashing: dict,
    vocab: Vocabulary | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Requests -> padded program inputs; each history keeps its last `max_len` events."""
    B = len(histories)
    lens = np.array([min(len(h), max_len) for h in histories], dtype=np.int64)
    L = int(lens.max())
    ids = np.zeros((B, L), dtype=np.int64)
    ts = np.zeros((B, L), dtype=np.int64)
    act = np.zeros((B, L), dtype=np.int64)
    for b, n in enumerate(lens):
        ids[b, :n] = histories[b][-n:]
        ts[b, :n] = timestamps[b][-n:]
        act[b, :n] = actions[b][-n:]
    rows = item_rows_np(ids, item_hashing, vocab)
    return (
        torch.from_numpy(rows),
        torch.from_numpy(act),
        torch.from_numpy(ts),
        torch.from_numpy(lens),
    )
