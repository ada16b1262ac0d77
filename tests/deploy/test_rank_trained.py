"""A ranker the TRAINER wrote (2 gloo ranks, row-wise item table, synthetic T-ECD, a few
stream steps) exports, and the artifact's scores equal the eager model's on the same inputs;
bad candidates are refused naming the field. (HTTP /rank == offline: test_serve.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from genrec.data_pipeline.batch import make_batch
from genrec.deploy.artifact import Artifact
from tests.trainer.helpers import make_prepared, tiny_config

TOL = 1e-5


@pytest.fixture(scope="module")
def trained_ranker(tmp_path_factory, ray_local) -> tuple[Path, Path]:
    """(prepared base dir, the trainer's last checkpoint, its artifact without AOT)."""
    from genrec.deploy.export import export

    base = make_prepared(
        tmp_path_factory.mktemp("ranker"), users=200, events=16_000, items=400, seed=5
    )
    path = _train(base, "run", "model.task=ranking")
    export(str(path), str(base / "artifact"), compile_aot=False)
    return base, path


def _train(base: Path, run: str, *extra: str) -> Path:
    """6 steps of the trainer on 2 ranks (row-wise item table); its last checkpoint."""
    from genrec.trainer.checkpoint import latest_checkpoint
    from genrec.trainer.launch import train

    cfg = tiny_config(
        base / "prepared",
        base / run,
        "trainer.batch_size=16",
        "trainer.max_steps=6",
        "trainer.eval_batches=1",
        "embeddings.tables=[{name: item, num_embeddings: 4096, dim: 32, features: [item_id]}]",
        *extra,
    )
    train(cfg, resume=False)
    return latest_checkpoint(base / run)


def _requests(base: Path, n: int = 6, n_cand: int = 3, max_history: int = 16) -> list[dict]:
    """Real prepared rows: the last `n_cand` events are the candidates, up to `max_history`
    events before them the history (history + candidates within model.max_len = 20, so
    serving's history cut and the eager model see the same events)."""
    last = sorted((base / "prepared").glob("window=*"))[-1]
    rows = pads.dataset(str(last), format="parquet").to_table().to_pylist()
    rows = [r for r in rows if len(r["item_ids"]) > n_cand + 1][:n]
    assert len(rows) == n
    return [
        {
            "history": r["item_ids"][-n_cand - max_history : -n_cand],
            "timestamps": r["timestamps"][-n_cand - max_history : -n_cand],
            "actions": r["actions"][-n_cand - max_history : -n_cand],
            "candidates": r["item_ids"][-n_cand:],
        }
        for r in rows
    ]


def test_trained_ranker_artifact_equals_eager(trained_ranker):
    from genrec.deploy.export import load_checkpoint_model

    base, path = trained_ranker
    model, cfg, state = load_checkpoint_model(path)
    assert state["world_size"] == 2 and state["step"] == 6
    art = Artifact(base / "artifact")
    assert art.task == "ranking" and art.tasks == list(cfg.model.ranking.tasks)
    reqs = _requests(base)
    got = art.rank(
        [r["history"] for r in reqs],
        [r["candidates"] for r in reqs],
        [r["timestamps"] for r in reqs],
        [r["actions"] for r in reqs],
    )
    probs = _eager_rank(model, reqs)
    spread = 0.0
    for b in range(len(reqs)):
        mine = probs[b]
        for j, task in enumerate(art.tasks):
            assert np.abs(np.array(got[b][task]) - mine[:, j].numpy()).max() < TOL, (b, task)
        spread = max(spread, float(mine.max() - mine.min()))
    assert spread > 1e-3  # trained weights score candidates apart: the check has teeth


def _eager_rank(model, reqs: list[dict]) -> list[torch.Tensor]:
    """Per request [C, T] probabilities of the eager ranker: candidates appended as
    targets, timestamped like serving (the last history time)."""
    items, acts, ts, lens = [], [], [], []
    for r in reqs:
        c = list(r["candidates"])
        items += list(r["history"]) + c
        acts += list(r["actions"]) + [0] * len(c)
        ts += list(r["timestamps"]) + [r["timestamps"][-1]] * len(c)
        lens.append(len(r["history"]) + len(c))
    n = len(reqs)
    batch = make_batch(
        np.array(items),
        np.array(acts),
        np.array(ts),
        lens,
        [len(r["candidates"]) for r in reqs],
        np.arange(n),
        np.zeros(n, np.int64),
    )
    with torch.no_grad():
        logits, _, rows = model.predict(batch)
    probs = torch.sigmoid(logits)
    return [probs[rows == b] for b in range(n)]


WEIGHTS = {"click": 1.0, "order": 2.0}


@pytest.fixture(scope="module")
def pair(trained_ranker) -> tuple[Path, Path]:
    """(retrieval checkpoint trained like the ranker, the pair's artifact: retriever + the
    ranker, rerank weights click + 2 * order)."""
    from genrec.deploy.export import export

    base, ranker_path = trained_ranker
    retr_path = _train(base, "run-retrieval", "model.retrieval.num_negatives=64")
    export(
        str(retr_path), str(base / "pair"), compile_aot=False, ranker=str(ranker_path),
        rerank_weights=WEIGHTS,
    )  # fmt: skip
    return retr_path, base / "pair"


def test_recommend_rerank_equals_the_offline_cascade(trained_ranker, pair):
    """A retriever and the ranker, both trained by the trainer on the same data, exported
    as one pair: `recommend(k=5, rerank=12)` returns the eager retriever's top 12 (history
    excluded) ordered by the eager ranker's click + 2 * order probability, first 5."""
    from genrec.deploy.export import load_checkpoint_model

    base, ranker_path = trained_ranker
    retr_path, pair_dir = pair
    art = Artifact(pair_dir)
    assert art.reranker is not None and art.rerank_weights == WEIGHTS
    reqs = _requests(base, n=5, n_cand=1)
    hists = [r["history"] for r in reqs]
    ts, acts = [r["timestamps"] for r in reqs], [r["actions"] for r in reqs]
    got = art.recommend(hists, 5, ts, acts, rerank=12)
    plain = art.recommend(hists, 12, ts, acts)

    retriever = load_checkpoint_model(retr_path)[0]
    ranker = load_checkpoint_model(ranker_path)[0]
    catalog = torch.as_tensor(np.sort(art.index.ids))
    query = make_batch(
        np.concatenate([np.append(h, 0) for h in hists]),
        np.concatenate([np.append(a, 0) for a in acts]),
        np.concatenate([np.append(t, t[-1]) for t in ts]),
        [len(h) + 1 for h in hists],
        [1] * len(hists),
        np.arange(len(hists)),
        np.zeros(len(hists), np.int64),
    )
    with torch.no_grad():
        top, _, _ = retriever.top_k(query, catalog, 12, exclude_history=True)
    cands = [{**r, "candidates": top[b].tolist()} for b, r in enumerate(reqs)]
    probs = _eager_rank(ranker, cands)
    reordered = 0
    for b, r in enumerate(cands):
        assert plain[b].ids.tolist() == r["candidates"], b  # the retrieval stage agrees
        p = probs[b]
        score = (
            p[:, art.reranker.tasks.index("click")] + 2 * p[:, art.reranker.tasks.index("order")]
        )
        order = torch.argsort(-score.double(), stable=True)[:5]
        assert got[b].ids.tolist() == [r["candidates"][i] for i in order.tolist()], b
        np.testing.assert_allclose(got[b].scores, score[order].numpy(), atol=1e-5)
        reordered += int(got[b].ids.tolist() != r["candidates"][:5])
    assert reordered > 0  # the ranker changed some order: the check has teeth


@pytest.mark.parametrize(
    "body, field",
    [
        ({"history": [1, 2], "candidates": []}, "candidates"),
        ({"history": [1, 2], "candidates": ["x"]}, "candidates[0]"),
        ({"history": [1, 2], "candidates": [1] * 51}, "candidates"),
        ({"history": [1, 2]}, "candidates"),
    ],
)
def test_bad_candidates_name_the_field(body, field):
    import json

    from genrec.config import DeployConfig
    from genrec.deploy.requests import RankRequest, RequestError, check_rank, parse

    hashing = {"kind": "hashed", "num_buckets": 4096, "num_hashes": 2, "seeds": [1, 2]}
    with pytest.raises(RequestError) as e:
        check_rank(
            parse(RankRequest, json.dumps(body).encode()),
            DeployConfig(max_k=50),
            8,
            hashing,
        )
    assert e.value.field == field and e.value.status == 422


def test_evaluate_scores_a_ranking_checkpoint_per_task(trained_ranker):
    """`genrec evaluate` on the trainer's ranking checkpoint (2 ranks, frozen weights): per
    window and task the model's and the item rate's AUC, NE and calibration."""
    from genrec.config import from_dict
    from genrec.trainer.checkpoint import read_state
    from genrec.trainer.evaluate import describe_result
    from genrec.trainer.launch import evaluate

    base, path = trained_ranker
    cfg = from_dict(read_state(path)["config"])
    first = sorted((base / "prepared").glob("window=*"))[0].name.split("=")[1]
    cfg.data.windows = [int(first)]
    got = evaluate(cfg, checkpoint=str(path), out=str(base / "evaluate.json"))
    (row,) = got["windows"]
    assert row["window"] == int(first) and row["positions"] > 0
    for task in cfg.model.ranking.tasks:
        for who in ("model", "item_rate"):
            assert 0.0 <= row[f"{who}/{task}.auc"] <= 1.0, (who, task)
            assert row[f"{who}/{task}.ne"] > 0.0 and row[f"{who}/{task}.calibration"] > 0.0
    assert describe_result(got)[0].startswith(f"window {first}")


def test_served_rank_and_rerank_equal_offline(ray_local, trained_ranker, pair):
    """Over HTTP (Ray Serve, 127.0.0.1): /recommend with rerank and /rank on the trainer's
    checkpoints return what the offline artifact computes (itself equal to the eager
    models, tests above); a bad rerank is a 422 naming the field."""
    import httpx

    from genrec.deploy.serve import serve
    from genrec.trainer.distributed import free_port

    base, _ = trained_ranker
    handle = serve(str(pair[1]), port=free_port(), blocking=False)
    port = int(handle.url.rsplit(":", 1)[1])
    serve(str(base / "artifact"), port=port, blocking=False, name="ranker", route_prefix="/ranker")
    reqs = _requests(base, n=3, n_cand=2)
    art, ranker = Artifact(pair[1]), Artifact(base / "artifact")
    try:
        with httpx.Client(base_url=handle.url, timeout=60.0) as client:
            for r in reqs:
                hist = {k: r[k] for k in ("history", "timestamps", "actions")}
                got = client.post("/recommend", json={**hist, "k": 4, "rerank": 10})
                assert got.status_code == 200, got.text
                want = art.recommend([r["history"]], 4, [r["timestamps"]], [r["actions"]],
                                     rerank=10)[0]  # fmt: skip
                assert got.json()["item_ids"] == want.ids.tolist()
                np.testing.assert_allclose(got.json()["scores"], want.scores, atol=1e-5)
                got = client.post("/ranker/rank", json={**hist, "candidates": r["candidates"]})
                assert got.status_code == 200, got.text
                offline = ranker.rank([r["history"]], [r["candidates"]], [r["timestamps"]],
                                      [r["actions"]])[0]  # fmt: skip
                for task, scores in offline.items():
                    np.testing.assert_allclose(got.json()["scores"][task], scores, atol=1e-5)
            bad = client.post("/recommend", json={"history": [1, 2], "k": 5, "rerank": 3})
            assert bad.status_code == 422 and bad.json()["field"] == "rerank", bad.text
            bad = client.post("/ranker/rank", json={"history": [1, 2], "candidates": ["x"]})
            assert bad.status_code == 422 and bad.json()["field"] == "candidates[0]", bad.text
    finally:
        handle.shutdown()
