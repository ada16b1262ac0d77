"""Shared fixtures. Ray starts at most once per test session and is always shut down."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GENREC_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole test session (2 logical CPUs, small object store)."""
    import ray

    from genrec.ray_runtime import init_ray

    started = init_ray(num_cpus=4, object_store_mb=128)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data directory {SHARED_DATA} is missing (set GENREC_DATA_DIR)")
    return SHARED_DATA
