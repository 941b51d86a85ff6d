"""Putting a bundle in place on the target: a folder (the board's root file system) or a running
board over ssh. The bundle is staged beside its place and renamed into it, so a failed flash
leaves the target as it was."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pqsu.tools.flash.bundle import build_bundle
from pqsu.tools.flash.request import BUNDLE_DIR, OPT, STATE_MODEL_FILE, FlashError, FlashRequest, SshTarget

log = logging.getLogger(__name__)


def flash(req: FlashRequest) -> str:
    if isinstance(req.target, SshTarget):
        return flash_ssh(req)
    return flash_local(req)


def dry_run(req: FlashRequest) -> str:
    if isinstance(req.target, Path):
        p = req.target / OPT.lstrip("/")
        while not p.exists():
            p = p.parent
        if not os.access(p, os.W_OK):
            raise FlashError(f"target {req.target} is not writable: permission denied ({p})")
        shown = str(req.target / BUNDLE_DIR.lstrip("/"))
    else:
        shown = f"{req.target.destination}:{req.target.root.rstrip('/')}{BUNDLE_DIR}"
    with tempfile.TemporaryDirectory(prefix="pqsu-flash-dry-") as tmp:
        staged = build_bundle(req, Path(tmp) / "bundle", dry_run=True)
    lines = [f"dry run: nothing written. `pqsu flash` would write {len(staged.files)} entries to {shown}",
             "(built in a staging folder beside it, then renamed into place; device state is not touched)",
             f"{'mode':<6}{'size':>12}  path"]
    for rel, mode, size in staged.files:
        shown_size = "-" if rel.endswith("/") or rel == "" else ("?" if size < 0 else str(size))
        lines.append(f"{mode:04o}  {shown_size:>12}  {shown}/{rel}")
    if isinstance(req.target, SshTarget) and req.install:
        lines.append(f"then on {req.target.destination}: sh {BUNDLE_DIR}/install.sh")
    return "\n".join(lines)


# -- a folder ---------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _place(staged: Path, bundle: Path) -> None:
    """Move the staged bundle to `bundle`; the old one (if any) ends up at `staged`'s path."""
    if not (bundle.exists() or bundle.is_symlink()):
        os.rename(staged, bundle)
        return
    if _exchange(staged, bundle):
        return
    old = staged.with_name(staged.name + ".old")
    os.rename(bundle, old)
    try:
        os.rename(staged, bundle)
    except BaseException:
        os.rename(old, bundle)
        raise
    os.rename(old, staged)


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (to remove them again on failure)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    created = []
    try:
        for d in reversed(missing):
            d.mkdir(mode=0o755)
            created.append(d)
    except OSError:
        _remove_created(created)
        raise
    return created


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            pass


def _lock(folder: Path) -> int:
    """An exclusive lock on the bundle's parent folder: one flash at a time per target."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FlashError(f"another pqsu flash is writing to {folder}; try again when it is done") from None
    return fd


def _fsync_tree(folder: Path) -> None:
    """Make the staged bundle durable before it is renamed into place (an SD card may be pulled
    right after): every file and folder, not the whole file system, which others may be filling."""
    for path in [*sorted(folder.rglob("*")), folder]:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flash_local(req: FlashRequest) -> str:
    root: Path = req.target  # type: ignore[assignment]
    parent = root / OPT.lstrip("/")
    bundle = root / BUNDLE_DIR.lstrip("/")
    try:
        created = _make_parents(parent)
    except OSError as exc:
        raise FlashError(f"target {root} is not writable: {exc.strerror} ({exc.filename})") from None
    lock = _lock(parent)
    try:
        for stale in parent.glob(".staging-*"):            # left by a flash that was killed
            shutil.rmtree(stale, ignore_errors=True)
        try:
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
        except OSError as exc:
            _remove_created(created)
            raise FlashError(f"target {root} is not writable: {exc.strerror} ({exc.filename})") from None
        try:
            staged = build_bundle(req, staging / "bundle")
            _fsync_tree(staged.folder)
            _place(staged.folder, bundle)
            _fsync_dir(parent)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_created(created)
            if isinstance(exc, OSError):
                raise FlashError(f"writing the bundle into {root} failed: {exc.strerror or exc} "
                                 f"({exc.filename}); the target is unchanged") from None
            raise
        shutil.rmtree(staging, ignore_errors=True)        # the previous bundle, if any
    finally:
        os.close(lock)
    size = sum(s for _, _, s in staged.files)
    board_hint = "sudo sh /opt/pqsu/bundle/install.sh" + ("" if req.wheelhouse else "   (needs the package index)")
    return (f"flashed {req.board.name} bundle for {req.device_id} into {bundle} "
            f"({len([f for f in staged.files if not f[0].endswith('/')])} files, {size / 1e6:.1f} MB)\n"
            f"{model_line(req)}on the board: {board_hint}")


def model_line(req: FlashRequest) -> str:
    """What the output says of a flashed model ("" without one)."""
    if req.model is None:
        return ""
    return (f"with model {req.model.model_id} ({len(req.model.file):,} bytes, from {req.model.source}): install.sh "
            f"puts it at {req.state_dir.rstrip('/')}/{STATE_MODEL_FILE}, where the agent serves it from its start\n")


# -- ssh --------------------------------------------------------------------------------------
def _ssh_options(req: FlashRequest) -> list[str]:
    opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(req.ssh_timeout))}",
            "-o", "StrictHostKeyChecking=accept-new", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if req.ssh_identity:
        opts += ["-i", req.ssh_identity]
    return opts


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise FlashError(f"{name} is not installed (apt-get install openssh-client)")
    return path


def _ssh(req: FlashRequest, command: str, *, stdin: bytes | None = None, timeout: float | None = None,
         what: str, stream: bool = False) -> str:
    t: SshTarget = req.target  # type: ignore[assignment]
    cmd = [_tool("ssh"), *_ssh_options(req), "-p", str(t.port), t.destination, command]
    try:
        proc = subprocess.run(cmd, input=stdin if stdin is not None else b"", timeout=timeout,
                              stdout=None if stream else subprocess.PIPE, stderr=subprocess.PIPE)
    except subprocess.TimeoutExpired:
        raise FlashError(f"ssh {t.destination} (port {t.port}): {what} timed out after {timeout:.0f} s") from None
    err = proc.stderr.decode(errors="replace")
    if stream and err:
        sys.stderr.write(err)
    if proc.returncode == 255:
        raise FlashError(f"ssh to {t.destination} (port {t.port}) failed: {_last_line(err)}")
    if proc.returncode != 0:
        raise FlashError(f"{what} on {t.destination} failed (exit {proc.returncode}): {_last_line(err)}")
    return "" if stream else proc.stdout.decode(errors="replace")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


PLACE_SH = r"""set -eu
ROOT=@ROOT@
UP=@UP@
PARENT="${ROOT%/}/opt/pqsu"
trap 'rm -rf "$UP"' EXIT
mkdir -p "$PARENT"
STAGE=$(mktemp -d "$PARENT/.staging-XXXXXX")
trap 'rm -rf "$UP" "$STAGE"' EXIT
cp -Rp "$UP" "$STAGE/bundle"
sync
if [ -e "$PARENT/bundle" ]; then mv "$PARENT/bundle" "$STAGE/old"; fi
if ! mv "$STAGE/bundle" "$PARENT/bundle"; then
    if [ -e "$STAGE/old" ]; then mv "$STAGE/old" "$PARENT/bundle"; fi
    exit 1
fi
echo placed
"""


def flash_ssh(req: FlashRequest) -> str:
    t: SshTarget = req.target  # type: ignore[assignment]
    _tool("scp")
    probe = _ssh(req, 'printf "%s\\n%s\\n" "$HOME" "$(id -u)"', timeout=req.ssh_timeout + 20,
                 what="checking the login").split("\n")
    if len(probe) < 2 or not probe[0].startswith("/"):
        raise FlashError(f"ssh to {t.destination}: unexpected answer to a login check: {probe!r}")
    home, uid = probe[0], probe[1].strip()
    sudo = "" if uid == "0" else "sudo -n "
    with tempfile.TemporaryDirectory(prefix="pqsu-flash-") as tmp:
        staged = build_bundle(req, Path(tmp) / "bundle")
        upload = f"{home.rstrip('/')}/.pqsu-upload-{req.flash_id}"
        host = f"[{t.host}]" if ":" in t.host else t.host
        dest = f"{t.user + '@' if t.user else ''}{host}:{upload}"
        log.info("copying the bundle to %s", dest)
        cmd = [_tool("scp"), *_ssh_options(req), "-P", str(t.port), "-r", "-p", "-q", str(staged.folder), dest]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            _ssh_cleanup(req, upload)
            raise FlashError(f"scp to {t.destination} (port {t.port}) failed: "
                             f"{_last_line(proc.stderr.decode(errors='replace'))}")
    script = PLACE_SH.replace("@ROOT@", shlex.quote(t.root)).replace("@UP@", shlex.quote(upload))
    try:
        _ssh(req, f"{sudo}sh -s", stdin=script.encode(), timeout=600, what="putting the bundle in place")
    except FlashError as exc:
        _ssh_cleanup(req, upload)
        hint = " (log in as root or allow passwordless sudo)" if sudo and "sudo" in str(exc) else ""
        raise FlashError(f"{exc}{hint}") from None
    bundle = f"{t.root.rstrip('/')}{BUNDLE_DIR}"
    if not req.install:
        return (f"{model_line(req)}flashed {req.board.name} bundle for {req.device_id} into {t.destination}:{bundle} "
                "(not installed)")
    env = "" if t.root.rstrip("/") == "" else f"PQSU_ROOT={shlex.quote(t.root)} "
    log.info("running install.sh on %s", t.destination)
    _ssh(req, f"{sudo}env {env}sh {shlex.quote(bundle + '/install.sh')}", timeout=3600,
         what="install.sh", stream=True)
    return f"{model_line(req)}flashed and installed {req.board.name} bundle for {req.device_id} on {t.destination}:{bundle}"


def _ssh_cleanup(req: FlashRequest, upload: str) -> None:
    try:
        _ssh(req, f"rm -rf {shlex.quote(upload)}", timeout=req.ssh_timeout + 20, what="cleaning up")
    except FlashError as exc:
        log.warning("could not remove %s on the board: %s", upload, exc)
