"""The one wrapper around a child process: `pqsu run`'s cloud and agents, `pqsu cloud --workers`'
aggregators, the lab's scenarios, the tests. It lives beside the wire code because the cloud uses it
too, and imports run tools -> cloud/edge -> export -> protocol.

Every child gets its own process group, so one signal reaches whatever it started itself, and on
Linux it is SIGKILLed by the kernel when its parent dies (PR_SET_PDEATHSIG): a parent that is
SIGKILLed, or crashes, leaves nothing behind. Stopping is SIGTERM, a grace period, then SIGKILL of
the whole group; several processes are signalled together and share one deadline, so stopping ten
agents costs one grace period, not ten.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

CLI = [sys.executable, "-m", "pqsu.tools.cli"]
_PR_SET_PDEATHSIG = 1
try:  # loaded here, not in the forked child, where as little as possible should run
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def _die_with(parent: int):
    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect: nobody would ever signal us
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


def popen(cmd: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen in a new process group that dies with this process.

    The death signal follows the thread that forks, not the process: a child started from a worker
    thread would die when that thread ends, so only children started on the main thread get it."""
    if _prctl is not None and threading.current_thread() is threading.main_thread():
        kwargs.setdefault("preexec_fn", _die_with(os.getpid()))
    return subprocess.Popen(cmd, start_new_session=True, stdin=kwargs.pop("stdin", subprocess.DEVNULL), **kwargs)


def pqsu_env(threads: int | None = 1) -> dict[str, str]:
    """The environment of a `pqsu` child: `threads` OpenMP/MKL threads (None: as inherited)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


class Process:
    """A child with its output in `log` (stdout and stderr together, unless `stderr_log` is given)."""

    def __init__(self, cmd: list[str], log: Path, *, name: str | None = None, stderr_log: Path | None = None,
                 env: dict | None = None, append: bool = False):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.cmd, self.name = cmd, name or log.stem
        self.log_path, self.stderr_path = log, stderr_log
        mode = "ab" if append else "wb"
        with open(log, mode) as out, open(stderr_log, mode) if stderr_log else contextlib.nullcontext() as err:
            self.popen = popen(cmd, stdout=out, stderr=err if stderr_log else subprocess.STDOUT, env=env)
        self.pid = self.popen.pid

    @property
    def stdout(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path and self.stderr_path.exists() else ""

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None if it still runs after timeout_s."""
        try:
            return self.popen.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            return None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would: no clean disconnect, no last words."""
        self.signal_group(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, grace_s: float = 10.0) -> int | None:
        reap([self], grace_s, signal_first=True)
        return self.poll()

    def tail(self, n: int = 15) -> str:
        lines = self.output.strip().splitlines()[-n:]
        return f"--- {self.name} (exit {self.poll()})\n" + "\n".join(lines)


def reap(procs: Iterable[Process], grace_s: float, *, signal_first: bool = False, term_grace_s: float = 5.0) -> None:
    """Stop every process: let them end by themselves within grace_s (SIGTERM first with signal_first),
    then SIGTERM those still running, then SIGKILL. Each step signals all of them before waiting on any,
    under one deadline. Whatever a process left in its group is killed too: none is left behind."""
    procs = list(procs)
    steps = [(signal.SIGTERM if signal_first else None, grace_s)]
    if not signal_first:
        steps.append((signal.SIGTERM, term_grace_s))
    steps.append((signal.SIGKILL, 10.0))
    for sig, grace in steps:
        running = [p for p in procs if p.poll() is None]
        if not running:
            break
        if sig is not None:
            for p in running:
                p.signal_group(sig)
        deadline = time.monotonic() + grace
        for p in running:
            p.wait(deadline - time.monotonic())
    for p in procs:
        p.signal_group(signal.SIGKILL)  # the leader is gone; a grandchild may still hold the group


def wait_all(procs: Iterable[Process], timeout_s: float) -> dict[str, int | None]:
    """Exit codes by name once each process ended by itself (None: still running after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    return {p.name: p.wait(deadline - time.monotonic()) for p in procs}

