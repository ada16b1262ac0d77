"""Is this environment exactly requirements.lock, and is the lock consistent?

    python .ci/check_lock.py [--lock requirements.lock]

1. every installed distribution is pinned in the lock at its installed version, and every
   pin is installed (genrec itself and pip excepted);
2. `pip check` reports nothing but the one documented line (the lock's header explains it:
   TorchRec's metadata names the CUDA `fbgemm-gpu`, the CPU set has `fbgemm_gpu-cpu`).
Exit 1 naming each difference. `make setup` runs it after installing the lock.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ALLOWED_PIP_CHECK = {"torchrec 1.8.0 requires fbgemm-gpu, which is not installed."}
NOT_LOCKED = {"genrec", "pip"}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canon(name)] = version
    return pins


def problems(lock: Path) -> list[str]:
    pins = read_lock(lock)
    installed = {canon(d.metadata["Name"]): d.version for d in metadata.distributions()}
    out = []
    for name, version in sorted(installed.items()):
        if name in NOT_LOCKED:
            continue
        if name not in pins:
            out.append(f"{name}=={version} is installed but not in {lock.name}")
        elif version.split("+")[0] != pins[name]:  # torch's wheel says 2.13.0+cpu
            out.append(f"{name}=={version} is installed, {lock.name} pins {pins[name]}")
    out += [f"{n}=={v} is pinned but not installed" for n, v in pins.items() if n not in installed]
    check = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
    )
    out += [
        f"pip check: {line}"
        for line in check.stdout.splitlines()
        if line.strip() and line.strip() not in ALLOWED_PIP_CHECK and "No broken" not in line
    ]
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lock", default=str(Path(__file__).resolve().parents[1] / "requirements.lock"))
    found = problems(Path(p.parse_args().lock))
    for line in found:
        print(f"check_lock: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
