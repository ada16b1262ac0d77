"""Export and serving of a generative (semantic-ID) model: the decoder and the codes.

    ARTIFACT/manifest.json      task "generative"; sha256 of every other file (as artifact.py)
    ARTIFACT/model.safetensors  the unsharded state dict (encoder, code tables, decoder)
    ARTIFACT/codes.parquet      item_id -> code, the codes the model was trained on; the
                                trie of valid codes is rebuilt from it at load

The runtime is eager, not a torch.export program: constrained beam search walks the trie
with data-dependent shapes. `SemanticArtifact.recommend` answers exactly as the offline
evaluation scores a test user (GenerativeTask.evaluate): each history (its last
model.max_len - 1 events) gets one placeholder event after it, whose target position's
state is the state after the history (the encoder is causal: the placeholder is never
read), then `generate` with model.generative.beam_width / top_k, the history dropped,
the first k. Served top-k == offline beam search (tests/semantic/test_generative.py).
`load_artifact(dir)` picks this class or `artifact.Artifact` by the manifest's task.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from genrec.config import Config, from_dict
from genrec.data_pipeline.batch import ITEM_KEY, sequences_from_rows
from genrec.data_pipeline.model_inputs import ModelInputs, codes_path, read_item_codes
from genrec.deploy.artifact import (
    MANIFEST,
    WEIGHTS,
    Artifact,
    Recommendation,
    _per,
    file_entries,
    read_manifest,
)
from genrec.deploy.programs import hashing_spec
from genrec.models.generative import drop_history

CODES = "codes.parquet"
TASK = "generative"


def export_generative(model, cfg: Config, state: dict, checkpoint: str, dest: Path) -> dict:
    """Write the weights, the codes and the manifest into `dest` (empty); the manifest."""
    from genrec.deploy.export import manifest_fields, save_weights

    save_weights(model, dest)
    shutil.copyfile(codes_path(cfg), dest / CODES)
    files = [WEIGHTS, CODES]
    manifest = {
        **manifest_fields(cfg, state, checkpoint, compiled=False),
        "hashing": hashing_spec(cfg),
        "feature_spec": {"max_len": cfg.model.max_len},
        "generative": {
            "items": int(model.codes.ids.numel()),
            "levels": model.codes.level_sizes,
            "beam_width": cfg.model.generative.beam_width,
            "top_k": cfg.model.generative.top_k,
        },
        "files": file_entries(dest, files),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


class SemanticArtifact:
    """A loaded generative artifact: `recommend` by constrained beam search."""

    task = TASK
    backend = "eager"
    index = None
    reranker = None

    def __init__(self, directory: str | Path, verify: bool = True) -> None:
        from safetensors.torch import load_file

        from genrec.models.build import build_model

        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir, verify=verify)
        self.cfg = from_dict(self.manifest["config"])
        self.item_hashing = self.manifest["hashing"]["features"].get(ITEM_KEY, {})
        inputs = ModelInputs(codes=read_item_codes(self.dir / CODES))  # the artifact's own
        self.model = build_model(self.cfg, inputs)
        self.model.load_state_dict(load_file(str(self.dir / WEIGHTS)))
        self.model.eval()
        self.placeholder = int(self.model.codes.ids[0])  # any coded item: never read

    @property
    def limits(self):
        """deploy's request limits, k capped at model.generative.top_k (what a beam returns),
        so /recommend refuses a larger k with a 422 naming it, before any batch runs."""
        d = self.cfg.deploy
        return dataclasses.replace(d, max_k=min(d.max_k, self.cfg.model.generative.top_k))

    @torch.no_grad()
    def recommend(
        self,
        histories,
        k: int | list[int],
        timestamps=None,
        actions=None,
        exclude_history: bool | list[bool] = True,
        rerank: int | list[int] = 0,
    ) -> list[Recommendation]:
        """Top k items per history by beam search (k <= model.generative.top_k)."""
        n = len(histories)
        ks, excl, reranks = (_per(x, n) for x in (k, exclude_history, rerank))
        g = self.cfg.model.generative
        if max(ks) > g.top_k or any(reranks):
            raise ValueError(
                f"a generative artifact returns at most model.generative.top_k={g.top_k} "
                "items and has no ranker to rerank with"
            )
        keep = self.cfg.model.max_len - 1
        rows = {"user_id": [], "window": [], "item_ids": [], "timestamps": [], "actions": []}
        for b, h in enumerate(histories):
            h = [int(x) for x in h][-keep:]
            ts = _given(timestamps, b)
            ts = list(ts)[-keep:] if ts is not None else [0] * len(h)
            act = _given(actions, b)
            act = list(act)[-keep:] if act is not None else [0] * len(h)
            rows["user_id"].append(b)
            rows["window"].append(0)
            rows["item_ids"].append([*h, self.placeholder])
            rows["timestamps"].append([*map(int, ts), int(ts[-1]) if ts else 0])
            rows["actions"].append([*map(int, act), 0])
        table = pa.table(
            {
                **{c: pa.array(v, pa.list_(pa.int64())) for c, v in rows.items() if c[-1] == "s"},
                "user_id": pa.array(rows["user_id"], pa.int64()),
                "window": pa.array(rows["window"], pa.int32()),
                "num_history": pa.array([len(r) - 1 for r in rows["item_ids"]], pa.int32()),
            }
        )
        batch = sequences_from_rows(table, self.cfg.model.max_len)
        items, scores, _, tgt, pos_rows = self.model.generate(batch, g.beam_width, g.top_k)
        kept = drop_history(batch, items, tgt, pos_rows, g.top_k)
        out = []
        for b in range(n):
            ids = kept[b] if excl[b] else items[b]
            sc = [float(scores[b][items[b] == i][0]) for i in ids.tolist() if i >= 0]
            ids = ids[ids >= 0][: ks[b]].numpy()
            out.append(Recommendation(ids, np.asarray(sc[: ks[b]], np.float32)))
        return out


def _given(per_request, b: int):
    """Request b's list (a list or an array) when given and non-empty, else None."""
    if per_request is None or per_request[b] is None or len(per_request[b]) == 0:
        return None
    return per_request[b]


def load_artifact(directory: str | Path, prefer_aot: bool = True, verify: bool = True):
    """`SemanticArtifact` for a generative artifact, else `artifact.Artifact`."""
    manifest = read_manifest(directory, verify=False)
    if manifest.get("task") == TASK:
        return SemanticArtifact(directory, verify=verify)
    return Artifact(directory, prefer_aot=prefer_aot, verify=verify)
