"""A run's PNGs, and the axis rules every fl-pqsu plot shares (matplotlib, Agg backend).

accuracy.png (per round) and accuracy_vs_uplink.png (against cumulative uplink bytes), drawn
from metrics.jsonl, summary.json and config.json. Rounds are whole numbers, so round axes get
integer ticks only; round 0 (the pre-trained, pruned model every device starts from) is a
point of its own; the title names the scheme, model, data set and devices; a log byte axis is
labelled in kB/MB at 1-2-5 steps instead of three bare powers of ten.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from pqsu.cloud.config import scheme_of

REFERENCE_STYLE = dict(color="black", linestyle="--", linewidth=1.2, marker="s", markersize=3)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and boards
    import matplotlib.pyplot as plt
    return plt


def run_title(config: dict) -> str:
    """"ours · cnn · fashion-mnist · 10 devices" from a run's config.json (parts it lacks left out)."""
    parts = [scheme_of(config) if config else None, config.get("model"), config.get("dataset")]
    if isinstance(config.get("clients"), int):
        parts.append(f"{config['clients']} device{'s' if config['clients'] != 1 else ''}")
    return " · ".join(str(p) for p in parts if p)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 or n == int(n) else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB"


def round_axis(ax, last_round: int) -> None:
    """Integer round ticks from 0 (never 1.25, 1.5...): every round up to 12, then every k-th."""
    from matplotlib.ticker import MultipleLocator

    ax.xaxis.set_major_locator(MultipleLocator(max(1, math.ceil(last_round / 12))))
    ax.set_xlim(-0.3, last_round + 0.3)
    ax.set_xlabel("round")


def log_axis(axis, formatter=human_bytes) -> None:
    """A log axis labelled as people read it: at every digit within one decade, at 1, 2 and 5 of each
    decade over a short span, at every power of ten over a long one. Call it once the data is drawn (it reads the axis's span)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    decades = math.log10(hi / lo) if lo > 0 and hi > 0 else 99
    subs = tuple(range(1, 10)) if decades <= 1 else (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0, 3.0) if decades <= 4 \
        else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=99))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: formatter(v)))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10)), numticks=99))
    axis.set_minor_formatter(NullFormatter())


def accuracy_points(rounds: list[dict], initial_accuracy: float | None) -> tuple[list[int], list[float]]:
    """(rounds, accuracy in %) with round 0 first when the run knows its starting accuracy; NaN left out."""
    pts = [(0, initial_accuracy)] + [(r["round"], r.get("accuracy")) for r in rounds]
    pts = [(x, 100 * a) for x, a in pts if isinstance(a, (int, float)) and math.isfinite(a)]
    return [x for x, _ in pts], [a for _, a in pts]


def accuracy_figure(rounds: list[dict], config: dict, initial_accuracy: float | None,
                    reference: tuple[str, list[float]] | None = None):
    """Accuracy per round; `reference` = (label, accuracy per round from round 0) drawn beside it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    xs, acc = accuracy_points(rounds, initial_accuracy)
    ax.plot(xs, acc, marker="o", markersize=4, label=scheme_of(config) if config else "this run")
    if reference:
        label, ref = reference
        ax.plot(range(len(ref)), [100 * a for a in ref], label=label, **REFERENCE_STYLE)
        ax.legend(fontsize=8)
    round_axis(ax, max([r["round"] for r in rounds] + [1]))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy per round: {run_title(config)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_vs_uplink_figure(rounds: list[dict], config: dict, initial_accuracy: float | None):
    """Accuracy against the uplink bytes sent so far (all devices); log axis when there is a spread."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    cum, total = [], 0
    for r in rounds:
        total += r.get("bytes_up") or 0
        cum.append(total)
    pts = [(c, 100 * r["accuracy"]) for c, r in zip(cum, rounds)
           if isinstance(r.get("accuracy"), (int, float)) and math.isfinite(r["accuracy"])]
    ax.plot([c for c, _ in pts], [a for _, a in pts], marker="o", markersize=4)
    if pts and min(c for c, _ in pts) > 0:
        ax.set_xscale("log")
        log_axis(ax.xaxis)
        if isinstance(initial_accuracy, (int, float)) and math.isfinite(initial_accuracy):
            # round 0 sent nothing: on a log axis that is a line, not a point
            ax.axhline(100 * initial_accuracy, color="grey", linewidth=0.8, linestyle=":", label="round 0 (no uplink yet)")
            low = min([a for _, a in pts] + [100 * initial_accuracy])
            ax.set_ylim(bottom=low - 0.05 * (max(a for _, a in pts) - low + 1))
            ax.legend(fontsize=8)
    ax.set_xlabel("uplink bytes so far, all devices (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy against uplink: {run_title(config)}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def run_pngs(rounds: list[dict], config: dict, summary: dict) -> dict[str, bytes]:
    """{file name: PNG bytes} of a run's two plots (none without a finished round)."""
    if not rounds:
        return {}
    plt = pyplot()
    initial = summary.get("initial_accuracy")
    pngs = {}
    for name, fig in (("accuracy.png", accuracy_figure(rounds, config, initial)),
                      ("accuracy_vs_uplink.png", accuracy_vs_uplink_figure(rounds, config, initial))):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        pngs[name] = buf.getvalue()
    return pngs


def write_run_plots(out: Path, rounds: list[dict], config: dict, summary: dict) -> list[Path]:
    paths = []
    for name, data in run_pngs(rounds, config, summary).items():
        (out / name).write_bytes(data)
        paths.append(out / name)
    return paths
