"""The expert-load picture: tokens per expert per MoE layer over the run's log steps.

Every log step appends one line to `<run_dir>/expert_load.jsonl` (rank 0's counts, summed
over its EP group: the tokens routed to each expert before any drop). At the end of the run
`expert_load.png` is drawn from the whole file, so a resumed run's picture covers every
segment; a step logged twice (a resume rewinds to its checkpoint) keeps its last line.

Colour is load / mean load of that layer at that step: 1 is perfect balance, 0 an idle
expert, 2 an expert with twice its share.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LOAD_FILE", "LOAD_PNG", "LoadMapSink", "read_loads", "render", "shares"]

LOAD_FILE = "expert_load.jsonl"
LOAD_PNG = "expert_load.png"


class LoadMapSink:
    """Records tokens per expert per layer at each log step; draws the heatmap at the end.
    Build it on rank 0 only."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOAD_FILE
        self.png = Path(run_dir) / LOAD_PNG

    def record(self, step: int, counts_LE: Sequence[Sequence[float]]) -> None:
        """One log step's counts, one list per MoE layer (nothing for a dense model)."""
        if not counts_LE:
            return
        layers = [[float(c) for c in counts_E] for counts_E in counts_LE]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), "tokens_per_expert": layers}) + "\n")

    def render(self) -> Path | None:
        """Draw expert_load.png from everything recorded; None when nothing was (dense)."""
        return render(self.path, self.png)


def read_loads(path: str | os.PathLike) -> tuple[list[int], list[list[list[float]]]]:
    """(steps ascending, counts [step][layer][expert]) from an expert_load.jsonl; a line cut
    short by a crash is skipped, a repeated step keeps its last line."""
    by_step: dict[int, list[list[float]]] = {}
    path = Path(path)
    if not path.exists():
        return [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        by_step[int(row["step"])] = row["tokens_per_expert"]
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def shares(counts_SLE: list[list[list[float]]], layer: int):
    """Load / mean load [steps, experts] of one layer (0 where a step routed nothing)."""
    import numpy as np

    load_SE = np.asarray([c[layer] for c in counts_SLE if len(c) > layer], dtype=np.float64)
    mean_S = load_SE.mean(axis=1, keepdims=True)
    return np.divide(load_SE, mean_S, out=np.zeros_like(load_SE), where=mean_S > 0)


def render(path: str | os.PathLike, png: str | os.PathLike) -> Path | None:
    steps, counts_SLE = read_loads(path)
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, whatever the environment says
    from matplotlib import pyplot as plt

    n_layers = max(len(c) for c in counts_SLE)
    fig, axes = plt.subplots(
        n_layers, 1, figsize=(8, 1.2 + 1.6 * n_layers), squeeze=False, sharex=True
    )
    image = None
    for i in range(n_layers):
        share_SE = shares(counts_SLE, i)
        ax = axes[i, 0]
        image = ax.imshow(
            share_SE.T,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            vmin=0.0,
            vmax=max(2.0, float(share_SE.max())),
            extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, share_SE.shape[1] - 0.5),
            interpolation="nearest",
        )
        ax.set_ylabel(f"MoE layer {i}\nexpert")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("tokens per expert / mean (1 = balanced)")
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.9)
    png = Path(png)
    tmp = png.with_name(png.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, png)  # a reader never sees half a picture
    return png
