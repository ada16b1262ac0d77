"""`genrec tokenize CONFIG`: item vectors -> semantic-ID codes, written beside the data.

    SEMANTIC_DIR/codes.parquet   item_id int64, codes list<int32> (L levels + 1
                                 disambiguation token; every row unique)
    SEMANTIC_DIR/stats.json      code_stats (before disambiguation), the config section,
                                 feature sources, wall times

SEMANTIC_DIR is `semantic.out_dir`, or `data.prepared_dir`/semantic when empty.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from genrec.config import Config, ConfigError, SemanticConfig
from genrec.semantic.features import (
    ItemFeatures,
    artifact_features,
    attribute_features,
    concat_features,
)
from genrec.semantic.tokenizers import RQVAE, Tokenized, code_stats, disambiguate, residual_kmeans

CODES = "codes.parquet"
STATS = "stats.json"


def semantic_dir(cfg: Config) -> Path:
    return Path(cfg.semantic.out_dir or Path(cfg.data.prepared_dir) / "semantic")


def item_features(sem: SemanticConfig) -> ItemFeatures:
    parts = {}
    if sem.attributes:
        parts["attributes"] = attribute_features(sem.attributes, sem.attribute_dim, sem.seed)
    if sem.artifact:
        parts["artifact"] = artifact_features(sem.artifact)
    if not parts:
        raise ConfigError(
            "semantic: no item vectors. Fix: set semantic.attributes (an *_item2attributes.json)"
            " and/or semantic.artifact (an exported retrieval artifact)"
        )
    return concat_features(parts)


def fit_codes(sem: SemanticConfig, x: np.ndarray) -> tuple[Tokenized, list[float]]:
    """Codes [N, L] by the configured method; RQ-VAE also returns its loss history."""
    if sem.method == "residual_kmeans":
        return residual_kmeans(x, sem.codebook_sizes, sem.kmeans_iters, sem.balanced, sem.seed), []
    r = sem.rqvae
    torch.manual_seed(sem.seed)
    model = RQVAE(x.shape[1], r.hidden_dim, r.latent_dim, sem.codebook_sizes, r.beta)
    history = model.fit(x, r.epochs, r.batch_size, r.lr, r.mask_prob, sem.kmeans_iters, sem.seed)
    return model.tokenize(x), history


def write_codes(path: Path, item_ids: np.ndarray, codes: np.ndarray) -> None:
    flat = pa.array(codes.astype(np.int32).reshape(-1))
    offsets = pa.array(np.arange(0, codes.size + 1, codes.shape[1], dtype=np.int32))
    table = pa.table(
        {
            "item_id": pa.array(item_ids, pa.int64()),
            "codes": pa.ListArray.from_arrays(offsets, flat),
        }
    )
    pq.write_table(table, path)


def read_codes(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """item_ids [N] int64 and codes [N, L] int64 from a codes.parquet."""
    table = pq.read_table(path)
    codes = table.column("codes").combine_chunks()
    width = len(codes[0]) if len(codes) else 0
    flat = codes.flatten().to_numpy().astype(np.int64)
    return table.column("item_id").to_numpy(), flat.reshape(-1, width)


def tokenize(cfg: Config) -> dict:
    """Fit the configured tokenizer, write codes + stats; returns the stats."""
    sem = cfg.semantic
    t0 = time.perf_counter()
    feats = item_features(sem)
    t1 = time.perf_counter()
    tok, history = fit_codes(sem, feats.vectors)
    t2 = time.perf_counter()
    stats = code_stats(tok.codes, sem.codebook_sizes, feats.vectors, tok.x_hat)
    codes = disambiguate(tok.codes)
    stats.update(
        method=sem.method,
        feature_dim=int(feats.vectors.shape[1]),
        missing_vectors=feats.missing,
        disambiguation_size=int(codes[:, -1].max()) + 1,
        rqvae_recon_history=history,
        features_s=round(t1 - t0, 3),
        fit_s=round(t2 - t1, 3),
        config=dataclasses.asdict(sem),
    )
    out = semantic_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_codes(out / CODES, feats.item_ids, codes)
    (out / STATS).write_text(json.dumps(stats, indent=1))
    stats["out_dir"] = str(out)
    return stats


def summary(stats: dict) -> list[str]:
    usage = ", ".join(
        f"L{i}: {lv['used']}/{lv['size']} (ppl {lv['perplexity']:.0f})"
        for i, lv in enumerate(stats["levels"])
    )
    return [
        f"{stats['items']:,} items, {stats['method']}, vectors of dim {stats['feature_dim']}",
        f"codebook usage {usage}",
        f"collision rate {stats['collision_rate']:.4f} before disambiguation "
        f"({stats['unique_codes']:,} distinct codes, largest group {stats['max_collisions']}; "
        f"disambiguation token size {stats['disambiguation_size']})",
        f"reconstruction error {stats['reconstruction_error']:.4f} (relative)",
        f"collapsed levels {stats['collapsed_levels'] or 'none'}",
        f"fit {stats['fit_s']:.1f} s (features {stats['features_s']:.1f} s); "
        f"codes in {stats['out_dir']}/{CODES}",
    ]
