"""Shared helpers for tests that run `pqsu` commands as processes (fleet and fault tests)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

CLI = [sys.executable, "-m", "pqsu.tools.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def flags(**options) -> list[str]:
    out = []
    for k, v in options.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


class Proc:
    """A `pqsu` command in its own process group; stdout and stderr go to files."""

    def __init__(self, args: list[str], logdir: Path, name: str):
        logdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logdir / f"{name}.stdout", logdir / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(CLI + args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=ENV,
                                          start_new_session=True)
        self.pid, self.name = self.popen.pid, name

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace_s: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            if self.wait(grace_s) is None:
                self.signal_group(signal.SIGKILL)
                self.popen.wait(timeout=10)
        self.signal_group(signal.SIGKILL)

    def tail(self, n: int = 20) -> str:
        lines = (self.stdout + self.stderr).strip().splitlines()[-n:]
        return f"--- {self.name} (exit {self.poll()})\n" + "\n".join(lines)


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
