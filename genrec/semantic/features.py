"""Item vectors to tokenize: content (attributes), behaviour (a trained retriever), or both.

    attribute_features("…/Toys_and_Games_item2attributes.json", dim=64)   # content
    artifact_features("runs/amazon_toys/artifact")                        # collaborative
    concat_features([a, b])                                               # both

Attributes are Amazon's S3-Rec `*_item2attributes.json`: {"item id": [attribute ids]}
(brand and category ids). Each item becomes a multi-hot row weighted by the attribute's
inverse document frequency (the category every item shares carries ~0), L2-normalized,
then, when dim > 0, multiplied by a fixed seeded Gaussian matrix [A, dim] / sqrt(dim)
(a learning-free random projection: inner products are kept in expectation). Collaborative
vectors are an exported artifact's `items.safetensors` (item_ids [N], embeddings [N, D]),
read after the manifest's checksums are verified. Nothing is downloaded.

`concat_features` aligns parts on item id (the union, sorted); each part's rows are
L2-normalized so neither dominates, and an item a part lacks (a cold item with no
collaborative vector) gets zeros there: `missing` counts them per part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genrec.data_pipeline.validation import DataError


@dataclass
class ItemFeatures:
    """item_ids [N] int64 (sorted, unique) and vectors [N, D] float32."""

    item_ids: np.ndarray
    vectors: np.ndarray
    # part name -> items of the union that part had no vector for (zeros instead)
    missing: dict[str, int] = field(default_factory=dict)


def l2_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def read_item_attributes(path: str | Path) -> tuple[np.ndarray, list[list[int]]]:
    """item ids [N] (sorted) and each item's attribute ids, checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "no such attributes file", fix="set semantic.attributes")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(str(path), 'expected a non-empty mapping {"item id": [attribute ids]}')
    items, attrs = [], []
    for key, values in raw.items():
        ok = key.lstrip("-").isdigit() and int(key) >= 0 and isinstance(values, list)
        if not ok or not all(isinstance(v, int) and v >= 0 for v in values):
            raise DataError(
                str(path),
                f"item {key!r}: expected a non-negative integer id mapped to a list of "
                f"non-negative integer attribute ids, got {values!r}",
            )
        items.append(int(key))
        attrs.append(values)
    order = np.argsort(items)
    return np.asarray(items, dtype=np.int64)[order], [attrs[i] for i in order]


def attribute_features(path: str | Path, dim: int = 64, seed: int = 0) -> ItemFeatures:
    """IDF-weighted multi-hot attributes, L2-normalized; randomly projected to dim if > 0."""
    item_ids, attrs = read_item_attributes(path)
    vocab = 1 + max((max(a) for a in attrs if a), default=0)
    rows = np.repeat(np.arange(len(attrs)), [len(a) for a in attrs])
    cols = np.fromiter((v for a in attrs for v in a), dtype=np.int64, count=len(rows))
    multi_hot = np.zeros((len(attrs), vocab), dtype=np.float32)
    multi_hot[rows, cols] = 1.0
    df = multi_hot.sum(0)
    idf = np.log(len(attrs) / np.maximum(df, 1.0)).astype(np.float32)
    x = l2_rows(multi_hot * idf)
    if dim > 0:
        proj = np.random.default_rng(seed).normal(size=(vocab, dim)).astype(np.float32)
        x = x @ proj / np.sqrt(dim, dtype=np.float32)
    return ItemFeatures(item_ids, x.astype(np.float32))


def artifact_features(artifact_dir: str | Path) -> ItemFeatures:
    """A trained retriever's item table, from an exported artifact (checksums verified)."""
    from safetensors.numpy import load_file

    from genrec.deploy.artifact import ITEMS, read_manifest

    read_manifest(artifact_dir, verify=True)
    path = Path(artifact_dir) / ITEMS
    if not path.is_file():
        raise DataError(
            str(path), "no item table (a ranking artifact?)", fix="export a retrieval model"
        )
    items = load_file(str(path))
    ids = items["item_ids"].astype(np.int64)
    order = np.argsort(ids)
    return ItemFeatures(ids[order], items["embeddings"][order].astype(np.float32))


def concat_features(parts: dict[str, ItemFeatures]) -> ItemFeatures:
    """The union of the parts' items, each part's L2-normalized rows side by side."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    ids = np.unique(np.concatenate([p.item_ids for p in parts.values()]))
    blocks, missing = [], {}
    for name, p in parts.items():
        block = np.zeros((len(ids), p.vectors.shape[1]), dtype=np.float32)
        block[np.searchsorted(ids, p.item_ids)] = l2_rows(p.vectors)
        blocks.append(block)
        missing[name] = int(len(ids) - len(p.item_ids))
    return ItemFeatures(ids, np.concatenate(blocks, axis=1), missing)
