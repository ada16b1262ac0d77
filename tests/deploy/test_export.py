"""Export: sharded checkpoints of any world size load in one process, and the exported
(AOTInductor-compiled) programs reproduce the eager model on real ml-100k histories."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from genrec.data_pipeline.batch import make_batch
from genrec.deploy.artifact import MANIFEST, Artifact, ArtifactError, read_manifest, sha256_file
from genrec.deploy.programs import item_rows_np
from genrec.embeddings.hashing import HASH_VERSION, feature_seed
from tests.deploy.helpers import query_batch

TOL = 1e-5  # max abs difference, exported vs eager, on L2-normalized states / cosines


def _args(seqs):
    return (
        [s["item_id"] for s in seqs],
        [s["timestamp"] for s in seqs],
        [s["action"] for s in seqs],
    )


@pytest.mark.parametrize("world_size", [2, 1])
def test_checkpoint_of_any_world_size_loads_unsharded(deploy_env, world_size):
    from genrec.deploy.export import load_checkpoint_model

    model, cfg, state = load_checkpoint_model(deploy_env.checkpoints[world_size])
    assert state["world_size"] == world_size and cfg == deploy_env.cfg
    ids, scores, _ = model.top_k(
        query_batch(deploy_env.seqs[:8], True), torch.from_numpy(deploy_env.catalog), 10
    )
    ref = deploy_env.sharded_top10[world_size]
    np.testing.assert_array_equal(ids.numpy(), ref["ids"])
    np.testing.assert_allclose(scores.numpy(), ref["scores"], atol=1e-6)


def test_aoti_program_matches_eager_states(deploy_env, eager_model, retrieval_artifact):
    art = Artifact(retrieval_artifact)
    assert art.backend == "aoti"
    seqs = deploy_env.seqs[:16]
    seqs[3] = {k: v[:1] for k, v in seqs[3].items()}  # a one-event history
    batch = query_batch(seqs, True)
    with torch.no_grad():
        eager, _, rows = eager_model.user_states(batch)  # jagged training path
    assert rows.tolist() == list(range(16))
    got = art.encode(*_args(seqs))
    assert (got - eager).abs().max().item() < TOL
    one = art.encode(*_args(seqs[5:6]))  # a batch size and length not traced at export
    assert (one - eager[5:6]).abs().max().item() < TOL


def test_aoti_top_k_matches_eager(deploy_env, eager_model, retrieval_artifact):
    art = Artifact(retrieval_artifact)
    seqs = deploy_env.seqs[8:24]
    catalog = torch.from_numpy(deploy_env.catalog)
    for exclude in (True, False):
        ids, scores, _ = eager_model.top_k(query_batch(seqs, True), catalog, 20, exclude)
        recs = art.recommend(*_args(seqs)[:1], 20, *_args(seqs)[1:], exclude_history=exclude)
        for r, i, s in zip(recs, ids.numpy(), scores.numpy()):
            np.testing.assert_array_equal(r.ids, i)
            assert np.abs(r.scores - s).max() < TOL
        if exclude:
            assert not any(set(r.ids) & set(q["item_id"].tolist()) for r, q in zip(recs, seqs))


def test_history_longer_than_max_len_keeps_the_last_events(
    deploy_env, eager_model, retrieval_artifact
):
    art = Artifact(retrieval_artifact)
    a, b = deploy_env.seqs[0], deploy_env.seqs[1]
    long = {k: np.concatenate([b[k], a[k]]) for k in a}  # 48 events > model.max_len=32
    tail = {k: v[-32:] for k, v in long.items()}
    got = art.encode(*_args([long]))
    ref = art.encode(*_args([tail]))
    assert (got - ref).abs().max().item() == 0.0


def test_exported_program_fallback_matches_eager(deploy_env, eager_model, retrieval_artifact):
    art = Artifact(retrieval_artifact, prefer_aot=False)
    assert art.backend == "export"
    seqs = deploy_env.seqs[:8]
    with torch.no_grad():
        eager, _, _ = eager_model.user_states(query_batch(seqs, True))
    assert (art.encode(*_args(seqs)) - eager).abs().max().item() < TOL


def test_serving_hash_equals_training_hash(deploy_env, eager_model, retrieval_artifact):
    manifest = read_manifest(retrieval_artifact)
    spec = manifest["hashing"]["features"]["item_id"]
    assert manifest["hashing"]["version"] == HASH_VERSION
    assert spec["seeds"] == [feature_seed("item_id", j) for j in range(2)]
    seen = deploy_env.catalog[:50]
    unseen = np.array([0, 10**6, 10**12, 2**62 + 12345, 2**63 - 1], dtype=np.int64)
    raw = np.concatenate([seen, unseen])
    assert not np.isin(unseen[1:], deploy_env.catalog).any()
    batch = make_batch(raw, np.zeros_like(raw), np.zeros_like(raw), [raw.size], [0], [0], [0])
    rows = eager_model.sparse.hash_features(batch.features)
    serving = item_rows_np(raw, spec)
    for j, key in enumerate(["item_id#0", "item_id#1"]):
        np.testing.assert_array_equal(serving[:, j], rows[key].values().numpy())


def test_manifest_checksums_every_file(retrieval_artifact):
    manifest = read_manifest(retrieval_artifact)
    on_disk = {p.name for p in retrieval_artifact.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    expected = {
        "user_encoder.pt2",
        "user_encoder.aoti.pt2",
        "items.safetensors",
        "model.safetensors",
        "index.json",
    }
    assert expected <= on_disk
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(retrieval_artifact / name)
    assert manifest["feature_spec"]["max_len"] == 32 and manifest["index"]["kind"] == "exact"
    assert manifest["index"]["items"] == 1682 and "torch" in manifest["packages"]
    assert manifest["source_checkpoint"]["world_size"] == 2


@pytest.mark.parametrize("victim", ["items.safetensors", "user_encoder.aoti.pt2"])
def test_corrupted_artifact_fails_naming_the_file(retrieval_artifact, tmp_path, victim):
    copy = tmp_path / "art"
    shutil.copytree(retrieval_artifact, copy)
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=victim.replace(".", r"\.") + ": checksum mismatch"):
        Artifact(copy)


def test_missing_manifest_or_newer_format_is_refused(retrieval_artifact, tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path)
    copy = tmp_path / "art"
    shutil.copytree(retrieval_artifact, copy)
    m = json.loads((copy / MANIFEST).read_text())
    m["format_version"] = 99
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format_version 99"):
        read_manifest(copy)


def test_ranker_export_matches_eager(deploy_env, ranking_setup):
    model, artifact = ranking_setup
    art = Artifact(artifact)
    assert art.task == "ranking" and art.tasks == ["click", "like"]
    seqs = deploy_env.seqs[:6]
    hists = [{k: v[:-4] for k, v in s.items()} for s in seqs]
    unseen = 10**9 + 7
    cands = [
        np.append(s["item_id"][-4:], np.full(b % 3, unseen, np.int64)) for b, s in enumerate(seqs)
    ]
    got = art.rank(*_args(hists)[:1], cands, *_args(hists)[1:])
    # eager: candidates appended as targets, timestamped like serving (last history time)
    items, acts, ts, lens = [], [], [], []
    for h, c in zip(hists, cands):
        items.append(np.concatenate([h["item_id"], c]))
        acts.append(np.concatenate([h["action"], np.zeros(c.size, np.int64)]))
        ts.append(np.concatenate([h["timestamp"], np.full(c.size, h["timestamp"][-1])]))
        lens.append(items[-1].size)
    batch = make_batch(
        np.concatenate(items),
        np.concatenate(acts),
        np.concatenate(ts),
        lens,
        [c.size for c in cands],
        np.arange(6),
        np.zeros(6, np.int64),
    )
    with torch.no_grad():
        logits, _, rows = model.predict(batch)
    probs = torch.sigmoid(logits)
    for b in range(6):
        mine = probs[rows == b]
        for j, task in enumerate(art.tasks):
            assert np.abs(np.array(got[b][task]) - mine[:, j].numpy()).max() < TOL


def test_direct_item_table_exports_and_refuses_ids_without_a_row(deploy_env, direct_setup):
    """kind=direct: serving's rows are the raw ids, as training's; the exported program
    equals the eager model (states and top-K); an id beyond the table fails naming it."""
    model, out = direct_setup
    art = Artifact(out, prefer_aot=False)
    spec = art.item_hashing
    assert spec["kind"] == "direct" and spec["seeds"] == [] and spec["num_buckets"] == 1683
    raw = deploy_env.catalog[:50]
    batch = make_batch(raw, np.zeros_like(raw), np.zeros_like(raw), [raw.size], [0], [0], [0])
    rows = model.sparse.hash_features(batch.features)["item_id"].values().numpy()
    np.testing.assert_array_equal(item_rows_np(raw, spec)[:, 0], rows)
    np.testing.assert_array_equal(rows, raw)
    seqs = deploy_env.seqs[:8]
    with torch.no_grad():
        eager, _, _ = model.user_states(query_batch(seqs, True))
    assert (art.encode(*_args(seqs)) - eager).abs().max().item() < TOL
    ids, scores, _ = model.top_k(query_batch(seqs, True), torch.from_numpy(deploy_env.catalog), 10)
    for r, i, s in zip(art.recommend(*_args(seqs)[:1], 10, *_args(seqs)[1:]), ids, scores):
        np.testing.assert_array_equal(r.ids, i.numpy())
        assert np.abs(r.scores - s.numpy()).max() < TOL
    with pytest.raises(ValueError, match=r"item id 1683 has no row in the direct item table"):
        art.encode([np.array([5, 1683, 7])])
