"""The package as a user gets it: a wheel installed into a fresh virtual environment.

The wheel is built from a copy of the sources (nothing written into the checkout) and
installed into a new venv whose only other packages are those of the environment running
the tests (which `make setup` installed from requirements.lock): a path entry to its
site-packages, no download. genrec's own `.pth` of the editable install is not processed
there and PYTHONPATH is cleared, so `genrec` can only come from the wheel. Then, from a
directory outside the checkout: `pip check` (the wheel's Requires-Dist satisfied by the
locked set), `genrec --version`, and `genrec config show quickstart` (package data).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import genrec

from .conftest import ROOT

_spec = importlib.util.spec_from_file_location("check_lock", ROOT / ".ci" / "check_lock.py")
check_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_lock)
ALLOWED_PIP_CHECK, read_lock = check_lock.ALLOWED_PIP_CHECK, check_lock.read_lock


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "genrec", src / "genrec", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(src)],
        src, dict(os.environ),
    )  # fmt: skip
    (whl,) = dist.glob("genrec-*.whl")
    return whl


def _wheel_metadata(whl: Path) -> tuple[list[str], str]:
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        return names, z.read(meta).decode()


def test_wheel_ships_configs_license_and_requirements(wheel):
    names, meta = _wheel_metadata(wheel)
    shipped = {Path(n).name for n in names if n.startswith("genrec/configs/")}
    assert shipped == {p.name for p in (ROOT / "genrec" / "configs").glob("*.yaml")}
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert re.search(rf"^Version: {re.escape(genrec.__version__)}$", meta, re.M)
    reqs = [Requirement(r) for r in re.findall(r"^Requires-Dist: (.+)$", meta, re.M)]
    core = {canonicalize_name(r.name) for r in reqs if r.marker is None}
    assert {"torch", "torchrec", "ray", "pyarrow", "pyyaml"} <= core
    assert not {"pytest", "ruff"} & core, "test and lint tools must stay in the dev extra"
    extras = set(re.findall(r"^Provides-Extra: (.+)$", meta, re.M))
    assert {"serve", "gpu", "dev"} <= extras
    # every requirement, of every extra, admits the version the lock pins for it (the gpu
    # extra's fbgemm-gpu: the lock's CPU build of the same version, swapped in the image)
    lock = read_lock(ROOT / "requirements.lock")
    for r in reqs:
        name = canonicalize_name(r.name)
        pinned = lock.get(name) or lock.get(f"{name}-cpu")
        assert pinned, f"{r} is not pinned in requirements.lock"
        assert r.specifier.contains(pinned), f"{r} excludes the locked {name}=={pinned}"


def test_wheel_in_a_fresh_venv_runs_from_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", "--without-pip", str(venv)], tmp_path, dict(os.environ))
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    # the locked packages of this environment, visible without installing them again
    (site / "_locked_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _run(
        [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "-c",
         str(ROOT / "requirements.lock"), str(wheel)],
        outside, env,
    )  # fmt: skip
    where = _run([py, "-c", "import genrec; print(genrec.__file__)"], outside, env).stdout
    assert where.strip().startswith(str(site)), f"genrec imported from {where}"
    check = subprocess.run(
        [py, "-m", "pip", "check"], cwd=outside, env=env, capture_output=True, text=True
    )
    complaints = {line.strip() for line in check.stdout.splitlines() if line.strip()}
    assert complaints <= ALLOWED_PIP_CHECK, check.stdout  # genrec's requirements all met
    version = _run([venv / "bin" / "genrec", "--version"], outside, env).stdout
    assert version.strip() == f"genrec {genrec.__version__}"
    shown = _run([venv / "bin" / "genrec", "config", "show", "quickstart"], outside, env).stdout
    import yaml

    cfg = yaml.safe_load(shown)
    assert cfg["data"]["source"] == "tecd" and cfg["trainer"]["world_size"] == 2
    missing = subprocess.run(
        [venv / "bin" / "genrec", "config", "show", "no_such_config"],
        cwd=outside, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 2 and "quickstart" in missing.stderr  # names shipped ones


def test_environment_is_exactly_the_lock():
    """The environment the tests run in is requirements.lock, and torchrec's pin holds."""
    lock = read_lock(ROOT / "requirements.lock")
    assert metadata.version("torchmetrics") == lock["torchmetrics"]
    torchrec_reqs = [Requirement(r) for r in metadata.requires("torchrec")]
    pin = next(r for r in torchrec_reqs if r.name == "torchmetrics")
    assert pin.specifier.contains(lock["torchmetrics"])
    out = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "check_lock.py")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_torchrec_metrics_run_on_the_locked_torchmetrics():
    """torchrec 1.8 pins torchmetrics==1.0.3 (the lock follows it): its AUC and torchmetrics'
    own agree with the hand-computed value on this torch."""
    import torch
    from torchmetrics.classification import BinaryAUROC
    from torchrec.metrics.auc import compute_auc

    preds, labels = torch.tensor([[0.1, 0.4, 0.35, 0.8]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    # positive/negative pairs ordered right: (0.35 > 0.1), (0.8 > 0.1), (0.8 > 0.4) of 4
    assert compute_auc(1, [preds], [labels], [torch.ones_like(preds)]).item() == 0.75
    assert BinaryAUROC()(preds[0], labels[0].long()).item() == 0.75
