"""The benchmark's plots as a reader checks them: round 0 and whole rounds, dense FedAvg drawn as the
reference, titles naming model, data set and devices, log axes labelled in units people read."""
from __future__ import annotations

import matplotlib.image

from pqsu.tools.bench import plots


def table() -> dict:
    rows = {}
    for label, start, up in (("fedavg", 0.6, 400_000), ("paper", 0.55, 30_000), ("ours", 0.58, 1_200)):
        rows[label] = {"initial_accuracy": 0.3, "accuracy_per_round": [start + 0.02 * i for i in range(6)],
                       "radio": {"nbiot": {"round_s": [up / 2000 * (1 + 0.1 * i) for i in range(6)]}},
                       "up_bytes_per_client_round": up, "down_bytes_per_client_round": 3 * up}
    return {"config": {"clients": 5}, "rows": rows, "target_accuracy": 0.62}


def test_accuracy_per_round_starts_at_round_0_with_fedavg_as_the_reference(tmp_path, monkeypatch):
    drawn = {}
    real_close = plots._plt().close
    monkeypatch.setattr(plots._plt(), "close", lambda fig: drawn.setdefault("fig", fig))
    path = plots.accuracy_per_round("alexnet/fashion-mnist", table(), tmp_path)
    real_close(drawn["fig"])
    assert path.name == "accuracy-per-round-alexnet-fashion-mnist.png"
    assert matplotlib.image.imread(path).shape[0] > 100
    ax = drawn["fig"].axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert {"fedavg (reference)", "paper", "ours"} <= set(lines)
    assert list(lines["ours"].get_xdata()) == [0, 1, 2, 3, 4, 5, 6]
    assert lines["fedavg (reference)"].get_color() == "black"
    assert ax.get_title() == "accuracy per round: alexnet · fashion-mnist · 5 devices"
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_the_time_and_byte_log_axes_read_in_seconds_minutes_and_bytes(tmp_path, monkeypatch):
    figs = []
    real_close = plots._plt().close
    monkeypatch.setattr(plots._plt(), "close", figs.append)
    plots.accuracy_vs_time("alexnet/fashion-mnist", table(), tmp_path)
    plots.bytes_per_round("alexnet/fashion-mnist", table(), tmp_path)
    for fig in figs:
        fig.canvas.draw()
    time_labels = _visible(figs[0].axes[0].xaxis)
    byte_labels = _visible(figs[1].axes[0].yaxis)
    for fig in figs:
        real_close(fig)
    assert time_labels and all(t.endswith((" s", " min", " h")) for t in time_labels), time_labels
    assert "1 min" in time_labels and "10 s" in time_labels
    assert len(byte_labels) >= 5 and all(t.endswith(("kB", "MB")) for t in byte_labels), byte_labels


def _visible(axis) -> list[str]:
    lo, hi = sorted(axis.get_view_interval())
    return [t.label1.get_text() for t in axis.get_major_ticks() if lo <= t.get_loc() <= hi and t.label1.get_text()]
