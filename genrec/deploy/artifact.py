"""A serving artifact on disk: manifest, checksums, and the runtime that answers queries.

    ARTIFACT/manifest.json               written last; sha256 of every other file
    ARTIFACT/user_encoder.pt2            torch.export program (no-compile fallback)
    ARTIFACT/user_encoder.aoti.pt2       AOTInductor package of it (when compiled)
    ARTIFACT/ranker.pt2 / .aoti.pt2      ranking models only
    ARTIFACT/model.safetensors           the full unsharded state dict (eager rebuilds)
    ARTIFACT/items.safetensors           item_ids int64 [N], embeddings float32 [N, D]
    ARTIFACT/index.json (+ index.faiss)  item index kind and search parameters
    ARTIFACT/vocab/item_id.parquet       the item vocabulary (kind: vocab item tables only)
    ARTIFACT/ranker/                     a paired ranking artifact (retrieve, then rank):
                                         `recommend(..., rerank=N)` orders the top N by it

`Artifact.load` verifies every checksum before anything is deserialized, so a corrupted or
edited file fails with its name. The runtime hashes raw ids in numpy with the manifest's
seeds (the same hash as training), or through the artifact's vocabulary (a vocab table), pads, and calls the AOTInductor program (or, without
one, the exported program).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genrec.config import Config, from_dict
from genrec.data_pipeline.batch import ITEM_KEY
from genrec.deploy.index import ItemIndex
from genrec.deploy.programs import item_rows_np, load_item_vocabulary, pad_histories
from genrec.embeddings.hashing import check_hash_version

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ENCODER = "user_encoder"
RANKER = "ranker"
ITEMS = "items.safetensors"
WEIGHTS = "model.safetensors"
RERANKER_DIR = "ranker"


class ArtifactError(ValueError):
    """An artifact directory that is missing, corrupted, or from an incompatible export."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(directory: Path, names: list[str]) -> dict[str, dict]:
    return {
        n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size}
        for n in sorted(names)
    }


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """The manifest, after checking every listed file's sha256 (fails naming the file)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{directory} is not a genrec artifact (no {MANIFEST}); run genrec export"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); re-export the artifact") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')} but this genrec reads "
            f"{FORMAT_VERSION}; re-export with this release"
        )
    check_hash_version(int(manifest["hashing"]["version"]))
    if verify:
        for name, entry in manifest["files"].items():
            f = directory / name
            if not f.is_file():
                raise ArtifactError(f"{f}: listed in {MANIFEST} but missing; re-export")
            digest = sha256_file(f)
            if digest != entry["sha256"]:
                raise ArtifactError(
                    f"{f}: checksum mismatch (sha256 {digest[:16]}..., manifest says "
                    f"{entry['sha256'][:16]}...): the file is corrupted or was changed; re-export"
                )
    return manifest


def _load_program(directory: Path, stem: str, manifest: dict, prefer_aot: bool):
    aot = f"{stem}.aoti.pt2"
    if prefer_aot and aot in manifest["files"]:
        return torch._inductor.aoti_load_package(str(directory / aot)), "aoti"
    plain = f"{stem}.pt2"
    return torch.export.load(str(directory / plain)).module(), "export"


@dataclass
class Recommendation:
    ids: np.ndarray  # int64 [k'] (misses dropped)
    scores: np.ndarray  # float32 [k']


class Artifact:
    """Loaded artifact: `encode`, `recommend` (retrieval) and `rank` (ranking)."""

    def __init__(self, directory: str | Path, prefer_aot: bool = True, verify: bool = True):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir, verify=verify)
        self.cfg: Config = from_dict(self.manifest["config"])
        self.task: str = self.manifest["task"]
        self.item_hashing = self.manifest["hashing"]["features"][ITEM_KEY]
        self.item_vocab = load_item_vocabulary(self.dir, self.item_hashing)
        self.max_len = int(self.manifest["feature_spec"]["max_len"])
        self.encoder = self.ranker = self.reranker = None
        self.rerank_weights: dict[str, float] = {}
        self.index: ItemIndex | None = None
        self.backend = None
        if self.task == "retrieval":
            from safetensors.numpy import load_file

            self.encoder, self.backend = _load_program(self.dir, ENCODER, self.manifest, prefer_aot)
            items = load_file(str(self.dir / ITEMS))
            self.index = ItemIndex.load(self.dir, items["item_ids"], items["embeddings"])
            self.reranker, self.rerank_weights = self._load_reranker(prefer_aot, verify)
        else:
            self.ranker, self.backend = _load_program(self.dir, RANKER, self.manifest, prefer_aot)
            self.tasks: list[str] = list(self.manifest["ranking"]["tasks"])
            self.regression: list[bool] = list(self.manifest["ranking"]["regression"])

    def _load_reranker(self, prefer_aot: bool, verify: bool):
        """The paired ranker (manifest "rerank") and its task weights, or (None, {})."""
        spec = self.manifest.get("rerank")
        if not spec:
            return None, {}
        sub = self.dir / spec["dir"]
        if verify and sha256_file(sub / MANIFEST) != spec["manifest_sha256"]:
            raise ArtifactError(f"{sub / MANIFEST}: checksum mismatch; re-export the pair")
        return Artifact(sub, prefer_aot, verify), dict(spec["weights"])

    @property
    def limits(self):
        return self.cfg.deploy

    def _inputs(self, histories, timestamps, actions):
        hs = [np.asarray(h, dtype=np.int64) for h in histories]
        ts = [
            np.zeros(len(h), np.int64) if t is None else np.asarray(t, np.int64)
            for h, t in zip(hs, timestamps or [None] * len(hs))
        ]
        acts = [
            np.zeros(len(h), np.int64) if a is None else np.asarray(a, np.int64)
            for h, a in zip(hs, actions or [None] * len(hs))
        ]
        return pad_histories(hs, ts, acts, self.max_len, self.item_hashing, self.item_vocab)

    @torch.no_grad()
    def encode(self, histories, timestamps=None, actions=None) -> torch.Tensor:
        """[B, D] user states (as the model scores them) after each history's last event."""
        if self.encoder is None:
            raise ArtifactError(f"{self.dir}: a {self.task} artifact has no user encoder")
        return self.encoder(*self._inputs(histories, timestamps, actions))

    def recommend(
        self,
        histories,
        k: int | list[int],
        timestamps=None,
        actions=None,
        exclude_history: bool | list[bool] = True,
        rerank: int | list[int] = 0,
    ) -> list[Recommendation]:
        """Top k per history from the index (k, exclude_history and rerank: one for all or
        one per history); with rerank=N >= k the index's top N ordered by the paired
        ranker's weighted task scores (`rerank`), of which the first k."""
        n = len(histories)
        ks, excl, reranks = (_per(x, n) for x in (k, exclude_history, rerank))
        depth = [max(a, b) for a, b in zip(ks, reranks)]
        states = self.encode(histories, timestamps, actions)
        exclude = [set(map(int, h)) if e else set() for h, e in zip(histories, excl)]
        ids, scores = self.index.search(states, max(depth), exclude)
        out = []
        for b in range(n):
            keep = ids[b, : depth[b]] >= 0
            out.append(Recommendation(ids[b, : depth[b]][keep], scores[b, : depth[b]][keep]))
        todo = [b for b in range(n) if reranks[b] and out[b].ids.size]
        if todo:
            ordered = self.rerank(
                [histories[b] for b in todo],
                [out[b].ids for b in todo],
                [timestamps[b] for b in todo] if timestamps else None,
                [actions[b] for b in todo] if actions else None,
            )
            for b, rec in zip(todo, ordered):
                out[b] = rec
        return [Recommendation(r.ids[:kb], r.scores[:kb]) for r, kb in zip(out, ks)]

    def rerank(self, histories, candidates, timestamps=None, actions=None) -> list:
        """Candidates ordered by sum_t weight_t * score_t of the paired ranker (stable:
        ties keep the retrieval order); the scores returned are those weighted sums."""
        if self.reranker is None:
            raise ArtifactError(f"{self.dir}: no paired ranker; export with --ranker")
        per_task = self.reranker.rank(histories, candidates, timestamps, actions)
        out = []
        for c, s in zip(candidates, per_task):
            total = sum(w * np.asarray(s[t], np.float64) for t, w in self.rerank_weights.items())
            order = np.argsort(-total, kind="stable")
            out.append(Recommendation(np.asarray(c)[order], total[order].astype(np.float32)))
        return out

    @torch.no_grad()
    def rank(self, histories, candidates, timestamps=None, actions=None) -> list[dict]:
        """Per request {task: [score per candidate]}: sigmoid for BCE tasks, raw regression."""
        if self.ranker is None:
            raise ArtifactError(f"{self.dir}: a {self.task} artifact has no ranker")
        rows, act, ts, lens = self._inputs(histories, timestamps, actions)
        C = max(len(c) for c in candidates)
        cand = np.zeros((len(candidates), C), dtype=np.int64)
        for b, c in enumerate(candidates):
            cand[b, : len(c)] = c
            cand[b, len(c) :] = c[-1]  # padding candidates are scored and dropped
        last_ts = ts[torch.arange(len(lens)), lens - 1]
        cand_rows = torch.from_numpy(item_rows_np(cand, self.item_hashing, self.item_vocab))
        logits = self.ranker(
            rows, act, ts, lens, cand_rows, last_ts[:, None].expand(-1, C).contiguous()
        )
        out = []
        for b, c in enumerate(candidates):
            lb = logits[b, : len(c)]
            out.append(
                {
                    t: (lb[:, j] if reg else torch.sigmoid(lb[:, j])).tolist()
                    for j, (t, reg) in enumerate(zip(self.tasks, self.regression))
                }
            )
        return out


def _per(value, n: int) -> list:
    """One value per request: a list as given, a scalar repeated."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n
