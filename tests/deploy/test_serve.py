"""The HTTP service over Ray Serve: real requests on 127.0.0.1 through Serve's HAProxy
ingress (all of its listeners on loopback), results equal the eager model's offline top-K
whether requests arrive alone or batched, and every bad request gets a 4xx whose message
names the field."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from genrec.deploy.artifact import Artifact
from genrec.trainer.distributed import free_port
from tests.deploy.helpers import query_batch


@pytest.fixture(scope="module")
def service(ray_local, retrieval_artifact, ranking_setup, direct_setup, generative_setup):
    """The artifacts served once: retrieval at /, the ranker at /ranker, the retrieval model
    with a direct item table at /direct, a semantic-ID (generative) model at /sid."""
    from genrec.deploy.serve import serve

    handle = serve(str(retrieval_artifact), port=free_port(), blocking=False)
    apps = (("ranker", ranking_setup[1]), ("direct", direct_setup[1]), ("sid", generative_setup[0]))
    for name, artifact in apps:
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


def test_batched_and_single_replies_equal_artifact_recommend(service, deploy_env):
    """The same 10 requests one at a time (batches of 1) and 10 at once (the replica's
    serve.batch groups them): both equal Artifact.recommend offline."""
    seqs = deploy_env.seqs[:10]
    bodies = [_body(s, k=8) for s in seqs]
    alone = [service.post("/recommend", json=b).json() for b in bodies]
    with ThreadPoolExecutor(10) as pool:
        together = [
            r.json() for r in pool.map(lambda b: service.post("/recommend", json=b), bodies)
        ]
    offline = Artifact(deploy_env.root / "artifact-retrieval").recommend(
        [s["item_id"] for s in seqs], 8, [s["timestamp"] for s in seqs], [s["action"] for s in seqs]
    )
    for a, t, o in zip(alone, together, offline):
        assert a["item_ids"] == t["item_ids"] == o.ids.tolist()
        assert np.abs(np.array(a["scores"]) - o.scores).max() < 1e-5
        assert np.abs(np.array(t["scores"]) - o.scores).max() < 1e-5


def _listeners(pid: int) -> list[str]:
    """host:port of every TCP socket that `pid` listens on (Linux /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in list(f)[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    host, port = cols[1].split(":")
                    out.append(f"{_ip(host)}:{int(port, 16)}")
    return out


def _ip(hex_addr: str) -> str:
    if len(hex_addr) == 8:
        return ".".join(str(int(hex_addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
    return "ipv6:" + hex_addr  # never loopback in the form we look for


def test_served_through_haproxy_on_loopback_only(service):
    """The service port belongs to HAProxy (Serve's HAProxy ingress), and every listener of
    every HAProxy process is on 127.0.0.1 (the service as asked; Ray's own config binds the
    metrics and stats ports on all interfaces, genrec's wrapper moves them to loopback)."""
    port = int(str(service.base_url).rstrip("/").rsplit(":", 1)[1])
    pids = [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and b"haproxy.cfg.loopback" in _cmdline_bytes(int(p))
    ]
    assert pids, "no HAProxy started by genrec's loopback wrapper"
    listeners = [a for pid in pids for a in _listeners(pid)]
    assert f"127.0.0.1:{port}" in listeners
    assert len(listeners) >= 3  # the service, HAProxy's metrics and its stats page
    assert all(a.startswith("127.0.0.1:") for a in listeners), listeners


def _cmdline_bytes(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_haproxy_wrapper_binds_loopback_and_refuses_other_hosts(tmp_path):
    """The wrapper moves HAProxy's metrics and stats listeners (ports from the environment)
    from all interfaces to 127.0.0.1, leaves the service's listener where it was asked for,
    hands HAProxy the rewritten config (other arguments kept in order) and refuses a metrics
    or stats listener on any other address."""
    from genrec.deploy.ingress import loopback_haproxy

    real = tmp_path / "real"
    real.write_text('#!/bin/sh\necho "$@"\n')
    real.chmod(0o700)
    wrapper = loopback_haproxy(str(real), str(tmp_path))
    env = {**os.environ, "RAY_SERVE_HAPROXY_METRICS_PORT": "9101"}
    env["RAY_SERVE_HAPROXY_STATS_PORT"] = "8404"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("frontend a\n    bind :9101\nfrontend b\n    bind *:80\n  bind *:8404\n")
    run = subprocess.run([wrapper, "-db", "-f", str(cfg), "-sf", "7"], capture_output=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.decode().split() == ["-db", "-f", f"{cfg}.loopback", "-sf", "7"]
    binds = [
        ln.split()[1]
        for ln in (tmp_path / "haproxy.cfg.loopback").read_text().splitlines()
        if ln.strip().startswith("bind")
    ]
    assert binds == ["127.0.0.1:9101", "*:80", "127.0.0.1:8404"]
    cfg.write_text("frontend a\n    bind 192.0.2.2:8404\n")
    run = subprocess.run([wrapper, "-f", str(cfg)], capture_output=True, env=env)
    assert run.returncode == 1 and b"not on 127.0.0.1" in run.stderr and not run.stdout


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


def test_semantic_id_artifact_serves_its_offline_beam_search(service, deploy_env, generative_setup):
    """/recommend of a generative artifact: the same items and scores as
    SemanticArtifact.recommend offline, one request at a time and concurrently (Serve batches
    them); every item is a coded catalog item; k over model.generative.top_k is a 422."""
    from genrec.deploy.semantic_artifact import SemanticArtifact

    artifact, codes = generative_setup
    assert service.get("/sid/health").json() == {
        "status": "ok", "task": "generative", "backend": "eager", "items": 0
    }  # fmt: skip
    seqs = deploy_env.seqs[:8]
    offline = SemanticArtifact(artifact).recommend(
        [s["item_id"] for s in seqs],
        10,
        [s["timestamp"] for s in seqs],
        [s["action"] for s in seqs],
    )
    one = service.post("/sid/recommend", json=_body(seqs[0], k=10)).json()
    with ThreadPoolExecutor(8) as pool:
        many = list(
            pool.map(lambda s: service.post("/sid/recommend", json=_body(s, k=10)).json(), seqs)
        )
    coded = set(np.unique(deploy_env.catalog).tolist())
    for got, want in zip([one, *many], [offline[0], *offline]):
        assert got["item_ids"] == want.ids.tolist()
        np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-5, atol=1e-5)
        assert len(got["item_ids"]) == 10 and set(got["item_ids"]) <= coded
    r = service.post("/sid/recommend", json=_body(seqs[0], k=11))
    assert r.status_code == 422 and r.json()["field"] == "k", r.text
    assert "model.generative.top_k" in r.json()["detail"]
