"""Start Ray sized for this machine, bound to 127.0.0.1, quietly; always shut it down.

    with ray_session(num_cpus=2, object_store_mb=256):
        ...

A cluster address (`ray://...` or `host:port`) connects instead of starting a local Ray.
Seen on 2-core machines: `ray.init` costs 4-5 s and ~300 MB; the object store cannot go
below 75 MiB; a process killed without `ray.shutdown()` leaves its actors running.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

MIN_OBJECT_STORE_MB = 80


def init_ray(
    num_cpus: int = 0, object_store_mb: int = 256, address: str = "", log_to_driver: bool = False
) -> bool:
    """Start (or join) Ray. Returns True if this call started it (so it must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Serve kills its HTTP proxy when it is not up within 5 s (then every request fails); a
    # loaded 2-core box can take longer. Read by the Serve controller of a Ray started here
    # (a joined cluster keeps its own settings)
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
    else:
        # Ray on Linux "resolves" 127.0.0.1 to the machine's reachable address; a local
        # single-node Ray must stay on loopback (nothing else may reach it), so switch that
        # resolution off for this process and everything Ray spawns from it.
        from ray._private import ray_constants

        from genrec.deploy.ingress import serve_ingress_env

        os.environ.update(serve_ingress_env())  # Serve's HAProxy ingress, on loopback
        os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            object_store_memory=max(MIN_OBJECT_STORE_MB, object_store_mb) * 2**20,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=log_to_driver,
            configure_logging=True,
        )
    try:  # progress bars from Ray Data are ours to show, not the executor's
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset INFO lines
    except Exception:  # pragma: no cover - older Ray
        pass
    return True


@contextlib.contextmanager
def ray_session(num_cpus: int = 0, object_store_mb: int = 256, address: str = "") -> Iterator[None]:
    import ray

    started = init_ray(num_cpus=num_cpus, object_store_mb=object_store_mb, address=address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
