"""Loss curves of a run, from its ``metrics.jsonl``, as a PNG."""
import json
from pathlib import Path


def plot_losses(metrics: Path, out: Path, title: str) -> None:
    """One panel per logged loss term (every key but step, lr and images_per_s), against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in ("step", "lr", "images_per_s")]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(row["step"], row[key]) for row in rows if key in row]
        ax.plot(*zip(*points))
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
