"""Run metrics: TensorBoard event files and a long-format `metrics.csv` in the run directory.

Rows are (kind, step, window, name, value, wall_time): kind "step" for per-step figures
(loss, throughput, input stall), "window" for per-window progressive metrics. Appends on
resume, so a resumed run keeps one continuous curve.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

CSV_NAME = "metrics.csv"
FIELDS = ("kind", "step", "window", "name", "value", "wall_time")


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._writer = None
        self._csv = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / CSV_NAME
        new = not path.exists()
        self._file = path.open("a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(FIELDS)
        self._open_writer(purge_step=None)

    def _open_writer(self, purge_step: int | None) -> None:
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(self.run_dir / "tb"), flush_secs=10, purge_step=purge_step)

    def resume_at(self, step: int) -> None:
        """A run restored at `step`: drop rows logged after it by the run that died, so a
        resumed run keeps one curve with no repeated steps (CSV and TensorBoard alike)."""
        if not self.enabled:
            return
        self._file.close()
        path = self.run_dir / CSV_NAME
        with path.open() as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if r[0] == "epoch" or int(r[1]) <= step]
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
        self._file = path.open("a", newline="")
        self._csv = csv.writer(self._file)
        self._writer.close()
        self._open_writer(purge_step=step + 1)

    def log(self, kind: str, step: int, values: dict[str, float], window: int = -1) -> None:
        if not self.enabled:
            return
        now = time.time()
        for name, value in values.items():
            self._csv.writerow((kind, step, window, name, f"{float(value):.6g}", f"{now:.3f}"))
            tag = f"{kind}/{name}".replace("@", "_at_")  # TensorBoard tags: no '@'
            self._writer.add_scalar(tag, float(value), window if kind == "window" else step)
        self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / CSV_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a genrec run directory?")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["step"], r["window"] = int(r["step"]), int(r["window"])
        r["value"], r["wall_time"] = float(r["value"]), float(r["wall_time"])
    return rows
