"""PNG plots of concurrency sweeps: TTFT, ITL and output throughput against concurrency, one line per series."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_levels(
    series: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str = ""
) -> Path:
    """`series` maps a label to its levels (each a `summarize()` dict with a `concurrency`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=80)
    panels = (
        ("ttft_ms", "TTFT (ms)", True),
        ("itl_ms", "ITL (ms)", True),
        ("output_throughput", "output tokens/s", False),
    )
    for axis, (key, label, has_percentiles) in zip(axes, panels, strict=True):
        for name, levels in series.items():
            points = [level for level in levels if level.get("concurrency") and key in level]
            if not points:
                continue
            xs = [level["concurrency"] for level in points]
            if has_percentiles:
                (line,) = axis.plot(
                    xs, [level[key]["p50"] for level in points], marker="o", label=f"{name} p50"
                )
                axis.plot(
                    xs,
                    [level[key]["p99"] for level in points],
                    marker="x",
                    ls="--",
                    color=line.get_color(),
                    label=f"{name} p99",
                )
            else:
                axis.plot(xs, [level[key] for level in points], marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
