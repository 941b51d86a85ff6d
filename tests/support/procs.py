"""What tests that run `pqsu` as processes need beyond the lab (`pqsu.tools.lab`): starting one with
stdout and stderr apart (tests read them separately), and a finalizer that finds what a test left
behind through the test's unique folder in a process's command line."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil

from pqsu.tools.lab.fleet_lab import flags, pqsu  # noqa: F401  (re-exported for tests)
from pqsu.protocol.process import Process


def start_pqsu(args: list[str], logdir: Path, name: str) -> Process:
    """`pqsu ARGS` in its own process group; output in <logdir>/<name>.stdout and .stderr."""
    return pqsu(args, logdir, name, split_stderr=True)


Proc = start_pqsu  # its name before the lab: tests written against it keep working


def processes_mentioning(marker: str) -> list[tuple[int, str]]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["pid"] == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if marker in cmd:
            found.append((p.info["pid"], cmd))
    return found


def kill_mentioning(marker: str) -> None:
    for pid, _ in processes_mentioning(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def logs_tail(folder: Path, n: int = 15) -> str:
    parts = []
    for log in sorted(folder.glob("*.log")) if folder.is_dir() else []:
        parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").strip().splitlines()[-n:]))
    return "\n".join(parts)
