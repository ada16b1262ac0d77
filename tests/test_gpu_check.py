"""benchmarks/gpu_check.sh --dry-run: the GPU check's code path runs on CPU (gloo, fp32,
reference attention) with torchrec, fbgemm-gpu, Ray and PyYAML made unimportable, as on the
bare GPU machine it is written for, and prints one JSON line of figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from .conftest import ROOT

BLOCK = '''
import sys

class _Block:
    """Imports of what a bare GPU machine lacks fail, as there."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torchrec", "fbgemm_gpu", "ray", "yaml"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _Block())
'''


def test_gpu_check_dry_run_needs_no_torchrec_fbgemm_or_ray(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(tmp_path),  # the script prepends the repo root
    }
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    out = json.loads(lines[0])
    assert out["dry_run"] is True and out["backend"] == "gloo" and out["world_size"] == 1
    assert out["torchrec_importable"] is False  # the block held: nothing needed torchrec
    assert out["steps"] == 2 and out["attention"] == "reference"
    assert out["tokens_per_step"] > 0 and out["tokens_per_s"] > 0 and out["step_ms_median"] > 0
    assert math.isfinite(out["loss_first"]) and math.isfinite(out["loss_last"])
