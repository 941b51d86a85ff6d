"""`pqsu report RUN_DIR`: one self-contained HTML file of a run, old and new metrics alike, and a clear
one-line error for a folder that is not a run."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from pqsu.cloud.config import FederatedConfig
from pqsu.tools import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, rounds: list[dict], summary: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(FederatedConfig.for_scheme("paper", clients=4).to_dict()))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def round_report(r: int, **extra) -> dict:
    return {"round": r, "model_id": f"{r:032x}", "accuracy": 0.5 + r / 100, "loss": 1.0, "selected": 4,
            "uploads": 3, "skipped": 1, "rejected": {}, "bytes_up": 1000 * r, "bytes_down": 40000,
            "model_bytes": 10000, "seconds": 2.5, **extra}


def report_of(tmp_path: Path, rounds: list[dict], capsys, summary: dict | None = None) -> str:
    run = write_run(tmp_path / "run", rounds, summary)
    assert cli.main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    return (run / "report.html").read_text()


def cells(html: str) -> list[list[str]]:
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", html)]


def test_report_holds_summary_rounds_refusals_and_both_plots_inline(tmp_path, capsys):
    rounds = [round_report(1), round_report(2, rejected={"late": 2, "bad-signature": 1}), round_report(3)]
    html = report_of(tmp_path, rounds, capsys, summary={"initial_accuracy": 0.3, "final_accuracy": 0.53, "rounds": 3})
    assert "paper · cnn · fashion-mnist · 4 devices" in html
    rows = cells(html)
    assert ["accuracy at round 0", "30.00%"] in rows and ["final accuracy", "53.00%"] in rows
    round_rows = [r for r in rows if len(r) > 10]
    assert [r[0] for r in round_rows] == ["1", "2", "3"] and round_rows[1][8] == "3"  # refused in round 2
    assert ["late", "2"] in rows and ["bad-signature", "1"] in rows
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    # self-contained: nothing fetched from anywhere
    assert not re.search(r'(?:src|href)="(?!data:)', html)


def test_old_and_new_metric_keys_both_render_and_missing_ones_show_a_dash(tmp_path, capsys):
    old = {k: v for k, v in round_report(1).items() if k not in ("loss", "model_bytes")}
    new = round_report(2, bytes_down_flashed=12345, downloads={"patch": 3, "full": 1})
    rows = [r for r in cells(report_of(tmp_path, [old, new], capsys)) if len(r) > 10]
    assert rows[0][2] == "-" and rows[0][11] == "-" and rows[0][12] == "-"  # loss, bytes flashed, downloads
    assert rows[1][11] == "12,345 B" and rows[1][12] == "3 / 1"


def test_values_from_the_run_are_escaped(tmp_path, capsys):
    html = report_of(tmp_path, [round_report(1, rejected={"<script>alert(1)</script>": 1})], capsys)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_a_run_cut_short_keeps_its_finished_rounds(tmp_path, capsys):
    run = write_run(tmp_path / "run", [round_report(1), round_report(2)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "accur')  # the coordinator died mid-write
    assert cli.main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "metrics.jsonl line 3 is not JSON: left out" in html and "No summary.json: the run did not finish" in html
    assert [r[0] for r in cells(html) if len(r) > 10] == ["1", "2"]


@pytest.mark.parametrize("make", ["empty folder", "missing", "a file"])
def test_a_folder_that_is_not_a_run_is_one_clear_line_and_exit_2(tmp_path, capsys, make):
    target = tmp_path / "x"
    if make == "empty folder":
        target.mkdir()
    elif make == "a file":
        target.write_text("hello")
    assert cli.main(["report", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pqsu report: error: {target} is not a")
