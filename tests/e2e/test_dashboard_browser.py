"""The dashboard in a real browser beside a live fleet, and the report of that run.

`pqsu run --dashboard` (3 agents, a private Mosquitto, real processes) prints the dashboard's URL;
headless Chromium (the Debian package, driven over the DevTools protocol) loads it and the test
reads the DOM as the rounds go: the three device rows, the round progress (asked, answered), and
the accuracy chart gaining a point as each round finishes, with the values of metrics.jsonl. Then
`pqsu report` of the finished run is opened in the same browser. Screenshots of both are saved in
the test's folder, and also in $PQSU_SCREENSHOTS when set (that is how docs/img/ gets them:
PQSU_SCREENSHOTS=docs/img ./scripts/test.sh -m long tests/e2e/test_dashboard_browser.py).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from pqsu.tools.lab.broker import mosquitto_path
from pqsu.tools.lab.browser import Browser, chromium_path
from tests.support.procs import flags, kill_mentioning, start_pqsu

ROUNDS, CLIENTS = 4, 3
SMALL = dict(clients=CLIENTS, rounds=ROUNDS, samples_per_client=300, proxy_samples=500, eval_samples=500,
             pretrain_epochs=0.3, finetune_epochs=0.2, lr=0.05)
RUN_TIMEOUT_S = 240.0

pytestmark = [
    pytest.mark.long,
    pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (Debian package chromium)"),
    pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("websocket") is None, reason="websocket-client missing (the dev extra)"),
    pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no Fashion-MNIST"),
]

PAGE = """JSON.stringify({
  devices: [...document.querySelectorAll('#devices tbody tr[data-device]')].map(r =>
             [r.dataset.device, r.dataset.online, r.children[2].textContent]),
  progress: Object.assign({}, document.getElementById('round-progress').dataset),
  points: [...document.querySelectorAll('#accuracy-chart circle.point')].map(c => [+c.dataset.round, c.textContent]),
})"""


def _keep(shot: Path, name: str) -> None:
    folder = os.environ.get("PQSU_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(folder) / name)


def _url(proc, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.running:
        if m := re.search(r"dashboard on (http://127\.0\.0\.1:\d+/)", proc.stdout):
            return m.group(1)
        time.sleep(0.2)
    pytest.fail(f"pqsu run printed no dashboard URL\n{proc.tail()}")


def test_dashboard_follows_a_live_run_in_chromium_and_the_report_opens(tmp_path):
    runs = tmp_path / "runs"
    proc = start_pqsu(["run", "--dashboard", *flags(**SMALL), "--runs-dir", str(runs), "--name", "x"], tmp_path, "run")
    history: list[dict] = []
    try:
        url = _url(proc, 60)
        with Browser(width=1280, height=1000) as browser:
            browser.open(url)
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while time.monotonic() < deadline and proc.running:
                page = json.loads(browser.evaluate(PAGE))
                if not history or page != history[-1]:
                    history.append(page)
                if len(page["points"]) == ROUNDS:
                    browser.screenshot(tmp_path / "end.png")
                    break
                time.sleep(0.25)
            code = proc.wait(RUN_TIMEOUT_S)
            assert code == 0, proc.tail()

            # the three devices, each a training device, were on the page and online
            assert any(sorted(d for d, online, role in p["devices"] if online == "true" and role == "training")
                       == ["dev-000", "dev-001", "dev-002"] for p in history), history[-1]
            # round progress: every round was seen asking the 3 devices, some while not all had answered yet
            progress = [p["progress"] for p in history if "round" in p["progress"]]
            assert {int(p["round"]) for p in progress} >= set(range(2, ROUNDS + 1))
            assert all(p["asked"] == str(CLIENTS) for p in progress)
            assert any(int(p["answered"]) < CLIENTS and p["open"] == "true" for p in progress)
            assert any(p["answered"] == str(CLIENTS) for p in progress)
            # the chart gained its points one round at a time, and they are metrics.jsonl's accuracies
            counts = [len(p["points"]) for p in history]
            assert counts == sorted(counts) and len(set(counts)) >= ROUNDS, counts
            metrics = [json.loads(line) for line in (runs / "x" / "metrics.jsonl").read_text().splitlines()]
            assert history[-1]["points"] == [[m["round"], f"round {m['round']}: {100 * m['accuracy']:.1f}%"]
                                             for m in metrics]
            _keep(tmp_path / "end.png", "dashboard.png")

            # the report of the finished run, in the same browser: plots inline and loaded
            report = start_pqsu(["report", str(runs / "x")], tmp_path, "report")
            assert report.wait(60) == 0, report.tail()
            browser.open((runs / "x" / "report.html").resolve().as_uri())
            widths = browser.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 2 and min(widths) >= 300, widths
            rows = browser.evaluate("document.querySelectorAll('table')[1].querySelectorAll('tbody tr').length")
            assert rows == ROUNDS
            browser.screenshot(tmp_path / "report-full.png")
            _keep(browser.screenshot(tmp_path / "report.png", full_page=False), "report.png")  # the top, for the README
    finally:
        proc.stop()
        kill_mentioning(str(runs))
