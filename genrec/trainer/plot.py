"""`genrec plot RUN_DIR`: PNG curves of loss, per-window metrics, throughput and input stall."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from genrec.trainer.metrics_log import read_metrics


def _series(rows: list[dict], kind: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for r in rows:
        if r["kind"] == kind:
            x = r["window"] if kind == "window" else r["step"]
            out[r["name"]][0].append(x)
            out[r["name"]][1].append(r["value"])
    return dict(out)


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    steps, windows = _series(rows, "step"), _series(rows, "window")
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name, rect=(0, 0, 1, 1)):
        path = out_dir / name
        fig.tight_layout(rect=rect)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    panels = [
        ("loss.png", "training loss", ["loss"], "step"),
        ("throughput.png", "throughput", ["samples_per_s", "tokens_per_s"], "step"),
        ("input_stall.png", "fraction of step time waiting for input", ["input_stall"], "step"),
    ]
    for fname, title, names, xlabel in panels:
        present = [n for n in names if n in steps]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.2), squeeze=False)
        for ax, n in zip(axes[0], present):
            ax.plot(*steps[n], lw=1)
            ax.set_title(f"{title}: {n}" if len(present) > 1 else title)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        save(fig, fname)

    metric_names = sorted({n.split("/", 1)[1] for n in windows if "/" in n})
    if metric_names:
        fig, axes = plt.subplots(
            1, len(metric_names), figsize=(5 * len(metric_names), 3.4), squeeze=False
        )
        for ax, m in zip(axes[0], metric_names):
            for who in sorted({n.split("/", 1)[0] for n in windows if n.endswith("/" + m)}):
                xs, ys = windows[f"{who}/{m}"]
                ax.plot(xs, ys, marker="o", label=who)
            ax.set_title(f"progressive {m.upper()} per window")
            ax.set_xlabel("window")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.suptitle("each window scored before the model trained on it", fontsize=9)
        save(fig, "window_metrics.png", rect=(0, 0, 1, 0.93))
    if not written:
        raise ValueError(f"{run_dir}/metrics.csv holds no rows to plot")
    return written
