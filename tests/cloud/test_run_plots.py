"""A run's plots as a reader checks them: whole-round ticks from 0, the round-0 point, a title naming
scheme, model, data set and devices, and a log byte axis with labels people read."""
from __future__ import annotations

import pytest

from pqsu.cloud.config import FederatedConfig, scheme_of
from pqsu.cloud.run_plots import accuracy_figure, accuracy_vs_uplink_figure, human_bytes, pyplot, run_pngs

ROUNDS = [{"round": r, "accuracy": 0.5 + 0.05 * r, "bytes_up": 40_000 * r} for r in range(1, 6)]


@pytest.fixture
def config():
    return FederatedConfig.for_scheme("ours", clients=7).to_dict()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    pyplot().close("all")


def _drawn(fig):
    fig.canvas.draw()
    return fig.axes[0]


def test_accuracy_per_round_has_integer_ticks_a_round_0_point_and_a_title(config):
    ax = _drawn(accuracy_figure(ROUNDS, config, initial_accuracy=0.31))
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks == [0, 1, 2, 3, 4, 5]
    xs, ys = ax.lines[0].get_data()
    assert list(xs) == [0, 1, 2, 3, 4, 5] and ys[0] == pytest.approx(31.0)
    assert ax.get_title() == "accuracy per round: ours · cnn · fashion-mnist · 7 devices"


def test_many_rounds_get_every_kth_round_never_a_fraction(config):
    rounds = [{"round": r, "accuracy": 0.5} for r in range(1, 41)]
    ax = _drawn(accuracy_figure(rounds, config, initial_accuracy=None))
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert all(float(t).is_integer() for t in ticks) and 5 <= len(ticks) <= 13
    assert ax.lines[0].get_data()[0][0] == 1  # no round 0 without an initial accuracy


def test_a_reference_line_is_drawn_beside_the_run(config):
    ax = _drawn(accuracy_figure(ROUNDS, config, 0.3, reference=("fedavg", [0.3, 0.6, 0.65, 0.7, 0.72, 0.75])))
    assert [line.get_label() for line in ax.lines] == ["ours", "fedavg"]


def test_the_uplink_axis_is_log_with_byte_labels_at_1_2_5(config):
    ax = _drawn(accuracy_vs_uplink_figure(ROUNDS, config, initial_accuracy=0.3))
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert len(labels) >= 3 and all(label.endswith(("kB", "MB")) for label in labels), labels
    assert "accuracy against uplink: ours" in ax.get_title()


def test_run_pngs_are_pngs_and_none_without_a_round(config):
    pngs = run_pngs(ROUNDS, config, {"initial_accuracy": 0.3})
    assert set(pngs) == {"accuracy.png", "accuracy_vs_uplink.png"}
    assert all(data.startswith(b"\x89PNG\r\n\x1a\n") for data in pngs.values())
    assert run_pngs([], config, {}) == {}


def test_scheme_of_a_config_is_its_preset_or_custom():
    for scheme in ("fedavg", "paper", "ours"):
        assert scheme_of(FederatedConfig.for_scheme(scheme, rounds=3).to_dict()) == scheme
    assert scheme_of(FederatedConfig.for_scheme("ours", select="topk:0.1").to_dict()) == "custom"


def test_human_bytes():
    assert [human_bytes(v) for v in (500, 2000, 50_000, 1_000_000, 2_500_000)] == \
        ["500 B", "2 kB", "50 kB", "1 MB", "2.5 MB"]
