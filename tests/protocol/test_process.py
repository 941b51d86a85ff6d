"""The lab's process wrapper: a stop reaches the whole process group, several processes are stopped
under one shared deadline, and a child dies with its parent even when the parent is SIGKILLed.

Every process here is a tiny Python script started by the test; each is stopped by its pid."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from pqsu.protocol.process import Process, reap

# Ignores SIGTERM (so only SIGKILL ends it), optionally starts a grandchild in its group, prints pids.
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if len(sys.argv) > 1:
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    print("grandchild", child.pid, flush=True)
print("ready", flush=True)
time.sleep(60)
"""
# Starts a child through the lab (as `pqsu run` starts its cloud and agents), prints its pid, waits.
PARENT = """
import sys, time
from pathlib import Path
from pqsu.protocol.process import Process
child = Process([sys.executable, "-c", "import time; time.sleep(60)"], Path(sys.argv[1]))
print("child", child.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie has ended; its parent has not reaped it yet
    except FileNotFoundError:
        return False


def wait_line(proc: Process, word: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in proc.output.splitlines():
            if line.startswith(word):
                return line
        assert proc.running, proc.tail()
        time.sleep(0.05)
    raise AssertionError(f"no {word!r} line\n{proc.tail()}")


def test_stop_kills_a_process_that_ignores_sigterm_and_its_grandchild(tmp_path):
    proc = Process([sys.executable, "-c", STUBBORN, "spawn"], tmp_path / "stubborn.log")
    try:
        grandchild = int(wait_line(proc, "grandchild").split()[1])
        wait_line(proc, "ready")
        t0 = time.monotonic()
        code = proc.stop(grace_s=0.5)
        assert code == -signal.SIGKILL and time.monotonic() - t0 < 5
        deadline = time.monotonic() + 5
        while alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(grandchild), "the grandchild outlived its process group's stop"
        assert proc.tail().startswith(f"--- stubborn (exit {-signal.SIGKILL})\n") and "ready" in proc.tail()
    finally:
        proc.signal_group(signal.SIGKILL)


def test_several_processes_share_one_grace_period(tmp_path):
    procs = [Process([sys.executable, "-c", STUBBORN], tmp_path / f"p{i}.log") for i in range(4)]
    try:
        for p in procs:
            wait_line(p, "ready")
        t0 = time.monotonic()
        reap(procs, grace_s=1.0, signal_first=True)
        took = time.monotonic() - t0
        assert all(p.poll() == -signal.SIGKILL for p in procs)
        assert took < 3.0, f"4 processes took {took:.1f}s to stop with a 1 s grace: one at a time?"
    finally:
        for p in procs:
            p.signal_group(signal.SIGKILL)


def test_processes_that_end_by_themselves_are_not_signalled(tmp_path):
    procs = [Process([sys.executable, "-c", f"import sys; sys.exit({i})"], tmp_path / f"q{i}.log") for i in range(3)]
    reap(procs, grace_s=30)
    assert [p.poll() for p in procs] == [0, 1, 2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_parent_even_when_the_parent_is_sigkilled(tmp_path):
    parent = Process([sys.executable, "-c", PARENT, str(tmp_path / "child.log")], tmp_path / "parent.log")
    child = None
    try:
        child = int(wait_line(parent, "child").split()[1])
        assert alive(child)
        os.kill(parent.pid, signal.SIGKILL)  # the parent alone: the child is in a process group of its own
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the child outlived its SIGKILLed parent"
    finally:
        parent.signal_group(signal.SIGKILL)
        if child and alive(child):
            os.killpg(child, signal.SIGKILL)
