"""HTTP serving of an exported artifact: Ray Serve behind a FastAPI ingress.

    handle = serve("artifacts/x", port=8000, blocking=False)
    httpx.post(handle.url + "/recommend", json={"history": [3, 17, 9], "k": 10})
    handle.shutdown()

Endpoints
    POST /recommend  {history, timestamps?, actions?, k, exclude_history?, rerank?}
                     -> {item_ids: [...], scores: [...]} (model scores, best first)
    POST /rank       {history, timestamps?, actions?, candidates}
                     -> {candidates: [...], scores: {task: [...]}} (ranking artifacts)
    GET  /health     -> {status, task, backend, items}

Bad requests get 4xx with {"detail": "<field>: <what is wrong>", "field": ...}, never a 500:
422 for invalid fields, 400 for malformed JSON or an endpoint the artifact lacks, 413 for a
body over deploy.max_body_bytes. Concurrent requests are batched (Ray Serve `serve.batch`)
into one program call; raw ids are hashed in numpy exactly as in training (unseen ids too;
a direct item table refuses an id it has no row for, 422 naming it).
The service binds 127.0.0.1 unless a host is given. A Ray started by genrec serves through
Ray Serve's HAProxy ingress with all its listeners on loopback (genrec.deploy.ingress: ~1 ms
of server CPU per request instead of ~6 ms through the Python proxy actor).
"""

# no `from __future__ import annotations` here: FastAPI must see the real `Request` class
# on the handlers of the Serve deployment, not a string it cannot resolve there.

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve as ray_serve

from genrec.deploy.requests import (
    RankRequest,
    RecommendRequest,
    RequestError,
    check_rank,
    check_recommend,
    parse,
)

app = FastAPI(title="genrec", description="HSTU recommendations from an exported artifact")


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content={"detail": str(e), "field": e.field})


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) anything over `limit` bytes without reading all of it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(
            "body", f"is {declared} bytes, over deploy.max_body_bytes={limit}", status=413
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError("body", f"is over deploy.max_body_bytes={limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


@ray_serve.deployment(max_ongoing_requests=128)
@ray_serve.ingress(app)
class GenrecService:
    """One replica: the loaded artifact (checksums verified) and the batched encoder."""

    def __init__(self, artifact: str, threads: int) -> None:
        import torch

        from genrec.deploy.semantic_artifact import load_artifact

        torch.set_num_threads(max(1, threads))
        self.art = load_artifact(artifact)  # generative: SemanticArtifact (beam search)
        self.limits = self.art.limits
        self.num_actions = self.art.cfg.model.num_actions

    @app.get("/health")
    def health(self) -> dict:
        index = self.art.index
        return {
            "status": "ok",
            "task": self.art.task,
            "backend": self.art.backend,
            "items": index.size if index is not None else 0,
        }

    @ray_serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _recommend_batch(self, reqs: list[RecommendRequest]) -> list[dict]:
        recs = self.art.recommend(
            [r.history for r in reqs],
            [r.k for r in reqs],
            [r.timestamps for r in reqs],
            [r.actions for r in reqs],
            exclude_history=[r.exclude_history for r in reqs],
            rerank=[r.rerank for r in reqs],
        )
        return [{"item_ids": r.ids.tolist(), "scores": r.scores.tolist()} for r in recs]

    @ray_serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _rank_batch(self, reqs: list[RankRequest]) -> list[dict]:
        scores = self.art.rank(
            [r.history for r in reqs],
            [r.candidates for r in reqs],
            [r.timestamps for r in reqs],
            [r.actions for r in reqs],
        )
        return [{"candidates": r.candidates, "scores": s} for r, s in zip(reqs, scores)]

    @app.post("/recommend")
    async def recommend(self, request: Request):
        try:
            if self.art.task not in ("retrieval", "generative"):
                raise RequestError(
                    "endpoint",
                    f"/recommend needs a retrieval artifact; this one is "
                    f"{self.art.task}-only (use /rank)",
                    status=400,
                )
            req = parse(RecommendRequest, await _read_body(request, self.limits.max_body_bytes))
            check_recommend(
                req,
                self.limits,
                self.num_actions,
                self.art.item_hashing,
                can_rerank=self.art.reranker is not None,
            )
        except RequestError as e:
            return _error(e)
        return await self._recommend_batch(req)

    @app.post("/rank")
    async def rank(self, request: Request):
        try:
            if self.art.task != "ranking":
                raise RequestError(
                    "endpoint",
                    f"/rank needs a ranking artifact; this one is "
                    f"{self.art.task}-only (use /recommend)",
                    status=400,
                )
            req = parse(RankRequest, await _read_body(request, self.limits.max_body_bytes))
            check_rank(req, self.limits, self.num_actions, self.art.item_hashing)
        except RequestError as e:
            return _error(e)
        return await self._rank_batch(req)


@dataclass
class ServeHandle:
    """A running service: its base URL; `shutdown()` stops Serve (and Ray if we started it)."""

    url: str
    name: str
    started_ray: bool

    def shutdown(self) -> None:
        import ray

        ray_serve.shutdown()
        if self.started_ray:
            ray.shutdown()


def serve(
    artifact: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = True,
    *,
    name: str = "genrec",
    route_prefix: str = "/",
    replica_cpus: float = 0.5,
    threads: int = 0,
    ray_address: str = "",
) -> ServeHandle:
    """Serve `artifact` over HTTP on host:port; with blocking=False return a handle."""
    import ray
    from ray.serve.schema import LoggingConfig

    from genrec.deploy.artifact import read_manifest
    from genrec.ray_runtime import init_ray

    path = str(Path(artifact).resolve())
    read_manifest(path)  # fail here (checksums, versions), not inside a replica
    # Ray starts its workers at niceness 15, so a replica (and the HAProxy it starts) yields
    # to every other process on the machine: p99 94 ms against 33 ms at niceness 0 on a
    # loaded 2-core box (RESULTS.md, issue 22). Read only by a Ray started here.
    if not ray_address and not ray.is_initialized():
        os.environ.setdefault("RAY_worker_niceness", "0")
    started = init_ray(
        num_cpus=max(2, os.cpu_count() or 1), object_store_mb=128, address=ray_address
    )
    quiet = LoggingConfig(log_level="WARNING", enable_access_log=False)
    ray_serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    threads = threads or 1  # intra-op threads per replica; scale with replicas
    deployment = GenrecService.options(ray_actor_options={"num_cpus": replica_cpus})
    ray_serve.run(
        deployment.bind(path, threads), name=name, route_prefix=route_prefix, logging_config=quiet
    )
    prefix = route_prefix.rstrip("/")
    handle = ServeHandle(url=f"http://{host}:{port}{prefix}", name=name, started_ray=started)
    if not blocking:
        return handle
    print(
        f"serving {artifact} at {handle.url} (POST /recommend, POST /rank, GET /health); "
        "Ctrl-C stops",
        flush=True,
    )

    def _stop(signum, frame):  # SIGTERM (a supervisor stopping us) shuts down like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        handle.shutdown()
    return handle
