"""One self-contained HTML file of a finished run, for sharing.

The summary, every round (accuracy, uploads, skips, refusals, bytes each way, times), the
refusals by reason, each device's totals, the configuration, and the accuracy plots inline
(PNG data: URIs). No file beside it and nothing fetched: it opens offline, mailed or attached.

examples:
  pqsu report runs/run-20261202-013000                  # writes runs/run-20261202-013000/report.html
  pqsu report runs/farm --out /tmp/farm-report.html
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pqsu.protocol.errors import PqsuError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the folder of a run (pqsu run, pqsu cloud --out, pqsu simulate --out)")
    p.add_argument("--out", metavar="FILE", help="where to write the HTML file (default: RUN_DIR/report.html)")


def run(args: argparse.Namespace) -> int:
    from pqsu.cloud.run_plots import run_pngs
    from pqsu.tools.report.html_report import render
    from pqsu.tools.report.run_folder import read_run

    folder = read_run(args.run_dir)  # a folder that is not a run fails here, before any work
    out = Path(args.out) if args.out else folder.path / "report.html"
    pngs = run_pngs(folder.rounds, folder.config, folder.summary)
    text = render(folder, pngs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    except OSError as exc:
        raise PqsuError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"pqsu report: {len(folder.rounds)} rounds, {len(folder.devices)} devices -> {out} ({len(text):,} bytes)")
    return 0
