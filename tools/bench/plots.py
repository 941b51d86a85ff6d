"""PNG plots of the benchmark results (matplotlib, Agg backend), drawn from results.json.

The axis rules are the run plots' (pqsu.cloud.run_plots): integer round ticks with round 0,
log axes labelled at 1-2-5 steps, titles naming model, data set and devices, and dense FedAvg
drawn as the reference line wherever a table has it.
"""
from __future__ import annotations

from pathlib import Path

from pqsu.cloud.run_plots import REFERENCE_STYLE, human_bytes, log_axis, pyplot as _plt, round_axis


def _slug(name: str) -> str:
    return name.replace("/", "-")


def _title(what: str, name: str, table: dict) -> str:
    clients = table.get("config", {}).get("clients")
    return f"{what}: {name.replace('/', ' · ')}" + (f" · {clients} devices" if clients else "")


# Round times people read on a log time axis: 0.1 s ... 1 s, 10 s, 1 min, 10 min, 1 h, 10 h, 4 days; and finer
# steps when the plot spans little.
TIME_TICKS_S = (0.01, 0.1, 1, 10, 60, 600, 3600, 36000, 345600, 3456000)
FINE_TIME_TICKS_S = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 18000, 36000,
                     86400, 172800)


def _seconds(s: float) -> str:
    return (f"{s:g} s" if s < 60 else f"{s / 60:g} min" if s < 3600 else f"{s / 3600:g} h" if s < 86400
            else f"{s / 86400:g} days")


def _time_axis(axis) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    fine = lo > 0 and hi / lo < 10 ** 2.5
    axis.set_major_locator(FixedLocator(FINE_TIME_TICKS_S if fine else TIME_TICKS_S))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: _seconds(v)))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10)), numticks=99))
    axis.set_minor_formatter(NullFormatter())


def _style(label: str) -> dict:
    if label == "fedavg":
        return {**REFERENCE_STYLE, "label": "fedavg (reference)"}
    return dict(linestyle="-" if label.startswith("ours") else "--" if label == "paper" else ":", marker="o",
                markersize=3, label=label)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _legend_outside(ax) -> None:
    """Right of the axes: with up to nine rows a legend inside covers the lines it names."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def accuracy_per_round(name: str, table: dict, out: Path) -> Path:
    """Test accuracy per round from round 0, one line per row, dense FedAvg as the reference."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=100)
    last = 1
    for label, row in table["rows"].items():
        acc = [row.get("initial_accuracy")] + list(row["accuracy_per_round"])
        pts = [(r, 100 * a) for r, a in enumerate(acc) if a is not None]
        last = max(last, len(acc) - 1)
        ax.plot([r for r, _ in pts], [a for _, a in pts], **_style(label))
    if "target_accuracy" in table:
        ax.axhline(100 * table["target_accuracy"], color="grey", linewidth=0.8, label="target")
    round_axis(ax, last)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(_title("accuracy per round", name, table), fontsize=10)
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return _save(plt, fig, out / f"accuracy-per-round-{_slug(name)}.png")


def accuracy_vs_time(name: str, table: dict, out: Path, profile: str = "nbiot") -> Path:
    """Test accuracy against cumulative simulated time on one link profile, one line per row."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=100)
    for label, row in table["rows"].items():
        times, t = [], 0.0
        for s in row["radio"][profile]["round_s"]:
            t += s
            times.append(t)
        ax.plot(times, [100 * a for a in row["accuracy_per_round"]], **_style(label))
    ax.axhline(100 * table["target_accuracy"], color="grey", linewidth=0.8, label="target")
    ax.set_xscale("log")
    _time_axis(ax.xaxis)
    ax.set_xlabel(f"simulated time on {profile} (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(_title(f"accuracy against simulated {profile} time", name, table), fontsize=10)
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return _save(plt, fig, out / f"accuracy-vs-{profile}-{_slug(name)}.png")


def bytes_per_round(name: str, table: dict, out: Path) -> Path:
    """Uplink and downlink bytes per client per round, per row (log scale)."""
    plt = _plt()
    labels = list(table["rows"])
    up = [table["rows"][k]["up_bytes_per_client_round"] for k in labels]
    down = [table["rows"][k]["down_bytes_per_client_round"] for k in labels]
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.bar([x - 0.2 for x in xs], up, width=0.4, label="uplink")
    ax.bar([x + 0.2 for x in xs], down, width=0.4, label="downlink")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_yscale("log")
    log_axis(ax.yaxis, human_bytes)
    ax.set_ylabel("bytes per client per round (log scale)")
    ax.set_title(_title("bytes per client per round", name, table), fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    return _save(plt, fig, out / f"bytes-{_slug(name)}.png")


def aggregator_memory(scaling: dict, out: Path) -> Path:
    plt = _plt()
    pts = scaling["points"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([p["devices"] for p in pts], [p["peak_bytes"] / 1e6 for p in pts], marker="o", label="peak traced memory")
    ax.axhline(scaling["model_fp32_bytes"] / 1e6, color="grey", linestyle="--", label="model fp32 size")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("devices reporting in one round (log scale)")
    ax.set_ylabel("MB")
    ax.set_title(f"coordinator memory, {scaling['model']}, top-{scaling['density']:.0%} updates")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(plt, fig, out / "aggregator-memory.png")


def all_plots(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in results.get("paper", {}).get("tables", {}).items():
        paths += [accuracy_per_round(name, table, out), accuracy_vs_time(name, table, out),
                  bytes_per_round(name, table, out)]
    scaling = results.get("codec", {}).get("scaling")
    if scaling:
        paths.append(aggregator_memory(scaling, out))
    return paths
