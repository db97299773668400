"""PNG plots of benchmark results: concurrency sweeps (TTFT, ITL and output throughput against concurrency),
and sessions (TTFT and prefix hit rate per turn), one line per series."""

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
    return _save(fig, path)


def plot_turns(
    series: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str, hit_label: str
) -> Path:
    """TTFT p50 (solid) and p90 (dashed) per turn on a log scale, beside the prefix hit rate per turn.

    `series` maps a label to a result with `ttft_ms_per_turn` (turn -> {"p50", "p90"}) and
    `hit_rate_per_turn` (turn -> a fraction); `hit_label` names where the hit rate comes from.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ttft_axis, hit_axis) = plt.subplots(1, 2, figsize=(12, 4), dpi=80)
    for label, result in series.items():
        turns = [int(turn) for turn in result["ttft_ms_per_turn"]]
        per_turn = list(result["ttft_ms_per_turn"].values())
        (line,) = ttft_axis.plot(turns, [t["p50"] for t in per_turn], marker="o", label=label)
        ttft_axis.plot(
            turns, [t["p90"] for t in per_turn], ls="--", marker="x", color=line.get_color()
        )
        hit_axis.plot(
            turns,
            list(result["hit_rate_per_turn"].values()),
            marker="o",
            label=label,
            color=line.get_color(),
        )
    ttft_axis.set_yscale("log")
    ttft_axis.set_xlabel("turn")
    ttft_axis.set_ylabel("TTFT (ms): p50 solid, p90 dashed")
    hit_axis.set_xlabel("turn")
    hit_axis.set_ylabel(hit_label)
    hit_axis.set_ylim(0, 1)
    for axis in (ttft_axis, hit_axis):
        axis.grid(alpha=0.3)
    hit_axis.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
