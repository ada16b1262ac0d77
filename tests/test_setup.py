"""The README's commands: set-up is idempotent (a stamp keyed on the lock's hash)."""

import shutil
import subprocess

import pytest

from .conftest import ROOT


def test_second_setup_installs_nothing():
    if shutil.which("make") is None:
        pytest.fail("make is required by the README's commands but is not installed")
    # the test suite itself runs under `make test`, so the environment is set up: a dry
    # run of the set-up target must find nothing to do
    stamps = list((ROOT / ".venv").glob(".stamp-*"))
    assert stamps, "no .venv stamp: run the tests through `make test`"
    out = subprocess.run(["make", "-n", "setup"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install" not in out.stdout and "venv" not in out.stdout, out.stdout


def test_stamp_is_keyed_on_the_lock_hash():
    import hashlib

    digest = hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()[:16]
    assert (ROOT / ".venv" / f".stamp-{digest}").is_file()
