"""An emulated aarch64 board on an x86-64 machine: a Debian arm64 root file system, run under qemu.

The root is built once from Debian's own packages (`mmdebstrap --arch=arm64`, the maintainer
scripts run through qemu-user's binfmt handler) and cached, by default in
~/.cache/pqsu/board-arm64 (PQSU_BOARD_CACHE moves it). Each check works on a copy of it
(`Board.clone`), so the cache stays a fresh board and every install starts from nothing.

A command runs in the board as

  unshare --mount [--net] sh -c '<mounts under root>; exec chroot [--userspec=U:U] <root> env -i QEMU_CPU=... cmd'

a private mount namespace (whatever it mounts is gone when the command ends: nothing is left
mounted on the host) with the board's own /proc, then chroot into the root, where the kernel
hands every aarch64 binary to qemu-aarch64-static (registered with the F flag, so the root needs
no copy of qemu). A user's command gets the HOME its passwd entry names, as systemd's User= does.

The board's CPU (`Cpu`): QEMU_CPU makes qemu emulate the profile's core (a Pi 4's Cortex-A72 has
no dot-product instructions; qemu's default "max" has them and SVE too, which would send
onnxruntime down kernels a Pi 4 never runs). The kernel's /sys and /proc/cpuinfo describe the
x86-64 host, and onnxruntime's cpuinfo library, which reads both on ARM Linux, crashes the
emulated process on them (SIGSEGV); so the board gets a /proc/cpuinfo of its own cores (bound
over the kernel's) and a read-only /sys holding only devices/system/cpu/{possible,present}.
A chroot shares the host's network, as a board on the same LAN would reach the broker;
`offline=True` adds a network namespace with nothing in it, so "installed offline" is proven,
not assumed. All of this needs root on the host (chroot, unshare, mount).

Emulated timings are qemu's, not a Raspberry Pi's: nothing here measures a board.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.process import Process, popen

DEBIAN_ARCH, MACHINE = "arm64", "aarch64"
SUITE = "bookworm"                              # Raspberry Pi OS 64-bit is bookworm: Python 3.11, glibc 2.36
MIRROR = "http://deb.debian.org/debian"
# What the bundle's install.sh needs beyond a minimal Debian: python3 and its venv module (with
# the bundled pip wheel). useradd (package passwd) is already in minbase.
PACKAGES = ("python3", "python3-venv")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
READY = ".pqsu-board-ready"                     # written last: a root without it is half-built
BOARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Cpu:
    """The board's processor as its programs see it: qemu's CPU model and the kernel's description."""
    qemu: str                                  # qemu-aarch64 -cpu model (QEMU_CPU)
    part: int                                  # MIDR part number (/proc/cpuinfo "CPU part")
    cores: int
    features: str                              # /proc/cpuinfo "Features", as the real board's kernel lists them
    model: str = ""

    def proc_cpuinfo(self) -> str:
        core = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {f}\nCPU implementer\t: 0x41\n"
                "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0x{p:03x}\nCPU revision\t: 3\n\n")
        text = "".join(core.format(i=i, f=self.features, p=self.part) for i in range(self.cores))
        return text + (f"Model\t\t: {self.model}\n" if self.model else "")


CPUS = {  # by board profile (tools/flash/boards.py)
    "rpi4": Cpu("cortex-a72", 0xd08, 4, "fp asimd evtstrm crc32 cpuid", "Raspberry Pi 4 Model B"),
    "rpi5": Cpu("cortex-a76", 0xd0b, 4, "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                "asimdrdm lrcpc dcpop asimddp", "Raspberry Pi 5 Model B"),
    "generic-aarch64": Cpu("cortex-a53", 0xd03, 4, "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
}


def _enter_script(cpu: Cpu | None) -> str:
    """Run by the host's sh in the new mount namespace: $1 the root, $2 the cpuinfo file, then the chroot command."""
    steps = ['mount -t proc proc "$r/proc"']
    if cpu is not None:
        d, last = '"$r/sys/devices/system/cpu"', cpu.cores - 1
        steps += ['mount --bind "$c" "$r/proc/cpuinfo"', 'mount -t tmpfs -o size=64k,mode=0755 board-sys "$r/sys"',
                  f"mkdir -p {d}", f"echo 0-{last} > {d}/possible", f"echo 0-{last} > {d}/present",
                  f"for i in $(seq 0 {last}); do mkdir {d}/cpu$i; done", 'mount -o remount,ro "$r/sys"']
    return 'r=$1; c=$2; shift 2; ' + " && ".join(steps) + ' && exec "$@"'


class BoardError(PqsuError):
    """The emulated board cannot be built or run on this machine."""


def default_cache() -> Path:
    base = os.environ.get("PQSU_BOARD_CACHE") or Path.home() / ".cache" / "pqsu"
    return Path(base).expanduser() / f"board-{DEBIAN_ARCH}"


def host_problems(*, build: bool = True) -> list[str]:
    """What this machine lacks to run the board (and to build its root), each with the fix; empty when ready."""
    problems = []
    if os.geteuid() != 0:
        problems.append("root is needed (chroot, unshare, mount): run as root")
    tools = [("qemu-aarch64-static", "qemu-user-static"), ("unshare", "util-linux"), ("chroot", "coreutils")]
    for tool, package in tools + ([("mmdebstrap", "mmdebstrap")] if build else []):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is missing: apt-get install {package}")
    if not problems:
        why = _binfmt_problem()
        if why:
            problems.append(why)
    return problems


def _binfmt_problem() -> str | None:
    """Registers qemu-aarch64 with the kernel when binfmt-support can; None once it is enabled."""
    entry = BINFMT / f"qemu-{MACHINE}"
    if not entry.exists():
        if not (BINFMT / "register").exists():
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True)
        if shutil.which("update-binfmts"):
            subprocess.run(["update-binfmts", "--enable", f"qemu-{MACHINE}"], capture_output=True)
    if not entry.exists():
        return (f"the kernel has no qemu-{MACHINE} binfmt handler: apt-get install qemu-user-static binfmt-support "
                f"(and, in a container, mount binfmt_misc on {BINFMT})")
    text = entry.read_text()
    if not text.startswith("enabled"):
        return f"the qemu-{MACHINE} binfmt handler is disabled: update-binfmts --enable qemu-{MACHINE}"
    flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags:")), "")
    if "F" not in flags:  # without F the interpreter path is looked up inside the chroot, where it is not
        return (f"the qemu-{MACHINE} binfmt handler lacks the F (fix binary) flag: use Debian's qemu-user-static, "
                "whose binfmt-support entry sets it")
    return None


def check_host(*, build: bool = True) -> None:
    problems = host_problems(build=build)
    if problems:
        raise BoardError("cannot emulate an aarch64 board here: " + "; ".join(problems))


def build_root(cache: Path | None = None, *, say=print, timeout_s: float = 3600) -> Path:
    """The cached arm64 root, built first when missing (into <cache>.partial, renamed when done)."""
    cache = cache or default_cache()
    if (cache / READY).is_file():
        say(f"board root: reusing {cache} ({(cache / READY).read_text().strip()})")
        return cache
    check_host()
    partial = cache.with_name(cache.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["mmdebstrap", f"--arch={DEBIAN_ARCH}", "--variant=minbase", f"--include={','.join(PACKAGES)}",
           SUITE, str(partial), MIRROR]
    say(f"board root: building {cache} from Debian {SUITE} {DEBIAN_ARCH} packages: {' '.join(cmd)}")
    start = time.monotonic()
    # its own process group (apt, dpkg and qemu under it), killed whole on a timeout
    proc = popen(["nice", "-n", "10", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    last = "(no output)"
    try:
        for line in proc.stdout:                   # mmdebstrap's I:/W:/E: lines: where a long build is
            last = line.rstrip() or last
            if last[:2] in ("I:", "W:", "E:"):
                say(f"  {last}")
        code = proc.wait()
    finally:
        timer.cancel()
    if code != 0:
        shutil.rmtree(partial, ignore_errors=True)
        if code == -signal.SIGKILL:
            raise BoardError(f"mmdebstrap did not finish within {timeout_s:.0f} s")
        raise BoardError(f"mmdebstrap failed (exit {code}): {last}")
    board = Board(partial)
    python = board.run(["python3", "-c", "import platform, sys, venv, ensurepip; "
                        "print(platform.machine(), '%d.%d.%d' % sys.version_info[:3])"], timeout_s=300)
    if python.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise BoardError(f"the new board root cannot run python3: {python.stderr.strip()[-300:]}")
    (partial / READY).write_text(f"Debian {SUITE} {DEBIAN_ARCH}, {' '.join(PACKAGES)}; python3 {python.stdout.split()[1]}; "
                                 f"built {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    partial.rename(cache)
    say(f"board root: built in {time.monotonic() - start:.0f} s (wall time, maintainer scripts under qemu)")
    return cache


class Board:
    """A board root on this machine, and how to run a command inside it."""

    def __init__(self, root: Path, cpu: Cpu | None = None):
        self.root, self.cpu = Path(root), cpu
        self.cpuinfo = self.root.with_name(self.root.name + ".cpuinfo")  # outside the root: the board cannot change it
        if cpu is not None:
            self.cpuinfo.write_text(cpu.proc_cpuinfo())

    @classmethod
    def clone(cls, base: Path, dest: Path, cpu: Cpu | None = None) -> "Board":
        """A fresh copy of `base` at `dest` (owners, modes, device nodes and links kept)."""
        if dest.exists():
            raise BoardError(f"{dest} exists: a board is cloned into a new folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(dest)], capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(dest, ignore_errors=True)
            raise BoardError(f"cannot copy the board root {base} to {dest}: {proc.stderr.strip()}")
        (dest / READY).unlink(missing_ok=True)          # a clone is a board in use, never a cache
        return cls(dest, cpu)

    def argv(self, cmd: list[str], *, user: str | None = None, offline: bool = False,
             env: dict[str, str] | None = None) -> list[str]:
        """The host command line that runs `cmd` on the board (as `user`; with no network if offline)."""
        base = {"PATH": BOARD_PATH, "HOME": self.home(user), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
        if user is not None:
            base.update(USER=user, LOGNAME=user)
        if self.cpu is not None:
            base["QEMU_CPU"] = self.cpu.qemu     # read by qemu at every exec; env passes it to every child
        base.update(env or {})
        out = ["unshare", "--mount", "--propagation", "private", *(["--net"] if offline else []),
               "sh", "-c", _enter_script(self.cpu), "board", str(self.root), str(self.cpuinfo), "chroot"]
        if user is not None:
            out.append(f"--userspec={user}:{user}")
        out += [str(self.root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in base.items()), *cmd]
        return out

    def home(self, user: str | None) -> str:
        """The user's home from the board's /etc/passwd (root's for None; / when there is no entry yet)."""
        name = user or "root"
        try:
            for line in (self.root / "etc/passwd").read_text().splitlines():
                fields = line.split(":")
                if len(fields) >= 6 and fields[0] == name:
                    return fields[5] or "/"
        except OSError:
            pass
        return "/root" if user is None else "/"

    def run(self, cmd: list[str], *, timeout_s: float, user: str | None = None, offline: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.argv(cmd, user=user, offline=offline, env=env), capture_output=True,
                                  text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BoardError(f"{' '.join(cmd)} on the board did not finish within {timeout_s:.0f} s") from None

    def spawn(self, cmd: list[str], log: Path, *, user: str | None = None, env: dict[str, str] | None = None,
              name: str | None = None) -> Process:
        """A long-running command on the board (the agent), stopped like any other `Process`."""
        return Process(self.argv(cmd, user=user, env=env), log, name=name)

    def path(self, board_path: str) -> Path:
        """A board path (/var/lib/pqsu/state) as a host path under the root."""
        return self.root / board_path.lstrip("/")
