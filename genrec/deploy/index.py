"""Item index for serving: exact inner-product search, or a faiss ANN index above a size.

    index = ItemIndex.build(ids, emb, kind="hnsw")     # or "exact" | "ivf"
    ids, scores = index.search(queries, k=10, exclude=[{3, 7}, set()])
    index.save(directory); ItemIndex.load(directory, ids, emb)

Item embeddings are stored as the model scores them (L2-normalized for the default cosine
similarity, raw for retrieval.similarity=dot), so inner product is the model's score. The exact
path scores the catalog in blocks of `block` rows (memory O(B * block)) and keeps a running
top-k; it is what the model's own `top_k` computes, so its lists match the eager model.
The ANN paths store faiss row numbers 0..N-1 and map them back to raw item ids; excluded
ids are removed by over-fetching k + |exclude| candidates per query.

Missing slots (k larger than what is left after exclusion, or an ANN that found fewer)
come back as id -1 with score -inf. Persisted with `faiss.write_index` plus a small JSON
of search parameters: no pickles.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
KINDS = ("exact", "hnsw", "ivf")


def _faiss():
    import faiss  # heavy import, only for ANN kinds

    return faiss


class ItemIndex:
    """Top-k inner-product search over a fixed catalog of raw item ids."""

    def __init__(
        self,
        ids: np.ndarray,
        emb: np.ndarray,
        kind: str,
        ann=None,
        params: dict | None = None,
        block: int = 65536,
    ) -> None:
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.emb = np.ascontiguousarray(emb, dtype=np.float32)
        self.kind = kind
        self.ann = ann
        self.params = dict(params or {})
        self.block = block
        self._emb_t = torch.from_numpy(self.emb)
        order = np.argsort(self.ids, kind="stable")
        self._sorted_ids, self._sorted_rows = self.ids[order], order

    @property
    def size(self) -> int:
        return int(self.ids.size)

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        emb: np.ndarray,
        kind: str,
        *,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 256,
        nprobe: int = 48,
    ) -> ItemIndex:
        """Index `emb` [N, D] (rows of raw `ids` [N]); kind: exact | hnsw | ivf."""
        ids = np.asarray(ids)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        if emb.ndim != 2 or ids.shape != (emb.shape[0],):
            raise ValueError(f"ids [N] and embeddings [N, D] disagree: {ids.shape} vs {emb.shape}")
        if np.unique(ids).size != ids.size:
            raise ValueError("item ids of the index must be unique")
        if kind == "exact":
            return cls(ids, emb, kind)
        faiss = _faiss()
        d = emb.shape[1]
        if kind == "hnsw":
            ann = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            ann.hnsw.efConstruction = ef_construction
            ann.add(emb)
            params = {"ef_search": ef_search, "hnsw_m": hnsw_m}
        else:
            nlist = max(1, min(emb.shape[0] // 39, int(4 * math.sqrt(emb.shape[0]))))
            quantizer = faiss.IndexFlatIP(d)
            ann = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            ann.train(emb)
            ann.add(emb)
            params = {"nprobe": min(nprobe, nlist), "nlist": nlist}
        index = cls(ids, emb, kind, ann=ann, params=params)
        index._apply_params()
        return index

    def _apply_params(self) -> None:
        if self.kind == "hnsw":
            self.ann.hnsw.efSearch = int(self.params["ef_search"])
        elif self.kind == "ivf":
            self.ann.nprobe = int(self.params["nprobe"])

    # ------------------------------------------------------------------ search
    def rows_of(self, raw_ids: np.ndarray) -> np.ndarray:
        """Catalog rows of raw ids; -1 where an id is not in the catalog."""
        raw_ids = np.asarray(raw_ids, dtype=np.int64)
        if self.size == 0:
            return np.full(raw_ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, raw_ids).clip(0, self.size - 1)
        hit = self._sorted_ids[pos] == raw_ids
        return np.where(hit, self._sorted_rows[pos], -1)

    def search(
        self, queries: np.ndarray | torch.Tensor, k: int, exclude: list[set] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [B, k], scores float32 [B, k]), best first; -1 / -inf where none."""
        q = queries.detach().cpu().numpy() if torch.is_tensor(queries) else np.asarray(queries)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.emb.shape[1]:
            raise ValueError(f"queries must be [B, {self.emb.shape[1]}], got {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if exclude is not None and len(exclude) != q.shape[0]:
            raise ValueError(f"exclude has {len(exclude)} sets for {q.shape[0]} queries")
        if self.kind == "exact":
            return self._search_exact(q, k, exclude)
        return self._search_ann(q, k, exclude)

    def _search_exact(
        self, q: np.ndarray, k: int, exclude: list[set] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        B = q.shape[0]
        qt = torch.from_numpy(q)
        mask_rows, mask_cols = self._exclusion_pairs(exclude)
        best_s = torch.full((B, 0), -math.inf)
        best_r = torch.zeros((B, 0), dtype=torch.int64)
        for start in range(0, self.size, self.block):
            stop = min(self.size, start + self.block)
            s = qt @ self._emb_t[start:stop].T
            if mask_rows.size:
                sel = (mask_cols >= start) & (mask_cols < stop)
                s[
                    torch.from_numpy(mask_rows[sel]), torch.from_numpy(mask_cols[sel] - start)
                ] = -math.inf
            rows = torch.arange(start, stop).expand(B, -1)
            s = torch.cat([best_s, s], dim=1)
            r = torch.cat([best_r, rows], dim=1)
            top = torch.topk(s, min(k, s.shape[1]), dim=1)
            best_s, best_r = top.values, torch.gather(r, 1, top.indices)
        return self._finish(best_r.numpy(), best_s.numpy(), k)

    def _exclusion_pairs(self, exclude: list[set] | None) -> tuple[np.ndarray, np.ndarray]:
        """(query index, catalog row) of every excluded id that is in the catalog."""
        if not exclude:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        qi = np.concatenate([np.full(len(e), b, dtype=np.int64) for b, e in enumerate(exclude)])
        raw = np.fromiter((i for e in exclude for i in e), dtype=np.int64, count=qi.size)
        rows = self.rows_of(raw)
        keep = rows >= 0
        return qi[keep], rows[keep]

    def _search_ann(
        self, q: np.ndarray, k: int, exclude: list[set] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        fetch = min(self.size, k + extra)
        scores, rows = self.ann.search(q, fetch)
        if exclude:
            for b, e in enumerate(exclude):
                if e:
                    drop = np.isin(self.ids[rows[b].clip(0)], np.fromiter(e, dtype=np.int64))
                    drop &= rows[b] >= 0
                    rows[b, drop] = -1
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return self._finish(
            np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1), k
        )

    def _finish(
        self, rows: np.ndarray, scores: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        valid = (rows >= 0) & np.isfinite(scores)
        ids = np.where(valid, self.ids[rows.clip(0, max(0, self.size - 1))], -1)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        if ids.shape[1] < k:  # catalog smaller than k
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return ids, scores

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> list[str]:
        """Write the index files (not the embeddings: those live in items.safetensors)."""
        directory = Path(directory)
        meta = {"kind": self.kind, "size": self.size, "params": self.params, "block": self.block}
        files = [INDEX_META]
        if self.ann is not None:
            _faiss().write_index(self.ann, str(directory / INDEX_FILE))
            files.append(INDEX_FILE)
        (directory / INDEX_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        return files

    @classmethod
    def load(cls, directory: str | Path, ids: np.ndarray, emb: np.ndarray) -> ItemIndex:
        directory = Path(directory)
        meta = json.loads((directory / INDEX_META).read_text())
        ann = None
        if meta["kind"] != "exact":
            ann = _faiss().read_index(str(directory / INDEX_FILE))
            if ann.ntotal != len(ids):
                raise ValueError(
                    f"{directory / INDEX_FILE}: holds {ann.ntotal} vectors but items.safetensors "
                    f"has {len(ids)} items; re-export the artifact"
                )
        index = cls(ids, emb, meta["kind"], ann=ann, params=meta["params"], block=meta["block"])
        if ann is not None:
            index._apply_params()
        return index


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k| (ignoring -1)."""
    hits, total = 0, 0
    for a, e in zip(approx_ids, exact_ids):
        e = e[e >= 0]
        hits += np.intersect1d(a[a >= 0], e).size
        total += e.size
    return hits / max(1, total)
