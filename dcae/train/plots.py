"""Loss curves of a run, from its ``metrics.jsonl``, as a PNG."""
import json
import math
from pathlib import Path

COLUMNS = 4


def plot_losses(metrics: Path, out: Path, title: str) -> None:
    """One panel per logged term (every key but step, lr and images_per_s; a term equal to an earlier one at
    every step, e.g. "rec" = "l1" without LPIPS, is left out), against the step, up to COLUMNS per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    series: dict[str, list] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        points = [(row["step"], row[key]) for row in rows if key in row]
        if key not in ("step", "lr", "images_per_s") and points not in series.values():
            series[key] = points
    if not series:
        return
    cols = min(COLUMNS, len(series))
    lines = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(3.2 * cols, 2.6 * lines), squeeze=False)
    for ax, (key, points) in zip(axes.flat, series.items()):
        ax.plot(*zip(*points), marker="." if len(points) < 20 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in axes.flat[len(series):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
