"""Checkpoint -> serving artifact (see genrec.deploy.artifact for the layout).

    manifest = export("runs/x/run/checkpoints/step-00000420", "artifacts/x")

A checkpoint written at ANY world size is read in this one process: the model is built
unsharded from the config stored in the checkpoint (`state.json`), and
`torch.distributed.checkpoint.load` (no process group) fills its state dict, whose keys are
the unsharded FQNs that DMP kept. Then: item embeddings of the whole catalog and an index
over them (retrieval), the user encoder (or ranker) traced with `torch.export` (batch and
sequence length dynamic) and, unless compile_aot=False, compiled and packaged with
AOTInductor for this machine's device, the unsharded weights as safetensors, and finally
manifest.json with the sha256 of every file. Weights never go through pickle. A vocab
table's vocabulary (PREPARED/vocab/FEATURE.parquet, checked against the digest the
checkpoint recorded) is copied to ARTIFACT/vocab/, its sha256 in the hashing spec too.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from genrec.config import Config, from_dict, to_dict
from genrec.data_pipeline.batch import ITEM_KEY
from genrec.data_pipeline.model_inputs import read_model_inputs
from genrec.data_pipeline.vocabulary import vocab_path
from genrec.deploy.artifact import (
    ENCODER,
    FORMAT_VERSION,
    ITEMS,
    MANIFEST,
    RANKER,
    RERANKER_DIR,
    WEIGHTS,
    file_entries,
    sha256_file,
)
from genrec.deploy.index import ItemIndex
from genrec.deploy.programs import (
    RankerProgram,
    UserEncoderProgram,
    dynamic_shapes,
    example_inputs,
    hashing_spec,
)
from genrec.models.build import build_model
from genrec.trainer.checkpoint import latest_checkpoint

MAX_EXPORT_BATCH = 4096
ITEM_BLOCK = 65536


def log(msg: str) -> None:
    """Progress to stderr (stdout stays free for the CLI's summary and benchmarks' JSON)."""
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def load_checkpoint_model(checkpoint: str | Path) -> tuple[torch.nn.Module, Config, dict]:
    """(unsharded eval-mode model, config, state.json) from a checkpoint of any world size."""
    path = Path(checkpoint)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a genrec checkpoint (no state.json); pass a "
            "RUN/checkpoints/step-NNNNNNNN directory"
        )
    state = json.loads(state_file.read_text())
    if "config" not in state:
        raise ValueError(f"{state_file}: has no 'config'; the checkpoint is too old to export")
    cfg = from_dict(state["config"])
    model = build_model(cfg, read_model_inputs(cfg))
    sd = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: loading in this process"
        dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(sd["model"])
    model.sparse.check_vocabularies()  # the prepared dir's vocabulary is the trained one
    return model.eval(), cfg, state


def load_catalog_ids(cfg: Config, catalog: str | None = None) -> np.ndarray:
    """Sorted unique raw item ids of items.parquet (cfg.data.prepared_dir or `catalog`)."""
    path = Path(catalog) if catalog else Path(cfg.data.prepared_dir) / "items.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"item catalog {path} not found: export needs items.parquet (column item_id) "
            "written by `genrec prepare`; pass catalog=PATH when the prepared dir moved"
        )
    ids = pq.read_table(path, columns=[ITEM_KEY]).column(0).to_numpy().astype(np.int64)
    return np.unique(ids)


@torch.no_grad()
def item_embeddings(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    out = [
        model.item_embeddings(torch.from_numpy(ids[s : s + ITEM_BLOCK])).float()
        for s in range(0, ids.size, ITEM_BLOCK)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def save_weights(model: torch.nn.Module, dest: Path) -> None:
    """The model's full state dict as dest/WEIGHTS (safetensors)."""
    save_file(
        {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
        str(dest / WEIGHTS),
    )


def manifest_fields(cfg: Config, state: dict, checkpoint, compiled: bool) -> dict:
    """The manifest fields every artifact kind shares: format, task, source checkpoint,
    device, packages and the run's config."""
    return {
        "format_version": FORMAT_VERSION,
        "created_unix": int(time.time()),
        "task": cfg.model.task,
        "model_kind": cfg.model.kind,
        "source_checkpoint": {
            "path": str(Path(checkpoint).resolve()),
            "step": state.get("step"),
            "world_size": state.get("world_size"),
        },
        "device": "cpu",
        "compiled": compiled,
        "packages": _versions(),
        "config": to_dict(cfg),
    }


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchrec", "fbgemm_gpu-cpu", "faiss-cpu", "safetensors", "genrec"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _export_program(
    program: torch.nn.Module, stem: str, out: Path, cfg: Config, compile_aot: bool
) -> list[str]:
    ranker = isinstance(program, RankerProgram)
    hashing = hashing_spec(cfg)["features"][ITEM_KEY]
    args = example_inputs(ranker, hashing["num_hashes"], hashing["num_buckets"])
    shapes = dynamic_shapes(ranker, cfg.model.max_len, MAX_EXPORT_BATCH, cfg.deploy.max_k)
    t0 = time.time()
    ep = torch.export.export(program.eval(), args, dynamic_shapes=shapes)
    torch.export.save(ep, str(out / f"{stem}.pt2"))
    log(f"{stem}: torch.export {time.time() - t0:.1f} s")
    files = [f"{stem}.pt2"]
    if compile_aot:
        t0 = time.time()
        torch._inductor.aoti_compile_and_package(ep, package_path=str(out / f"{stem}.aoti.pt2"))
        log(f"{stem}: AOTInductor compile {time.time() - t0:.1f} s")
        files.append(f"{stem}.aoti.pt2")
    return files


def _copy_vocabularies(model: torch.nn.Module, dest: Path) -> dict[str, str]:
    """Copy every vocab table's vocabulary file into the artifact: {feature: its name there}."""
    out = {}
    for f, vocab in model.sparse.vocabularies.items():
        name = vocab_path("", f).as_posix()
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vocab.source, dest / name)
        out[f] = name
    return out


def _feature_spec(cfg: Config, ranker: bool) -> dict:
    inputs = {
        "item_rows": "int64 [B, L, k]: table rows of the history's raw item ids (see hashing)",
        "actions": f"int64 [B, L] in [0, {cfg.model.num_actions}) (request default 0)",
        "timestamps": "int64 [B, L] seconds (request default 0)",
        "lengths": "int64 [B] in [1, L]; events left-aligned, the rest is padding",
    }
    if ranker:
        inputs["cand_rows"] = "int64 [B, C, k]: table rows of the candidates"
        inputs["cand_timestamps"] = "int64 [B, C] (serving: the last history timestamp)"
    cosine = cfg.model.retrieval.similarity == "cosine"
    state = "[B, D] " + (
        "L2-normalized user state" if cosine else "user state (dot-product scores)"
    )
    return {
        "inputs": inputs,
        "output": "[B, C, K] task logits" if ranker else state,
        "max_len": cfg.model.max_len,
        "max_history": cfg.deploy.max_history,
        "max_k": cfg.deploy.max_k,
        "dim": cfg.model.dim,
        "num_actions": cfg.model.num_actions,
        "truncation": "a history longer than max_len keeps its last max_len events",
    }


def export(
    checkpoint: str,
    out: str,
    compile_aot: bool = True,
    catalog: str | None = None,
    index_kind: str | None = None,
    ranker: str | None = None,
    rerank_weights: dict[str, float] | None = None,
) -> dict:
    """Write the serving artifact of `checkpoint` into `out`; returns the manifest.

    `ranker`: a ranking checkpoint exported beside a retrieval one, into `out/ranker/` (a
    complete ranking artifact with its own manifest), so that `/recommend` with `rerank: N`
    can order the index's top N by the ranker's tasks, weighted by `rerank_weights`
    ({task: weight}; default the ranker's first binary task alone)."""
    t_start = time.time()
    if (Path(checkpoint) / "checkpoints").is_dir():  # a run directory: take its latest
        latest = latest_checkpoint(checkpoint)
        if latest is None:
            raise FileNotFoundError(f"{checkpoint} is a run directory without checkpoints")
        checkpoint = str(latest)
    model, cfg, state = load_checkpoint_model(checkpoint)
    log(f"loaded {checkpoint} (step {state.get('step')}, world size {state.get('world_size')})")
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        if not (dest / "manifest.json").is_file():
            raise FileExistsError(
                f"--out {dest} exists and is not a genrec artifact; choose an empty or new "
                "directory (an existing artifact there is replaced)"
            )
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if cfg.model.task == "generative":  # eager decoder + codes (deploy/semantic_artifact.py)
        from genrec.deploy.semantic_artifact import export_generative

        return export_generative(model, cfg, state, checkpoint, dest)
    files: list[str] = []
    extra: dict = {}
    if cfg.model.task == "retrieval":
        ids = load_catalog_ids(cfg, catalog)
        emb = item_embeddings(model, ids)
        save_file(
            {"item_ids": torch.from_numpy(ids), "embeddings": torch.from_numpy(emb)},
            str(dest / ITEMS),
        )
        files.append(ITEMS)
        kind = index_kind or (
            "exact" if ids.size < cfg.deploy.exact_search_below else cfg.deploy.index
        )
        t0 = time.time()
        index = ItemIndex.build(ids, emb, kind)
        files += index.save(dest)
        log(f"{ids.size} items, {kind} index built in {time.time() - t0:.1f} s")
        extra["index"] = {"kind": kind, "items": int(ids.size), **index.params}
        files += _export_program(UserEncoderProgram(model, cfg), ENCODER, dest, cfg, compile_aot)
    else:
        extra["ranking"] = {
            "tasks": list(cfg.model.ranking.tasks),
            "regression": [
                t in cfg.model.ranking.regression_tasks for t in cfg.model.ranking.tasks
            ],
        }
        files += _export_program(RankerProgram(model, cfg), RANKER, dest, cfg, compile_aot)
    save_weights(model, dest)
    files.append(WEIGHTS)
    vocab_files = _copy_vocabularies(model, dest)
    files += list(vocab_files.values())
    manifest = {
        **manifest_fields(cfg, state, checkpoint, compiled=compile_aot),
        "hashing": hashing_spec(cfg, {f: sha256_file(dest / n) for f, n in vocab_files.items()}),
        "feature_spec": _feature_spec(cfg, cfg.model.task == "ranking"),
        **extra,
        "files": file_entries(dest, files),
    }
    if ranker:
        manifest["rerank"] = _export_reranker(
            cfg, ranker, dest, compile_aot, rerank_weights, manifest["hashing"]
        )
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    log(f"wrote {len(files)} files + {MANIFEST} to {dest} in {time.time() - t_start:.1f} s")
    return manifest


def _export_reranker(
    cfg: Config,
    ranker: str,
    dest: Path,
    compile_aot: bool,
    weights: dict[str, float] | None,
    hashing: dict,
) -> dict:
    """Export the paired ranking checkpoint into dest/RERANKER_DIR; its manifest section."""
    if cfg.model.task != "retrieval":
        raise ValueError(f"--ranker pairs a ranker with a RETRIEVAL checkpoint, not {ranker!r}")
    sub = export(ranker, str(dest / RERANKER_DIR), compile_aot=compile_aot)
    if sub["task"] != "ranking":
        raise ValueError(f"--ranker {ranker}: a {sub['task']} checkpoint, not a ranking one")
    if sub["hashing"]["features"][ITEM_KEY] != hashing["features"][ITEM_KEY]:
        raise ValueError(
            f"--ranker {ranker}: its item table hashes ids differently from the retrieval "
            "model's; pair checkpoints trained with the same embeddings.tables"
        )
    tasks, regression = sub["ranking"]["tasks"], sub["ranking"]["regression"]
    if not weights:
        binary = [t for t, r in zip(tasks, regression) if not r]
        weights = {(binary or tasks)[0]: 1.0}
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ValueError(f"rerank weights name tasks {unknown}; the ranker has {tasks}")
    return {
        "dir": RERANKER_DIR,
        "weights": dict(weights),
        "manifest_sha256": sha256_file(dest / RERANKER_DIR / MANIFEST),
    }
