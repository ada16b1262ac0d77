"""Bounded load test of the serving endpoint: N requests at concurrency C over 127.0.0.1.

    python benchmarks/bench_serve.py --requests 2000 --concurrency 16 [--no-aot]
    python benchmarks/bench_serve.py --artifact artifacts/x   # serve an existing export
    python benchmarks/bench_serve.py --direct   # no HTTP: Artifact stages in this process

Without --artifact it builds a fresh small HSTU retriever (untrained weights: latency does
not depend on them), writes a one-process checkpoint and an item catalog into a temp dir,
exports it (AOTInductor unless --no-aot) and serves it with Ray Serve. Histories are random
catalog ids with increasing timestamps. Prints ONE JSON line: p50/p99 latency, throughput,
error count, and CPU ms per request by process over the timed requests (Linux /proc): the
client (this process), the Ray it started by role (Serve's Python proxy, HAProxy, replica,
controller, the rest of Ray) and `other` (everyone else's load on the same cores).
Progress goes to stderr; nothing is written into the repository.

--ingress haproxy (default, Ray Serve's HAProxy ingress) or proxy (Serve's Python proxy
actor); --client aiohttp (default, ~0.2 ms of client CPU per request) or httpx (~1.5 ms).

--direct times the same requests in this process, without Ray Serve or HTTP: p50 of
`Artifact.recommend` for one request and for a batch of --concurrency requests, and of its
stages (hashing + padding, the encoder program, the index search), and of validating one
request body and encoding its JSON reply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def log(msg: str) -> None:
    print(f"[bench_serve] {msg}", file=sys.stderr, flush=True)


def make_artifact(work: Path, items: int, max_len: int, aot: bool) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from genrec.config import Config, TableConfig, to_dict
    from genrec.deploy.export import export
    from genrec.models.build import build_model
    from genrec.trainer.checkpoint import save_checkpoint

    cfg = Config()
    cfg.data.prepared_dir = str(work / "prepared")
    cfg.embeddings.tables = [TableConfig(name="item", num_embeddings=4 * items, dim=64)]
    cfg.model.max_len, cfg.model.dropout = max_len, 0.0
    Path(cfg.data.prepared_dir).mkdir(parents=True)
    catalog = np.arange(1, items + 1, dtype=np.int64) * 7
    pq.write_table(pa.table({"item_id": catalog}), work / "prepared" / "items.parquet")
    torch.manual_seed(0)
    model = build_model(cfg)
    state = {"step": 0, "world_size": 1, "config": to_dict(cfg), "position": None}
    ckpt = save_checkpoint(work / "run", 0, {"model": model.state_dict()}, state, {}).wait()
    export(str(ckpt), str(work / "artifact"), compile_aot=aot)
    return work / "artifact"


async def load_httpx(url: str, bodies: list[dict], concurrency: int):
    """The previous client: httpx.AsyncClient (~1.5-1.8 ms of client CPU per request)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    queue = list(reversed(bodies))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/recommend", json=body)
                ok = r.status_code == 200 and len(r.json()["item_ids"]) == body["k"]
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += 0 if ok else 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, errors, wall


async def load_aiohttp(url: str, bodies: list[dict], concurrency: int):
    """A lean client: aiohttp, one keep-alive connection per worker, bodies encoded up front
    (the client shares the cores with the server, so its CPU per request is the server's loss)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    queue = [(json.dumps(b).encode(), b["k"]) for b in reversed(bodies)]
    headers = {"content-type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while queue:
            body, k = queue.pop()
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/recommend", data=body, headers=headers) as r:
                    reply = await r.read()
                ok = r.status == 200 and len(json.loads(reply)["item_ids"]) == k
            except (aiohttp.ClientError, ValueError, KeyError):
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += 0 if ok else 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, errors, wall


CLIENTS = {"aiohttp": load_aiohttp, "httpx": load_httpx}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# process roles by their command line, first match wins (Ray names its actors "ray::Class")
ROLES = (
    ("haproxy", "haproxy"),
    ("ProxyActor", "proxy"),
    ("ServeReplica", "replica"),
    ("ServeController", "controller"),
)


def cpu_by_role() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every process on the box by role (Linux /proc): this
    process is the client, the Ray it started (its descendants) by actor name, anything else
    is other people's load on the same cores."""
    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    stats: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)

    def ours(pid: int) -> bool:
        while pid > 1 and pid != me:
            pid = stats.get(pid, (0, 0.0))[0]
        return pid == me

    out = {}
    for pid, (_, t) in stats.items():
        if pid == me:
            role = "client"
        elif ours(pid):
            cmd = _cmdline(pid)
            role = next((r for k, r in ROLES if k in cmd), "ray_core")
        else:
            role = "other"
        out[pid] = (role, t)
    return out


def cpu_ms_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    total: dict[str, float] = {}
    for pid, (role, t) in after.items():
        total[role] = total.get(role, 0.0) + t - before.get(pid, (role, 0.0))[1]
    return {f"cpu_ms_{r}": round(1000.0 * t / requests, 3) for r, t in sorted(total.items())}


def p50_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1000.0, 3)


def stage_p50s(art, reqs: list[dict], n: int) -> dict:
    """p50 ms of Artifact.recommend on `reqs` as one batch, and of its stages."""
    import torch

    hist = [r["history"] for r in reqs]
    ts = [r["timestamps"] for r in reqs]
    k = reqs[0]["k"]
    inputs = art._inputs(hist, ts, None)
    states = art.encode(hist, ts)
    exclude = [set(h) for h in hist]
    for _ in range(5):  # warm-up
        art.recommend(hist, k, ts)
    out = {"recommend": p50_ms(lambda: art.recommend(hist, k, ts), n)}
    out["hash_pad"] = p50_ms(lambda: art._inputs(hist, ts, None), n)
    with torch.no_grad():
        out["encoder"] = p50_ms(lambda: art.encoder(*inputs), n)
    out["search"] = p50_ms(lambda: art.index.search(states, k, exclude), n)
    return out


def direct_breakdown(artifact: Path, bodies: list[dict], batch: int, n: int, threads: int) -> dict:
    """p50 ms of Artifact.recommend (one request; a batch) and of its stages, in process."""
    import torch

    from genrec.deploy.artifact import Artifact

    torch.set_num_threads(threads)
    art = Artifact(artifact)
    out = {"threads": threads}
    for name, reqs in (("one", bodies[:1]), (f"batch{batch}", bodies[:batch])):
        out.update({f"{name}_{s}_p50_ms": v for s, v in stage_p50s(art, reqs, n).items()})
    out.update(request_p50s(art, bodies[0], n))
    out["backend"] = art.backend
    return out


def request_p50s(art, body: dict, n: int) -> dict:
    """p50 ms of what the replica does per request around the model: validating the JSON
    body (pydantic + the artifact's limits) and encoding the JSON reply."""
    from fastapi.encoders import jsonable_encoder
    from fastapi.responses import JSONResponse

    from genrec.deploy.requests import RecommendRequest, check_recommend, parse

    raw = json.dumps(body).encode()
    rec = art.recommend([body["history"]], body["k"], [body["timestamps"]])[0]

    def validate():
        req = parse(RecommendRequest, raw)
        check_recommend(req, art.limits, art.cfg.model.num_actions, art.item_hashing)

    def reply() -> bytes:  # as FastAPI answers a handler that returns a dict
        content = {"item_ids": rec.ids.tolist(), "scores": rec.scores.tolist()}
        return JSONResponse(jsonable_encoder(content)).body

    return {"one_validate_p50_ms": p50_ms(validate, n), "one_reply_json_p50_ms": p50_ms(reply, n)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--artifact", default="", help="serve this artifact instead of a fresh one")
    p.add_argument("--no-aot", action="store_true", help="export without AOTInductor (faster)")
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--history", type=int, default=30, help="events per request")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--direct", action="store_true", help="in-process stage timings, no HTTP")
    p.add_argument("--client", choices=sorted(CLIENTS), default="aiohttp")
    p.add_argument(
        "--ingress",
        choices=("haproxy", "proxy"),
        default="haproxy",
        help="Ray Serve's HAProxy ingress (genrec's default) or its Python proxy actor",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: serve's default)")
    args = p.parse_args()

    from genrec.deploy.artifact import read_manifest
    from genrec.deploy.serve import serve
    from genrec.trainer.distributed import free_port

    # Ray's log monitor prints to fd 1; keep stdout for the one JSON line
    stdout_fd = os.dup(1)
    os.dup2(2, 1)
    with tempfile.TemporaryDirectory(prefix="genrec-bench-serve-") as tmp:
        t0 = time.perf_counter()
        if args.artifact:
            artifact = Path(args.artifact)
        else:
            log(f"exporting a fresh model ({args.items} items, aot={not args.no_aot})")
            artifact = make_artifact(Path(tmp), args.items, args.max_len, not args.no_aot)
        export_s = time.perf_counter() - t0
        manifest = read_manifest(artifact)
        catalog = np.arange(1, args.items + 1, dtype=np.int64) * 7
        rng = np.random.default_rng(args.seed)
        n_hist = min(args.history, manifest["feature_spec"]["max_history"])
        bodies = [
            {
                "history": rng.choice(catalog, n_hist).tolist(),
                "timestamps": np.cumsum(rng.integers(1, 3600, n_hist)).tolist(),
                "k": args.k,
            }
            for _ in range(args.requests + args.warmup)
        ]
        if args.direct:
            log("timing Artifact stages in process")
            threads = args.threads or min(2, os.cpu_count() or 1)
            result = direct_breakdown(artifact, bodies, args.concurrency, args.requests, threads)
            os.dup2(stdout_fd, 1)
            print(json.dumps({"bench": "serve_direct", "history": n_hist, **result}))
            return 0
        log(f"starting Ray Serve ({args.ingress} ingress)")
        # read by the Ray that serve() starts (genrec.deploy.ingress)
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if args.ingress == "haproxy" else "0"
        handle = serve(str(artifact), port=free_port(), blocking=False, threads=args.threads)
        try:
            log(
                f"warmup {args.warmup}, then {args.requests} requests at concurrency "
                f"{args.concurrency} against {handle.url}"
            )
            load = CLIENTS[args.client]
            asyncio.run(load(handle.url, bodies[: args.warmup], args.concurrency))
            cpu0, load0 = cpu_by_role(), os.getloadavg()[0]
            lat, errors, wall = asyncio.run(
                load(handle.url, bodies[args.warmup :], args.concurrency)
            )
            cpu = cpu_ms_per_request(cpu0, cpu_by_role(), args.requests)
        finally:
            handle.shutdown()
    sys.stdout.flush()
    os.dup2(stdout_fd, 1)
    ms = np.array(lat) * 1000.0
    print(
        json.dumps(
            {
                "bench": "serve",
                "requests": args.requests,
                "concurrency": args.concurrency,
                "client": args.client,
                "ingress": args.ingress,
                "history": n_hist,
                "k": args.k,
                "items": manifest["index"]["items"],
                "index": manifest["index"]["kind"],
                "compiled_aot": manifest["compiled"],
                "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p99_ms": round(float(np.percentile(ms, 99)), 2),
                "mean_ms": round(float(ms.mean()), 2),
                "throughput_rps": round(args.requests / wall, 1),
                "errors": errors,
                **cpu,
                "load1": [round(load0, 2), round(os.getloadavg()[0], 2)],
                "export_s": round(export_s, 1),
                "cpus": os.cpu_count(),
            }
        )
    )
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
