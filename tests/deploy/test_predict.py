"""`genrec predict` (a Ray Data job over users) against the artifact /recommend serves from.

The artifact is the ws=2 checkpoint of the deploy fixtures exported without AOT; predict's
rows must equal `Artifact.recommend` (what /recommend calls) for the same histories, given
in users.parquet or taken from each user's newest prepared window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrec.data_pipeline import schemas

K = 10


@pytest.fixture(scope="module")
def artifact(deploy_env, tmp_path_factory) -> Path:
    from genrec.deploy.export import export

    out = tmp_path_factory.mktemp("predict") / "artifact"
    export(str(deploy_env.checkpoints[2]), str(out), compile_aot=False)
    return out


def _by_user(path: Path) -> dict[int, tuple[list[int], list[float]]]:
    t = pq.read_table(path)
    assert t.schema.names == ["user_id", "item_ids", "scores"]
    return {
        u: (ids, scores)
        for u, ids, scores in zip(*(t[c].to_pylist() for c in t.schema.names), strict=True)
    }


def _expected(artifact: Path, histories, timestamps, actions) -> list:
    from genrec.deploy.artifact import Artifact

    art = Artifact(artifact)
    return [
        art.recommend([h], K, [t], [a])[0] for h, t, a in zip(histories, timestamps, actions)
    ]  # one request each, as /recommend gets them


def _assert_same(got, users, expected):
    assert sorted(got) == sorted(users)
    for u, want in zip(users, expected, strict=True):
        ids, scores = got[u]
        assert ids == want.ids.tolist(), f"user {u}"
        np.testing.assert_allclose(scores, want.scores, rtol=1e-5, atol=1e-6)
        assert len(ids) == K


def test_predict_equals_recommend_for_histories_in_users_file(
    deploy_env, artifact, tmp_path, ray_local
):
    from genrec.deploy.predict import predict

    seqs = deploy_env.seqs
    users = [1000 + i for i in range(len(seqs))]
    hist = [s["item_id"].tolist() for s in seqs]
    ts = [s["timestamp"].tolist() for s in seqs]
    act = [s["action"].tolist() for s in seqs]
    pq.write_table(
        pa.table({"user_id": users, "history": hist, "timestamps": ts, "actions": act}),
        tmp_path / "users.parquet",
    )
    report = predict(
        deploy_env.cfg, str(artifact), str(tmp_path / "users.parquet"),
        str(tmp_path / "recs.parquet"), k=K, batch_size=8, workers=2,
    )  # fmt: skip
    assert (report.users, report.scored, report.no_history) == (len(seqs), len(seqs), 0)
    _assert_same(_by_user(tmp_path / "recs.parquet"), users, _expected(artifact, hist, ts, act))


def test_predict_takes_the_newest_prepared_window_and_counts_the_rest(
    deploy_env, artifact, tmp_path, ray_local
):
    """Histories from data.prepared_dir; --checkpoint a checkpoint (exported inside)."""
    from genrec.config import from_dict, to_dict
    from genrec.deploy.predict import predict

    seqs = deploy_env.seqs[:12]
    prepared = tmp_path / "prepared"
    older, newer = [], []
    for u, s in enumerate(seqs):  # users 0..11; the newer window holds the even ones
        n = len(s["item_id"])
        cut = n // 2 if u % 2 == 0 else n
        older.append((u, 7, s, 0, cut))
        if u % 2 == 0:
            newer.append((u, 9, s, 0, n))
    for window, rows in ((7, older), (9, newer)):
        d = prepared / schemas.window_dir(window)
        d.mkdir(parents=True)
        pq.write_table(
            pa.table(
                {
                    "user_id": [u for u, *_ in rows],
                    "window": [w for _, w, *_ in rows],
                    "item_ids": [s["item_id"][a:b].tolist() for *_, s, a, b in rows],
                    "timestamps": [s["timestamp"][a:b].tolist() for *_, s, a, b in rows],
                    "actions": pa.array(
                        [s["action"][a:b].tolist() for *_, s, a, b in rows], pa.list_(pa.int32())
                    ),
                    "num_history": pa.array([0] * len(rows), pa.int32()),
                },
                schema=schemas.SEQUENCES,
            ),
            d / "part-00000.parquet",
        )
    users = list(range(len(seqs))) + [999]  # 999 has no history anywhere
    pq.write_table(pa.table({"user_id": users}), tmp_path / "users.parquet")
    cfg = from_dict({**to_dict(deploy_env.cfg), "data": {"prepared_dir": str(prepared)}})
    report = predict(
        cfg, str(deploy_env.checkpoints[2]), str(tmp_path / "users.parquet"),
        str(tmp_path / "recs.parquet"), k=K, batch_size=5,
    )  # fmt: skip
    assert (report.users, report.scored, report.no_history) == (13, 12, 1)
    assert "1 users without any history were not scored" in report.summary()
    # every user's newest window: the whole sequence (even users: window 9; odd: window 7)
    hist = [s["item_id"].tolist() for s in seqs]
    ts = [s["timestamp"].tolist() for s in seqs]
    act = [s["action"].tolist() for s in seqs]
    _assert_same(
        _by_user(tmp_path / "recs.parquet"), users[:-1], _expected(artifact, hist, ts, act)
    )
