"""What a model is built from besides its config, read from files for it.

The model never opens a file (DESIGN: the flow has no back-edges): whoever builds one
(trainer assembly, export, the serving runtimes, benchmarks) reads its inputs here and
passes them to `build_model(cfg, inputs)`:

  vocabularies  {feature: Vocabulary} of every kind: vocab table, from
                data.prepared_dir/vocab/FEATURE.parquet (checked against num_embeddings)
  codes         (item ids [N], codes [N, L]) of model.task=generative, from
                model.generative.codes or data.prepared_dir/semantic/codes.parquet

A config that needs neither reads no file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genrec.config import Config
from genrec.data_pipeline.vocabulary import Vocabulary


@dataclass(frozen=True)
class ItemCodeTable:
    """Every coded item's semantic ID: ids [N] int64 (unique), codes [N, L] int64."""

    ids: np.ndarray
    codes: np.ndarray
    source: str = "codes"  # where they came from, for error messages


@dataclass(frozen=True)
class ModelInputs:
    vocabularies: dict[str, Vocabulary] = field(default_factory=dict)
    codes: ItemCodeTable | None = None


def codes_path(cfg: Config) -> Path:
    """model.generative.codes, or data.prepared_dir/semantic/codes.parquet."""
    g = cfg.model.generative
    return Path(g.codes) if g.codes else Path(cfg.data.prepared_dir) / "semantic" / "codes.parquet"


def read_item_codes(path: str | Path) -> ItemCodeTable:
    """The codes of a codes.parquet (`genrec tokenize`); fails naming the fix."""
    from genrec.semantic.tokenize import read_codes

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no semantic-ID codes. Fix: run `genrec tokenize CONFIG` first (it writes "
            "data.prepared_dir/semantic/codes.parquet) or set model.generative.codes"
        )
    ids, codes = read_codes(path)
    if codes.ndim != 2 or codes.shape[1] == 0 or len(ids) == 0:
        raise ValueError(f"{path}: expected one non-empty code per item, got {codes.shape}")
    return ItemCodeTable(np.asarray(ids, dtype=np.int64), codes, str(path))


def read_model_inputs(cfg: Config) -> ModelInputs:
    """The vocabularies and codes `cfg`'s model needs (none: nothing is read)."""
    from genrec.embeddings.tables import load_vocabularies

    codes = read_item_codes(codes_path(cfg)) if cfg.model.task == "generative" else None
    return ModelInputs(load_vocabularies(cfg.embeddings, cfg.data.prepared_dir), codes)
