"""Generative retrieval (model.task=generative) through the real trainer, 2 gloo ranks.

A tiny text-format data set where the next item is a function of the current one (each
user walks a run of consecutive items i, i+1, ..., so the target after item i is i+1),
prepared by the real Ray job, with hand-written unique semantic-ID codes (3 levels, the
last one a disambiguation token). Trained on 2 gloo ranks (TorchRec DMP) in epochs mode,
it must overfit: every test user's next item comes back first from the constrained beam
search (recall@1 over 0.9), and every result is a catalog item. The 2-rank run's test
metrics equal a 1-rank `genrec evaluate` of the same checkpoint (beam search per position
does not depend on the world size).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genrec.config import ConfigError, load_config
from genrec.data_pipeline.batch import sequences_from_rows
from genrec.data_pipeline.model_inputs import read_model_inputs
from genrec.deploy.export import export
from genrec.deploy.semantic_artifact import SemanticArtifact, load_artifact
from genrec.models.generative import drop_history
from genrec.semantic.tokenize import write_codes
from genrec.trainer import checkpoint as ckpt
from genrec.trainer.epochs import loo_view, read_user_sequences
from genrec.trainer.launch import evaluate, train

from ..conftest import ROOT

ITEMS = 48  # ids 1..48
USERS = 240
LENGTH = 6


def item_codes(ids: np.ndarray) -> np.ndarray:
    """Unique codes: (i // 8, (i // 2) % 4, i % 2)."""
    return np.stack([ids // 8, (ids // 2) % 4, ids % 2], axis=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local) -> Path:
    from genrec.data_pipeline.sequences import prepare

    base = tmp_path_factory.mktemp("generative")
    rng = np.random.default_rng(0)
    starts = rng.integers(1, ITEMS - LENGTH + 2, size=USERS)
    lines = [
        f"{u + 1} {' '.join(str(s + j) for j in range(LENGTH))}\n" for u, s in enumerate(starts)
    ]
    (base / "walks.txt").write_text("".join(lines))
    prepare(
        source="text",
        in_dir=str(base / "walks.txt"),
        out_dir=str(base / "prepared"),
        window="1000000000000",
        max_len=20,
    )
    ids = np.arange(1, ITEMS + 1, dtype=np.int64)
    write_codes(base / "codes.parquet", ids, item_codes(ids))
    return base


def _cfg(base: Path, run: str, *extra: str):
    return load_config(
        ROOT / "genrec" / "configs" / "amazon_toys_sid.yaml",
        [
            f"data.prepared_dir={base / 'prepared'}",
            f"trainer.run_dir={base / run}",
            f"model.generative.codes={base / 'codes.parquet'}",
            "model.max_len=20",
            "model.num_layers=1",
            "model.dim=32",
            "model.num_heads=2",
            "model.dropout=0.0",
            "model.generative.decoder_layers=1",
            "model.generative.beam_width=10",
            "model.generative.top_k=10",
            "embeddings.tables=[{name: item, num_embeddings: 512, dim: 32, features: [item_id]},"
            " {name: sid, kind: direct, num_embeddings: 16, dim: 32, features: [sid]}]",
            "trainer.batch_size=32",
            "trainer.lr=0.01",
            "trainer.epochs=6",
            "trainer.eval_every=3",
            "trainer.patience=100",
            "trainer.async_checkpoint=false",
            *extra,
        ],
    )


def test_generative_overfits_on_two_ranks_and_decodes_real_items(data):
    cfg = _cfg(data, "run", "trainer.world_size=2", "sharding.topology.world_size=2")
    train(cfg, resume=False)
    test = json.loads((data / "run" / "summary.json").read_text())["windows"][-1]
    assert test["test/users"] == USERS
    assert test["test/recall@5"] > 0.9, test
    assert test["test/recall@5"] > test["test/most_popular/recall@5"] + 0.5, test

    # the same checkpoint scored on 1 rank: the same numbers as the 2-rank run's
    one = evaluate(_cfg(data, "run"), split="test")
    for key in ("test/recall@5", "test/ndcg@5", "test/recall@10", "test/ndcg@10"):
        assert one[key] == pytest.approx(test[key], abs=1e-12), key

    # in-process, the best checkpoint unsharded: the next item comes back first, every
    # result is a catalog item, and the beam's score of the first is the decoder's
    # teacher-forced log-likelihood of that item's code
    model = _load(_cfg(data, "run"), data / "run", test["best_epoch_step"])
    table = loo_view(read_user_sequences(data / "prepared"), "test")
    batch = sequences_from_rows(table, 20)
    items, scores, targets, tgt, rows = model.generate(batch, beam_width=10, top_k=10)
    assert items.shape == (USERS, 10)
    assert bool(((items >= 1) & (items <= ITEMS)).all()), "a beam result is not a catalog item"
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    first = drop_history(batch, items, tgt, rows, 1)[:, 0]
    assert float((first == targets).double().mean()) > 0.9
    with torch.no_grad():
        states = model._states(batch)[0]
        nll = model.decoder.nll(states, model.codes(items[:, 0]))
    torch.testing.assert_close(-nll, scores[:, 0], atol=1e-4, rtol=1e-4)

    # export + the serving runtime: the same top-k as the offline beam search
    best = ckpt.checkpoint_path(data / "run", test["best_epoch_step"])
    export(str(best), str(data / "artifact"))
    art = load_artifact(data / "artifact")
    assert isinstance(art, SemanticArtifact)
    histories = [row[:-1] for row in table.column("item_ids").to_pylist()]
    served = art.recommend(histories, k=10)
    offline = drop_history(batch, items, tgt, rows, 10)
    for b, rec in enumerate(served):
        want = offline[b][offline[b] >= 0]
        np.testing.assert_array_equal(rec.ids, want.numpy())


def _load(cfg, run_dir: Path, step: int):
    from genrec.models.build import build_model

    model = build_model(cfg, read_model_inputs(cfg))
    app = {"model": model.state_dict()}
    ckpt.load_sharded(ckpt.checkpoint_path(run_dir, step), app)
    model.load_state_dict(app["model"])
    return model.eval()


def test_generative_config_needs_a_sid_table(data):
    with pytest.raises(ConfigError, match="no table embeds 'sid'"):
        _cfg(data, "bad", "embeddings.tables=[{name: item, dim: 32, features: [item_id]}]")
    with pytest.raises(ConfigError, match="no feature the model reads feeds it"):
        _cfg(data, "bad", "model.generative.item_embedding=false")


def test_cold_start_split_holds_the_users_whose_item_was_never_a_training_target(data):
    """benchmarks/quality.py's cold-start users, against a count by hand from the text."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    work = data / "cold-work"
    work.mkdir()
    (work / "prepared").symlink_to(data / "prepared")
    seqs = {}
    for line in (data / "walks.txt").read_text().splitlines():
        u, *items = map(int, line.split())
        seqs[u] = items
    # training part: all but the last two events; its targets: positions 1..
    trained = {i for s in seqs.values() for i in s[1:-2]}
    want = sorted(u for u, s in seqs.items() if s[-1] not in trained)
    assert 0 < len(want) < USERS
    assert quality.make_cold_split(work) == len(want)
    cold = read_user_sequences(work / "prepared-cold")
    assert sorted(cold.column("user_id").to_pylist()) == want


def test_constrained_softmax_masks_match_the_catalog_and_the_beam_scores(data):
    """model.generative.constrained: level l's softmax runs over the codes that continue
    the prefix to a catalog item (checked against the codes by hand), and the beam's score
    of its best item is that item's constrained teacher-forced log-likelihood."""
    from genrec.models.build import build_model

    torch.manual_seed(0)
    cfg = _cfg(data, "unused", "model.generative.constrained=true")
    model = build_model(cfg, read_model_inputs(cfg)).eval()
    ids = np.arange(1, ITEMS + 1, dtype=np.int64)
    codes = item_codes(ids)
    allowed = model.allowed(torch.as_tensor(codes))
    for j in range(0, ITEMS, 5):
        for lv in range(codes.shape[1]):
            same = (codes[:, :lv] == codes[j, :lv]).all(axis=1)
            want = np.zeros(allowed[lv].shape[1], dtype=bool)
            want[codes[same, lv]] = True
            np.testing.assert_array_equal(allowed[lv][j].numpy(), want)
    table = loo_view(read_user_sequences(data / "prepared"), "test")
    batch = sequences_from_rows(table.slice(0, 16), 20)
    items, scores, _, _, _ = model.generate(batch, beam_width=10, top_k=10)
    with torch.no_grad():
        states = model._states(batch)[0]
        best = model.codes(items[:, 0])
        nll = model.decoder.nll(states, best, model.allowed(best))
    torch.testing.assert_close(-nll, scores[:, 0], atol=1e-4, rtol=1e-4)
