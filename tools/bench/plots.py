"""PNG plots of the benchmark results (matplotlib, Agg backend), drawn from results.json."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    return plt


def _slug(name: str) -> str:
    return name.replace("/", "-")


def accuracy_vs_time(name: str, table: dict, out: Path, profile: str = "nbiot") -> Path:
    """Test accuracy against cumulative simulated time on one link profile, one line per row."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, row in table["rows"].items():
        times, t = [], 0.0
        for s in row["radio"][profile]["round_s"]:
            t += s
            times.append(t / 3600)
        style = "-" if label.startswith("ours") else "--" if label in ("fedavg", "paper") else ":"
        ax.plot(times, [100 * a for a in row["accuracy_per_round"]], style, marker="o", markersize=3, label=label)
    ax.axhline(100 * table["target_accuracy"], color="grey", linewidth=0.8, label="target")
    ax.set_xscale("log")
    ax.set_xlabel(f"simulated time on {profile} (hours, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(name)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"accuracy-vs-{profile}-{_slug(name)}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


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
    ax.set_ylabel("bytes per client per round (log scale)")
    ax.set_title(name)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / f"bytes-{_slug(name)}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    path = out / "aggregator-memory.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def all_plots(results: dict, out: Path) -> list[Path]:
    paths = []
    for name, table in results.get("paper", {}).get("tables", {}).items():
        paths += [accuracy_vs_time(name, table, out), bytes_per_round(name, table, out)]
    scaling = results.get("codec", {}).get("scaling")
    if scaling:
        paths.append(aggregator_memory(scaling, out))
    return paths
