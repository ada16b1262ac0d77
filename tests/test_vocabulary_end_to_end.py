"""A kind: vocab item table end to end: `genrec prepare`'s data, its vocabulary file, a short
2-rank training run (TorchRec DMP, row-wise sharded item table), export, and the Artifact.
Seen, rare and unseen ids get the same rows in training, export and serving, and those rows
hold the same embeddings; a missing or mismatched vocabulary fails naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from genrec.config import from_dict
from genrec.data_pipeline.batch import make_batch
from genrec.data_pipeline.model_inputs import read_model_inputs
from genrec.data_pipeline.vocabulary import Vocabulary, vocab_path, write_item_vocabulary
from genrec.deploy.artifact import Artifact, ArtifactError
from genrec.deploy.programs import item_rows_np
from genrec.trainer.checkpoint import latest_checkpoint
from tests.deploy.helpers import query_batch
from tests.trainer.helpers import final_model_state, make_prepared, tiny_config

TOL = 1e-5
OVERFLOW = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    """(base dir, vocabulary, run dir, exported artifact dir) of one short vocab run."""
    from genrec.deploy.export import export
    from genrec.trainer.launch import train

    base = make_prepared(
        tmp_path_factory.mktemp("vocab"), users=120, events=6_000, items=400, seed=5
    )
    counts = pq.read_table(base / "prepared" / "items.parquet").column("count").to_numpy()
    min_count = int(np.median(counts)) + 1  # about half the items are rare
    vocab = write_item_vocabulary(str(base / "prepared"), min_count, OVERFLOW)
    cfg = tiny_config(
        base / "prepared",
        base / "run",
        "trainer.batch_size=8",
        "trainer.max_steps=4",
        "trainer.eval_batches=1",
        "model.retrieval.num_negatives=16",
        "embeddings.tables=[{name: item, num_embeddings: "
        f"{vocab.num_rows}, dim: 32, features: [item_id], kind: vocab}}]",
    )
    train(cfg, resume=False)
    out = base / "artifact"
    export(str(base / "run"), str(out), compile_aot=False)
    return base, vocab, base / "run", out


def _ids(base: Path, vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seen, rare, unseen) raw item ids: in the vocabulary, counted below min_count, never
    in the data."""
    items = pq.read_table(base / "prepared" / "items.parquet")
    ids, counts = items.column("item_id").to_numpy(), items.column("count").to_numpy()
    rare = ids[counts < vocab.min_count]
    unseen = np.array([ids.max() + 1, ids.max() + 977, 10**15, 3 * 10**17], np.int64)
    assert rare.size >= 20 and vocab.ids.size >= 20 and not np.isin(unseen, ids).any()
    return vocab.ids[:40], rare[:40], unseen


def test_rows_and_embeddings_agree_in_training_export_and_serving(trained):
    from genrec.deploy.export import load_checkpoint_model
    from genrec.models.build import build_model

    base, vocab, run, out = trained
    seen, rare, unseen = _ids(base, vocab)
    raw = np.concatenate([seen, rare, unseen])
    # training: the trainer's own module over the checkpoint it wrote
    weights, state = final_model_state(run)
    assert state["world_size"] == 2 and state["step"] == 4
    train_cfg = from_dict(state["config"])
    train_model = build_model(train_cfg, read_model_inputs(train_cfg))
    train_model.load_state_dict(weights)
    batch = make_batch(raw, np.zeros_like(raw), np.zeros_like(raw), [raw.size], [0], [0], [0])
    train_rows = train_model.sparse.hash_features(batch.features)["item_id"].values().numpy()
    # export: the model export loaded; serving: the artifact's numpy mapping
    export_model = load_checkpoint_model(latest_checkpoint(run))[0]
    export_rows = export_model.sparse.hash_features(batch.features)["item_id"].values().numpy()
    art = Artifact(out, prefer_aot=False)
    assert art.item_hashing["kind"] == "vocab" and np.array_equal(
        art.item_vocab.digest(), vocab.digest()
    )
    serve_rows = item_rows_np(raw, art.item_hashing, art.item_vocab)[:, 0]
    np.testing.assert_array_equal(train_rows, export_rows)
    np.testing.assert_array_equal(train_rows, serve_rows)
    n = vocab.ids.size
    np.testing.assert_array_equal(train_rows[: seen.size], np.arange(seen.size))  # own rows
    assert (train_rows[seen.size :] >= n).all() and (train_rows < n + OVERFLOW).all()
    # the same embedding rows: trained weights, exported program weights, artifact file
    w_train = train_model.sparse.table_weight("item").detach()
    w_art = art.encoder.state_dict()["item_table"]
    torch.testing.assert_close(w_train, export_model.sparse.table_weight("item").detach())
    torch.testing.assert_close(w_art[serve_rows], w_train[train_rows], rtol=0, atol=0)
    assert not torch.equal(
        w_train, build_model(train_cfg, read_model_inputs(train_cfg)).sparse.table_weight("item")
    )
    # the exported program on histories of seen, rare and unseen ids equals the eager model
    seqs = [
        {"item_id": h, "timestamp": np.arange(h.size) * 60, "action": np.zeros(h.size, np.int64)}
        for h in (raw[:12], raw[40:52], np.concatenate([seen[:3], unseen, rare[:3]]))
    ]
    with torch.no_grad():
        eager, _, _ = train_model.eval().user_states(query_batch(seqs, True))
    got = art.encode(*[[s[k] for s in seqs] for k in ("item_id", "timestamp", "action")])
    assert (got - eager).abs().max().item() < TOL


def test_missing_or_mismatched_vocabulary_fails_naming_the_file(trained, tmp_path):
    from genrec.deploy.export import export

    base, vocab, run, out = trained
    # the artifact: a missing or edited vocabulary file
    art_dir = tmp_path / "artifact"
    shutil.copytree(out, art_dir)
    file = vocab_path(art_dir, "item_id")
    file.unlink()
    with pytest.raises(ArtifactError, match=rf"{file}: listed in manifest.json but missing"):
        Artifact(art_dir, prefer_aot=False)
    with pytest.raises(FileNotFoundError, match=rf"{file} is missing: .*re-export"):
        Artifact(art_dir, prefer_aot=False, verify=False)
    Vocabulary.from_counts(vocab.ids + 1, vocab.counts, 1, OVERFLOW).write(art_dir)
    with pytest.raises(ArtifactError, match=rf"{file}: checksum mismatch"):
        Artifact(art_dir, prefer_aot=False)
    # the prepared dir: another vocabulary of the same size, then one of another size
    prepared = base / "prepared"
    original = vocab_path(prepared, "item_id")
    saved = tmp_path / "saved.parquet"
    shutil.copyfile(original, saved)
    try:
        Vocabulary.from_counts(vocab.ids + 1, vocab.counts, 1, OVERFLOW).write(prepared)
        with pytest.raises(ValueError, match=rf"{original}: this vocabulary of 'item_id' is not "
                           "the one the checkpoint's rows were trained under"):  # fmt: skip
            export(str(run), str(tmp_path / "a"), compile_aot=False)
        Vocabulary.from_counts(vocab.ids, vocab.counts, 1, OVERFLOW + 1).write(prepared)
        with pytest.raises(ValueError, match=rf"{original}: the vocabulary has .* rows .*set "
                           f"num_embeddings: {vocab.num_rows + 1}"):  # fmt: skip
            export(str(run), str(tmp_path / "b"), compile_aot=False)
        original.unlink()
        with pytest.raises(FileNotFoundError, match=rf"{original} is missing: table 'item'"):
            export(str(run), str(tmp_path / "c"), compile_aot=False)
    finally:
        shutil.copyfile(saved, original)


def test_plan_sizes_vocab_tables_from_the_vocabulary_file(tmp_path, capsys):
    """`genrec plan` takes a vocab table's rows from its file (the config's num_embeddings
    is wrong here: the plan notes the fix), and its shards cover exactly those rows."""
    from genrec.config import Config, TableConfig
    from genrec.sharding_plans.planner import build_plan, plan_command, sized_by_vocabularies

    vocab = Vocabulary.from_counts(np.arange(1000, 1037), np.arange(37) + 1, 5, OVERFLOW)
    vocab.write(tmp_path)
    cfg = Config()
    cfg.data.prepared_dir = str(tmp_path)
    cfg.embeddings.tables = [
        TableConfig(name="item", num_embeddings=99, dim=16, features=["item_id"], kind="vocab")
    ]
    cfg.sharding.strategy = "row_wise"
    cfg.sharding.topology.world_size = 2
    sized, vocabs, notes = sized_by_vocabularies(cfg)
    rows = 33 + OVERFLOW  # ids counted >= 5
    assert vocab.num_rows == rows and sized.embeddings.tables[0].num_embeddings == rows
    assert cfg.embeddings.tables[0].num_embeddings == 99  # the caller's config is untouched
    assert notes == [
        f"table 'item': {rows} rows from {vocab_path(tmp_path, 'item_id')} (config says 99; "
        f"set num_embeddings: {rows} to train it)"
    ]
    assert plan_command(cfg) == 0
    printed = capsys.readouterr().out
    assert f"vocab {notes[0]}" in printed
    from genrec.embeddings.tables import SparseEmbeddings

    module = SparseEmbeddings(
        sized.embeddings, torch.device("meta"), mc_buckets=2, vocabularies=vocabs
    )
    plan = build_plan(sized, module, world_size=2, device_type="cpu")
    shards = plan.plan["ec"]["item"].sharding_spec.shards
    assert sum(s.shard_sizes[0] for s in shards) == rows
    (tmp_path / "vocab" / "item_id.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab/item_id.parquet is missing: table 'item'"):
        plan_command(cfg)
