"""What a finished run left in its folder, read for the report: summary, config, rounds, devices.

A run folder is what `pqsu run`, `pqsu cloud --out` or `pqsu simulate --out` writes; it is one
when it holds metrics.jsonl or summary.json. Everything else is optional, and round reports
are read as they are: a key an older or newer coordinator did not write stays missing (the
report shows "-").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pqsu.protocol.errors import PqsuError


@dataclass
class RunFolder:
    path: Path
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    devices: dict[str, dict] = field(default_factory=dict)  # device id -> its saved totals (devices/<id>/state.npz)
    problems: list[str] = field(default_factory=list)       # what could not be read, said in the report


def read_run(path: str | Path) -> RunFolder:
    """The run in `path`, or a one-line PqsuError when it is not a run folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise PqsuError(f"{folder} is not a folder")
    if not (folder / "metrics.jsonl").is_file() and not (folder / "summary.json").is_file():
        raise PqsuError(f"{folder} is not a run folder: it has neither metrics.jsonl nor summary.json "
                        "(the folder pqsu run, pqsu cloud --out or pqsu simulate --out writes)")
    run = RunFolder(folder)
    run.summary = _json_object(folder / "summary.json", run.problems)
    run.config = _json_object(folder / "config.json", run.problems) or _json_object(folder / "settings.json", [])
    run.rounds = _rounds(folder / "metrics.jsonl", run.problems)
    run.devices = _devices(folder / "devices", run.problems)
    return run


def _json_object(path: Path, problems: list[str]) -> dict:
    if not path.is_file():
        return {}
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} unreadable: {exc}")
        return {}
    if not isinstance(body, dict):
        problems.append(f"{path.name} is not a JSON object")
        return {}
    return body


def _rounds(path: Path, problems: list[str]) -> list[dict]:
    if not path.is_file():
        return []
    by_round: dict[int, dict] = {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            report = json.loads(line)
        except ValueError:
            problems.append(f"metrics.jsonl line {n} is not JSON: left out")  # a crash mid-write
            continue
        if isinstance(report, dict) and isinstance(report.get("round"), int):
            by_round[report["round"]] = report  # a resumed run rewrites its rounds: the last word counts
    return [by_round[r] for r in sorted(by_round)]


def _devices(folder: Path, problems: list[str]) -> dict[str, dict]:
    if not folder.is_dir():
        return {}
    from pqsu.edge.state import DeviceState, StateError

    devices = {}
    for state_file in sorted(folder.glob("*/state.npz")):
        try:
            state = DeviceState.load(state_file)
        except StateError as exc:
            problems.append(str(exc))
            continue
        devices[state_file.parent.name] = {"rounds_joined": state.rounds_joined, "uploads": state.uploads,
                                           "last_round": state.last_round, "bytes_up": state.bytes_up,
                                           "bytes_down": state.bytes_down}
    return devices


def finite(x) -> float | None:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None
