"""The Pareto front of a finished search: which trials no other trial beats on every objective.

    front = pareto_front(points, ("minimize", "maximize"))   # indices into points
    write_report(study, out_dir)                              # pareto.md, pareto.png

A point dominates another when it is at least as good on every objective and strictly better
on one. Points with a non-finite value (trials the search did not train: over the FLOPs budget
or an invalid config, see xpar.search.trial) are never on the front. Pure Python on floats:
testable on synthetic points, no Optuna needed for the front itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

DIRECTIONS = ("minimize", "maximize")
# The study's objectives, in order (xpar.search.trial returns them in this order).
OBJECTIVES = ("val_loss", "tokens_per_s")
# What each trial records about itself (xpar.search.trial), shown beside its parameters.
FACTS = ("flops_per_token", "active_params")


def _better_or_equal(a: float, b: float, direction: str) -> bool:
    return a <= b if direction == "minimize" else a >= b


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """a is at least as good as b on every objective and strictly better on one."""
    if not all(_better_or_equal(x, y, d) for x, y, d in zip(a, b, directions, strict=True)):
        return False
    return any(x != y for x, y in zip(a, b, strict=True))


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points with finite values, in input order.

    Equal points are all kept (none dominates the other). O(n^2): a search has tens of trials.
    """
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"direction {d!r} is not one of {DIRECTIONS}")
    finite = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    return [
        i
        for i in finite
        if not any(dominates(points[j], points[i], directions) for j in finite if j != i)
    ]


def _fmt(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:,.0f}"


def front_table(rows: list[dict], columns: Sequence[str]) -> str:
    """A Markdown table of rows (dicts) in the given column order."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def study_rows(study) -> tuple[list[dict], list[int]]:
    """Every complete trial as a row (number, params, objectives) and the front's indices."""
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    rows = [
        {
            "trial": t.number,
            **t.params,
            **{k: t.user_attrs[k] for k in FACTS if k in t.user_attrs},
            **dict(zip(OBJECTIVES, t.values, strict=True)),
        }
        for t in trials
    ]
    directions = [d.name.lower() for d in study.directions]
    front = pareto_front([t.values for t in trials], directions)
    return rows, front


def plot_front(rows: list[dict], front: list[int], path: Path) -> None:
    """Every trained trial as a dot (val loss against tokens/s), the front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if math.isfinite(r["val_loss"])]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(
        [r["tokens_per_s"] for r in trained],
        [r["val_loss"] for r in trained],
        color="0.6",
        label="trial",
    )
    best = sorted((rows[i] for i in front), key=lambda r: r["tokens_per_s"])
    ax.plot(
        [r["tokens_per_s"] for r in best],
        [r["val_loss"] for r in best],
        "o-",
        color="C3",
        label="Pareto front",
    )
    for r in best:
        ax.annotate(f"#{r['trial']}", (r["tokens_per_s"], r["val_loss"]), fontsize=8)
    ax.set_xlabel("training tokens/s (higher is better)")
    ax.set_ylabel("validation loss (lower is better)")
    ax.set_title(f"xpar search: {len(trained)} trained trials, {len(front)} on the front")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(study, out_dir: str | Path) -> tuple[str, Path, Path]:
    """The front as a Markdown table (out_dir/pareto.md) and a plot (out_dir/pareto.png).

    Returns (table, table path, plot path). Columns: the trial number, every parameter any
    trial searched (knobs only some variants have stay blank elsewhere), the objectives."""
    out = Path(out_dir)
    rows, front = study_rows(study)
    params = list(dict.fromkeys(k for t in study.trials for k in t.params))
    # the variant, then its knobs (each only some variants have), then the rest
    params.sort(key=lambda k: (k != "attention", not k.startswith("model.attention_options.")))
    columns = ["trial", *params, *FACTS, *OBJECTIVES]
    best = sorted((rows[i] for i in front), key=lambda r: r["val_loss"])
    n_skipped = sum(not math.isfinite(r["val_loss"]) for r in rows)
    n_failed = sum(t.state.name == "FAIL" for t in study.trials)
    table = front_table(best, columns)
    summary = (
        f"{len(rows)} complete trials ({n_skipped} of them not trained: over the FLOPs budget "
        f"or an invalid config), {n_failed} failed or interrupted; {len(front)} on the Pareto "
        "front (val loss down, tokens/s up)"
    )
    md, png = out / "pareto.md", out / "pareto.png"
    md.write_text(f"# Pareto front of study {study.study_name}\n\n{summary}\n\n{table}\n")
    plot_front(rows, front, png)
    return f"{summary}\n{table}", md, png
