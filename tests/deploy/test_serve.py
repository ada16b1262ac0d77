"""The HTTP service over Ray Serve: real requests on 127.0.0.1, results equal the eager
model's offline top-K, and every bad request gets a 4xx whose message names the field."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from genrec.deploy.artifact import Artifact
from genrec.trainer.distributed import free_port
from tests.deploy.helpers import query_batch


@pytest.fixture(scope="module")
def service(ray_local, retrieval_artifact, ranking_setup, direct_setup):
    """The artifacts served once: retrieval at /, the ranker at /ranker, the retrieval model
    with a direct item table at /direct."""
    from genrec.deploy.serve import serve

    handle = serve(str(retrieval_artifact), port=free_port(), blocking=False)
    for name, artifact in (("ranker", ranking_setup[1]), ("direct", direct_setup[1])):
        serve(
            str(artifact),
            port=int(handle.url.rsplit(":", 1)[1]),
            blocking=False,
            name=name,
            route_prefix=f"/{name}",
        )
    try:
        with httpx.Client(base_url=handle.url, timeout=60.0) as client:
            yield client
    finally:
        handle.shutdown()


def _body(seq: dict, **extra) -> dict:
    return {
        "history": seq["item_id"].tolist(),
        "timestamps": seq["timestamp"].tolist(),
        "actions": seq["action"].tolist(),
        **extra,
    }


def test_health(service):
    r = service.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "task": "retrieval", "backend": "aoti", "items": 1682}


def test_recommend_equals_offline_eager_top_k(service, deploy_env, eager_model):
    seqs = deploy_env.seqs[:12]
    with ThreadPoolExecutor(6) as pool:  # concurrent: exercises the server-side batching
        replies = list(pool.map(lambda s: service.post("/recommend", json=_body(s, k=10)), seqs))
    catalog = torch.from_numpy(deploy_env.catalog)
    ids, scores, _ = eager_model.top_k(query_batch(seqs, True), catalog, 10)
    for r, i, s in zip(replies, ids.numpy(), scores.numpy()):
        assert r.status_code == 200, r.text
        assert r.json()["item_ids"] == i.tolist()
        assert np.abs(np.array(r.json()["scores"]) - s).max() < 1e-5


def test_recommend_without_exclusion_and_defaults(service, deploy_env, eager_model):
    seq = deploy_env.seqs[20]
    r = service.post("/recommend", json=_body(seq, k=25, exclude_history=False))
    catalog = torch.from_numpy(deploy_env.catalog)
    ids, _, _ = eager_model.top_k(query_batch([seq], True), catalog, 25, exclude_history=False)
    assert r.status_code == 200 and r.json()["item_ids"] == ids[0].tolist()
    # timestamps/actions omitted: served like the offline artifact with its defaults (0s)
    bare = {"history": seq["item_id"].tolist(), "k": 5}
    r = service.post("/recommend", json=bare)
    offline = Artifact(deploy_env.root / "artifact-retrieval").recommend([bare["history"]], 5)
    assert r.json()["item_ids"] == offline[0].ids.tolist()


def test_unseen_item_ids_are_hashed_like_training(service, deploy_env, eager_model):
    seq = {k: v.copy() for k, v in deploy_env.seqs[21].items()}
    seq["item_id"][::2] = 10**12 + np.arange(seq["item_id"][::2].size)  # never in the catalog
    r = service.post("/recommend", json=_body(seq, k=10))
    ids, _, _ = eager_model.top_k(
        query_batch([seq], True), torch.from_numpy(deploy_env.catalog), 10
    )
    assert r.status_code == 200 and r.json()["item_ids"] == ids[0].tolist()


def test_rank_scores_equal_offline_ranker(service, deploy_env, ranking_setup):
    seq = deploy_env.seqs[2]
    cands = deploy_env.catalog[:7].tolist() + [10**10]
    r = service.post("/ranker/rank", json=_body(seq, candidates=cands))
    assert r.status_code == 200, r.text
    offline = Artifact(ranking_setup[1]).rank(
        [seq["item_id"]], [cands], [seq["timestamp"]], [seq["action"]]
    )[0]
    assert r.json()["candidates"] == cands
    for task in ("click", "like"):
        assert np.abs(np.array(r.json()["scores"][task]) - offline[task]).max() < 1e-5


def test_rank_on_a_retrieval_artifact_is_refused(service):
    r = service.post("/rank", json={"history": [1, 2], "candidates": [3]})
    assert r.status_code == 400 and "retrieval-only" in r.json()["detail"]
    r = service.post("/ranker/recommend", json={"history": [1, 2], "k": 3})
    assert r.status_code == 400 and "ranking-only" in r.json()["detail"]


BAD = {
    "unknown_field": ({"history": [1], "k": 5, "user": 3}, 422, "user"),
    "missing_k": ({"history": [1]}, 422, "k"),
    "empty_history": ({"history": [], "k": 5}, 422, "history"),
    "oversize_history": ({"history": list(range(65)), "k": 5}, 422, "history"),
    "non_integer_id": ({"history": [1, "x"], "k": 5}, 422, "history[1]"),
    "float_id": ({"history": [1, 2.5], "k": 5}, 422, "history[1]"),
    "negative_id": ({"history": [-4, 2], "k": 5}, 422, "history[0]"),
    "id_beyond_int64": ({"history": [2**63], "k": 5}, 422, "history[0]"),
    "timestamps_mismatch": ({"history": [1, 2], "timestamps": [5], "k": 5}, 422, "timestamps"),
    "actions_mismatch": ({"history": [1, 2], "actions": [0, 1, 1], "k": 5}, 422, "actions"),
    "action_out_of_range": ({"history": [1], "actions": [8], "k": 5}, 422, "actions[0]"),
    "k_zero": ({"history": [1], "k": 0}, 422, "k"),
    "k_too_large": ({"history": [1], "k": 51}, 422, "k"),
    "k_not_int": ({"history": [1], "k": "10"}, 422, "k"),
    "exclude_not_bool": ({"history": [1], "k": 3, "exclude_history": "no"}, 422, "exclude_history"),
    "body_too_large": ({"history": list(range(10**4, 10**4 + 900)), "k": 5}, 413, "body"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recommend_request(service, case):
    body, status, field = BAD[case]
    r = service.post("/recommend", json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["detail"].startswith(f"{field}:")


def test_malformed_json_is_400(service):
    r = service.post(
        "/recommend", content=b'{"history": [1,', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["detail"].startswith("body:")


@pytest.mark.parametrize(
    "body,field",
    [
        ({"history": [1], "candidates": []}, "candidates"),
        ({"history": [1], "candidates": list(range(51))}, "candidates"),
        ({"history": [1], "candidates": [1, -2]}, "candidates[1]"),
        ({"history": [], "candidates": [1]}, "history"),
    ],
)
def test_bad_rank_request(service, body, field):
    r = service.post("/ranker/rank", json=body)
    assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}:"), r.text


def test_direct_table_artifact_serves_and_refuses_ids_without_a_row(
    service, deploy_env, direct_setup
):
    seq = deploy_env.seqs[4]
    r = service.post("/direct/recommend", json=_body(seq, k=10))
    offline = Artifact(direct_setup[1]).recommend(
        [seq["item_id"]], 10, [seq["timestamp"]], [seq["action"]]
    )
    assert r.status_code == 200 and r.json()["item_ids"] == offline[0].ids.tolist()
    r = service.post("/direct/recommend", json={"history": [3, 1682, 1683, 9], "k": 5})
    assert r.status_code == 422 and r.json()["field"] == "history[2]", r.text
    assert "1683 has no row in the model's direct item table (ids 0..1682)" in r.json()["detail"]


def test_direct_table_request_checks_name_the_field():
    """check_* against a direct item table's spec: the first id without a row is named by
    its field and index (history before candidates); a hashed spec takes any id."""
    from genrec.config import DeployConfig
    from genrec.deploy.requests import RankRequest, RequestError, check_rank, parse

    direct = {"kind": "direct", "num_buckets": 100, "seeds": []}
    hashed = {"kind": "hashed", "num_buckets": 100, "seeds": [7]}
    req = parse(RankRequest, b'{"history": [1, 99], "candidates": [5, 100, 250]}')
    with pytest.raises(RequestError, match=r"^candidates\[1\]: item id 100 has no row"):
        check_rank(req, DeployConfig(), 8, direct)
    check_rank(req, DeployConfig(), 8, hashed)
    req = parse(RankRequest, b'{"history": [1, 400], "candidates": [5, 100]}')
    with pytest.raises(RequestError, match=r"^history\[1\]: item id 400"):
        check_rank(req, DeployConfig(), 8, direct)
