"""PNG plots of a training run (matplotlib, an optional dependency: `pip install jgoat[bench]`)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # plots are a convenience: say how to get them instead of failing the run
        raise ImportError("plots need matplotlib: pip install 'jgoat[bench]'") from err
    return plt


def plot_run(run_dir: str | pathlib.Path, load: Mapping[str, np.ndarray] | None = None) -> list[pathlib.Path]:
    """Write training.png (task loss, aux loss, learning rate per step, eval metrics) and, for GOAT, expert_load.png.

    Args:
      run_dir: a directory holding metrics.jsonl (one JSON object per step; rows with ``eval/*`` keys are eval
        results, drawn in a fourth panel).
      load: optional {layer path: [E] expert load} (``jgoat.apply(..., collect_load=True)``).

    Returns:
      The written files.
    """
    plt = _pyplot()
    run_dir = pathlib.Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in rows if "task_loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3 + bool(evals), figsize=(13 + 4 * bool(evals), 3.4), layout="constrained")
    for ax, key, title in zip(axes, ("task_loss", "aux", "lr"), ("task loss", "aux loss (GOAT)", "learning rate"),
                              strict=False):
        ax.plot(steps, [r[key] for r in train])
        ax.set_title(title)
        ax.set_xlabel("step")
    if evals:
        for key in sorted({k for r in evals for k in r if k.startswith("eval/") and k != "eval/perplexity"}):
            points = [(r["step"], r[key]) for r in evals if key in r]
            line, = axes[3].plot(*zip(*points, strict=True), marker="o", label=key.removeprefix("eval/"))
            step, value = points[-1]  # the final value written beside its point: readable even with one point
            axes[3].annotate(f"{value:.4g}", (step, value), textcoords="offset points", xytext=(-6, 6), ha="right",
                             fontsize=8, color=line.get_color())
        axes[3].set_xlim(0, max(steps + [r["step"] for r in evals]) * 1.08 or 1)  # a lone point is not at an edge
        axes[3].margins(y=0.25)
        axes[3].set_title("eval")
        axes[3].set_xlabel("step")
        axes[3].legend()
    written = [run_dir / "training.png"]
    fig.savefig(written[0], dpi=110, bbox_inches="tight")  # nothing cut off: the figure grows to its labels
    plt.close(fig)
    if load:
        names = sorted(load)
        matrix = np.stack([np.asarray(load[n]).reshape(-1, np.shape(load[n])[-1]).mean(axis=0) for n in names])
        fig, ax = plt.subplots(figsize=(6, 0.25 * len(names) + 1.5), layout="constrained")
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_xlabel("expert")
        ax.set_title(f"GOAT expert load on the test set (uniform = {1 / matrix.shape[1]:.3f})")
        fig.colorbar(image, ax=ax)
        written.append(run_dir / "expert_load.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")  # long layer names and colour-bar ticks included
        plt.close(fig)
    return written


def plot_results(out_dir: str | pathlib.Path, results: Sequence[Mapping]) -> pathlib.Path:
    """accuracy.png: test accuracy per method, one horizontal bar each (± the "std" key as an error bar, if given)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(results) + 1.2), layout="constrained")
    names = [r["method"] for r in results][::-1]  # first result on top
    values = [r["test_accuracy"] for r in results][::-1]
    errors = [r.get("std", 0.0) for r in results][::-1]
    ax.barh(names, values, xerr=errors if any(errors) else None, capsize=3)
    for y, (value, error) in enumerate(zip(values, errors, strict=True)):
        ax.text(value + error + 0.01, y, f"{value:.3f}", va="center", fontsize=8)
    ax.set_xlabel("test accuracy")
    ax.set_xlim(0, 1)
    path = pathlib.Path(out_dir) / "accuracy.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
