"""One self-contained HTML file of a finished run: summary, rounds, refusals, devices, config and plots.

Nothing outside the file: the style is inline and the plots are PNGs drawn afresh from the
run's metrics (the same figures as the run's accuracy.png and accuracy_vs_uplink.png) embedded
as data: URIs, so the file can be mailed or attached to a ticket and opened offline. Every value
from the run is escaped.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import json

from pqsu.tools.report.run_folder import RunFolder, finite

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232a; max-width: 1100px;
       margin: 1.5em auto; padding: 0 1em; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.sub { color: #6b7480; margin-top: 0; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #d9dee4; text-align: left; white-space: nowrap; }
th { color: #6b7480; font-weight: 600; font-size: 0.9em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots img { box-sizing: border-box; width: calc(50% - 0.5em); min-width: 320px; border: 1px solid #d9dee4; }
.problems { color: #c8423b; } code { font-size: 0.9em; }
"""
SUMMARY_ROWS = (("initial_accuracy", "accuracy at round 0", "pct"), ("final_accuracy", "final accuracy", "pct"),
                ("best_accuracy", "best accuracy", "pct"), ("rounds", "rounds", "int"),
                ("uploads", "updates accepted", "int"), ("skipped", "uploads skipped", "int"),
                ("rejected", "updates refused", "int"), ("bytes_up_total", "uplink bytes", "bytes"),
                ("bytes_down_total", "downlink bytes", "bytes"),
                ("bytes_up_dense_fp32", "uplink of dense fp32 FedAvg", "bytes"),
                ("uplink_reduction", "uplink reduction", "x"), ("wall_seconds", "wall time", "s"))
ROUND_COLUMNS = (("round", "round", "int"), ("accuracy", "accuracy", "pct"), ("loss", "loss", "num"),
                 ("train_loss", "train loss", "num"), ("selected", "asked", "int"), ("uploads", "uploads", "int"),
                 ("skipped", "skipped", "int"), ("missing", "missing", "int"), ("rejected", "refused", "count"),
                 ("bytes_up", "bytes up", "bytes"), ("bytes_down", "bytes down", "bytes"),
                 ("bytes_down_flashed", "bytes down flashed", "bytes"), ("downloads", "downloads patch / full", "dl"),
                 ("model_bytes", "model bytes", "bytes"), ("seconds", "seconds", "num"))


def fmt(value, kind: str) -> str:
    """A value as the report shows it; "-" for one the run does not have."""
    if kind == "count":
        return str(sum(v for v in value.values() if isinstance(v, int))) if isinstance(value, dict) else "-"
    if kind == "dl":
        return f"{value.get('patch', '-')} / {value.get('full', '-')}" if isinstance(value, dict) else "-"
    v = finite(value)
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "bytes":
        return f"{int(v):,} B"
    if kind == "x":
        return f"{v:,.1f}x"
    if kind == "s":
        return f"{v:,.1f} s"
    return f"{v:.4g}"


def _table(headers: list[str], rows: list[list[tuple[str, bool]]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if num else ""}>{html.escape(text)}</td>' for text, num in row)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(run: RunFolder, pngs: dict[str, bytes]) -> str:
    from pqsu.cloud.run_plots import run_title

    s, title = run.summary, run_title(run.config) or "a run"
    parts = [f"<h1>fl-pqsu run {html.escape(run.path.name)}</h1>",
             f'<p class="sub">{html.escape(title)} · report written '
             f'{dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}'
             + ("" if s.get("completed", True) else " · <b>the run did not finish</b>") + "</p>"]
    if run.problems:
        parts.append('<ul class="problems">' + "".join(f"<li>{html.escape(p)}</li>" for p in run.problems) + "</ul>")
    parts.append("<h2>Summary</h2>")
    parts.append(_table(["", ""], [[(label, False), (fmt(s.get(key), kind), True)] for key, label, kind in SUMMARY_ROWS
                                   if key in s]) if s else "<p>No summary.json: the run did not finish.</p>")
    if pngs:
        parts.append('<h2>Plots</h2><div class="plots">' + "".join(
            f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
            for name, data in pngs.items()) + "</div>")
    parts.append(f"<h2>Rounds ({len(run.rounds)})</h2>")
    parts.append(_table([c[1] for c in ROUND_COLUMNS],
                        [[(fmt(r.get(key), kind), kind != "dl") for key, _, kind in ROUND_COLUMNS] for r in run.rounds]))
    refusals: dict[str, int] = {}
    for r in run.rounds:
        for reason, n in (r.get("rejected") if isinstance(r.get("rejected"), dict) else {}).items():
            refusals[reason] = refusals.get(reason, 0) + (n if isinstance(n, int) else 0)
    parts.append("<h2>Refusals by reason</h2>")
    parts.append(_table(["reason", "updates refused"], [[(k, False), (f"{n:,}", True)]
                                                        for k, n in sorted(refusals.items(), key=lambda kv: -kv[1])])
                 if refusals else "<p>None: every update that arrived was accepted.</p>")
    if run.devices:
        parts.append(f"<h2>Devices ({len(run.devices)})</h2>")
        parts.append(_table(["device", "rounds joined", "uploads", "last round", "bytes up", "bytes down"],
                            [[(d, False)] + [(fmt(v.get(k), kind), True) for k, kind in
                                             (("rounds_joined", "int"), ("uploads", "int"), ("last_round", "int"),
                                              ("bytes_up", "bytes"), ("bytes_down", "bytes"))]
                             for d, v in run.devices.items()]))
    if run.config:
        parts.append("<h2>Configuration</h2>")
        parts.append(_table(["setting", "value"], [[(k, False), (json.dumps(v, default=str), False)]
                                                   for k, v in sorted(run.config.items())]))
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fl-pqsu run {html.escape(run.path.name)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
