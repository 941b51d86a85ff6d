"""Flash an edge agent onto a board: a self-contained bundle, staged, then moved into place.

  pqsu flash --list-boards
  pqsu flash --board rpi5 --device-id pi-kitchen-01 --broker mqtts://broker.example:8883 \\
             --tls-ca ca.crt --tls-cert pi.crt --tls-key pi.key --target /media/$USER/rootfs
  pqsu flash --board rpi4 --device-id pi-shed --broker mqtt://10.0.0.2 --wheelhouse \\
             --target ssh://pi@pi-shed.local
  pqsu flash --board jetson-orin --device-id orin-01 --broker mqtt://10.0.0.2 --target /tmp/x --dry-run

The bundle lands in <target>/opt/pqsu/bundle/ (the target is the board's root file system: a
mounted SD card, any folder, or ssh://[user@]host[:port][/root] on a running board):

  bundle.json              manifest: board, device, versions, every file with mode, size, sha256
  install.sh               idempotent installer, run on the board (as root for the systemd unit)
  requirements.txt         the board profile's pinned requirements
  pqsu-agent.service       systemd unit (Restart=always, the profile's MemoryMax/CPUQuota)
  wheels/                  the fl-pqsu wheel (+ with --wheelhouse every pinned wheel: offline install)
  etc/agent.toml           settings for `pqsu edge run --config` (paths as installed on the board)
  etc/credentials/         TLS files, password, device key: 0600 in a 0700 folder

install.sh makes /opt/pqsu/venv, links /etc/pqsu -> /opt/pqsu/bundle/etc and, as root on a
systemd board, installs and restarts pqsu-agent.service. Device state (error-feedback residual,
round, outbox) lives in --state-dir (/var/lib/pqsu/state), outside the bundle: re-flashing
replaces the bundle and its config, never the state. Nothing is half-written: the bundle is
built in a staging folder next to its place and renamed into it; on any error the target is
left as it was. docs/boards.md has the details.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from configparser import ConfigParser
from dataclasses import dataclass, field
from pathlib import Path

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.mqtt import BrokerURL
from pqsu.protocol.topics import check_device, check_fleet
from pqsu.tools.boards import BOARDS, BoardProfile, format_boards, get_board

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

# Paths on the board (absolute, as the agent sees them once installed).
OPT = "/opt/pqsu"
BUNDLE_DIR = f"{OPT}/bundle"
VENV_DIR = f"{OPT}/venv"
ETC_LINK = "/etc/pqsu"                        # -> ../opt/pqsu/bundle/etc (made by install.sh)
CONFIG_PATH = f"{ETC_LINK}/agent.toml"
CREDENTIALS_DIR = f"{ETC_LINK}/credentials"
STATE_DIR = "/var/lib/pqsu/state"
DATA_DIR = "/var/lib/pqsu/data"
UNIT_NAME = "pqsu-agent.service"
PROJECT_NAME = "fl-pqsu"

# Settings with their own flash flag; --set may add any other agent setting or override a profile
# value (providers, inference_threads, torch_threads, stay).
MANAGED_KEYS = {"broker", "device_id", "fleet", "data", "state_dir", "key_file", "tls_ca", "tls_cert", "tls_key",
                "username", "password_file", "http_port", "inference_only", "board"}
_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")


class FlashError(PqsuError):
    """The bundle could not be built or put in place; the target is left as it was."""


# -- command line -----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list-boards", action="store_true", help="print the board profiles and exit")
    g = p.add_argument_group("device")
    g.add_argument("--board", help=f"board profile: {', '.join(BOARDS)}")
    g.add_argument("--device-id", help="the device's id (letters, digits, . _ -): its MQTT client id")
    g.add_argument("--broker", help="broker URL, mqtt://host[:port] or mqtts://host[:port] (no password in it)")
    g.add_argument("--fleet", default="default", help="fleet name (default: %(default)s)")
    g.add_argument("--data", default=DATA_DIR, help=f"training data path on the board (default: {DATA_DIR})")
    g.add_argument("--state-dir", default=STATE_DIR,
                   help=f"device state folder on the board, kept across re-flashes (default: {STATE_DIR})")
    g.add_argument("--inference-only", action="store_true", help="never train: no torch/onnx in the bundle")
    g.add_argument("--http-port", type=int, help="port of the agent's local inference API on 127.0.0.1")
    g.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="another agent setting for agent.toml (e.g. upload=always); repeatable")
    c = p.add_argument_group("credentials (copied into the bundle with mode 0600)")
    c.add_argument("--tls-ca", metavar="FILE", help="CA certificate of the broker (mqtts://)")
    c.add_argument("--tls-cert", metavar="FILE", help="this device's client certificate")
    c.add_argument("--tls-key", metavar="FILE", help="this device's client private key")
    c.add_argument("--username", help="MQTT user name")
    c.add_argument("--password-file", metavar="FILE", help="file holding the MQTT password")
    c.add_argument("--key-file", metavar="FILE", help="file with the device's HMAC key (hex) for signed updates")
    b = p.add_argument_group("bundle")
    b.add_argument("--target", help="the board's root: a folder (mounted SD card...) or ssh://[user@]host[:port][/root]")
    b.add_argument("--wheelhouse", action="store_true",
                   help="include every pinned wheel for the board's platform: install.sh then works offline")
    b.add_argument("--python", metavar="X.Y", help="the board's Python version (default: the profile's)")
    b.add_argument("--torch-index", metavar="URL",
                   help="index torch comes from (default: the profile's; 'none': only pip's configured sources)")
    b.add_argument("--project-wheel", metavar="FILE", help="use this fl-pqsu wheel instead of building one")
    b.add_argument("--user", default="pqsu", help="system user the agent runs as (default: %(default)s)")
    b.add_argument("--dry-run", action="store_true", help="list every file that would be written; write nothing")
    s = p.add_argument_group("ssh targets")
    s.add_argument("--ssh-timeout", type=float, default=10.0, help="ssh connect timeout in seconds (default: 10)")
    s.add_argument("--ssh-identity", metavar="FILE", help="ssh private key to log in with")
    s.add_argument("--no-install", action="store_true", help="only put the bundle in place; do not run install.sh")


def run(args: argparse.Namespace) -> int:
    if args.list_boards:
        print(format_boards())
        return 0
    request = FlashRequest.from_args(args)
    if request.dry_run:
        print(dry_run(request))
        return 0
    result = flash(request)
    print(result)
    return 0


# -- what to build ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SshTarget:
    user: str | None
    host: str
    port: int
    root: str                                  # the board's root on the remote machine, normally "/"

    @classmethod
    def parse(cls, url: str) -> "SshTarget":
        try:
            u = urllib.parse.urlsplit(url)
            port = u.port or 22
        except ValueError as exc:
            raise FlashError(f"invalid ssh target {url!r}: {exc}") from None
        if not u.hostname or u.query or u.fragment or u.password:
            raise FlashError(f"invalid ssh target {url!r}: expected ssh://[user@]host[:port][/root]")
        root = urllib.parse.unquote(u.path) or "/"
        return cls(u.username, u.hostname, port, root)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user + '@' if self.user else ''}{host}:{self.port}{self.root}"


@dataclass
class FlashRequest:
    board: BoardProfile
    device_id: str
    broker: str
    fleet: str
    data: str
    state_dir: str
    inference_only: bool
    http_port: int | None
    extra_settings: dict
    credentials: dict[str, tuple[str, Path]]   # setting key -> (file name in credentials/, source file)
    username: str | None
    target: Path | SshTarget
    wheelhouse: bool
    python: str
    torch_index: str | None
    project_wheel: Path | None
    user: str
    dry_run: bool
    ssh_timeout: float = 10.0
    ssh_identity: str | None = None
    install: bool = True
    flash_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FlashRequest":
        """Every check that needs no building: a bad request fails here, before anything is written."""
        if not args.board:
            raise FlashError(f"--board is required; choose one of: {', '.join(BOARDS)} (see --list-boards)")
        board = get_board(args.board)
        for flag in ("device_id", "broker", "target"):
            if not getattr(args, flag):
                raise FlashError(f"--{flag.replace('_', '-')} is required")
        device_id, fleet = check_device(args.device_id), check_fleet(args.fleet)
        url = BrokerURL.parse(args.broker)
        if url.password:
            raise FlashError("the broker URL holds a password: pass it with --password-file, it is then kept 0600")
        tls = [args.tls_ca, args.tls_cert, args.tls_key]
        if any(tls) and not url.tls:
            raise FlashError(f"TLS files given for a plain broker URL {url}: use mqtts://")
        if bool(args.tls_cert) != bool(args.tls_key):
            raise FlashError("--tls-cert and --tls-key go together")
        if args.password_file and not (args.username or url.username):
            raise FlashError("--password-file needs --username (or user@ in the broker URL)")
        credentials: dict[str, tuple[str, Path]] = {}
        for key, flag, name in (("tls_ca", "--tls-ca", "ca.crt"), ("tls_cert", "--tls-cert", "client.crt"),
                                ("tls_key", "--tls-key", "client.key"), ("password_file", "--password-file", "password"),
                                ("key_file", "--key-file", "device.key")):
            value = getattr(args, key)
            if value:
                credentials[key] = (name, _readable(value, flag))
        if "key_file" in credentials:
            try:
                bytes.fromhex(credentials["key_file"][1].read_text().strip())
            except ValueError:
                raise FlashError(f"--key-file {args.key_file} must hold the device's HMAC key in hex") from None
        for path, flag in ((args.data, "--data"), (args.state_dir, "--state-dir")):
            if not path.startswith("/"):
                raise FlashError(f"{flag} {path!r} must be an absolute path on the board")
            if any(c in path for c in "'\"$`\\\n"):
                raise FlashError(f"{flag} {path!r}: quotes, $, `, \\ and newlines are not allowed")
        if args.http_port is not None and not 0 < args.http_port < 65536:
            raise FlashError(f"--http-port {args.http_port} is not a TCP port")
        python = args.python or board.python
        if not re.fullmatch(r"3\.\d{1,2}", python) or int(python.split(".")[1]) < 10:
            raise FlashError(f"--python {python!r}: give X.Y, 3.10 or newer")
        if args.ssh_timeout <= 0:
            raise FlashError("--ssh-timeout must be positive")
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", args.user):
            raise FlashError(f"--user {args.user!r} is not a valid system user name")
        torch_index = board.torch_index
        if args.torch_index is not None:
            torch_index = None if args.torch_index.lower() in ("", "none") else args.torch_index
        project_wheel = _readable(args.project_wheel, "--project-wheel") if args.project_wheel else None
        if project_wheel and not project_wheel.name.endswith(".whl"):
            raise FlashError(f"--project-wheel {project_wheel} is not a wheel (.whl)")
        target: Path | SshTarget
        if args.target.startswith("ssh://"):
            target = SshTarget.parse(args.target)
        elif "://" in args.target:
            raise FlashError(f"--target {args.target!r}: a folder or ssh://[user@]host[:port][/root]")
        else:
            target = Path(args.target).absolute()
            if not target.is_dir():
                raise FlashError(f"target {target} is not a folder (mount the board's root there, or create it)")
        return cls(board=board, device_id=device_id, broker=args.broker, fleet=fleet, data=args.data,
                   state_dir=args.state_dir.rstrip("/") or "/", inference_only=bool(args.inference_only),
                   http_port=args.http_port, extra_settings=_parse_settings(args.settings), credentials=credentials,
                   username=args.username, target=target, wheelhouse=bool(args.wheelhouse), python=python,
                   torch_index=torch_index, project_wheel=project_wheel, user=args.user, dry_run=bool(args.dry_run),
                   ssh_timeout=args.ssh_timeout, ssh_identity=args.ssh_identity, install=not args.no_install)

    @property
    def trains(self) -> bool:
        return self.board.trains and not self.inference_only

    def requirements(self) -> list[str]:
        return self.board.requirement_lines(inference_only=self.inference_only)

    def nodeps(self) -> list[str]:
        return self.board.nodeps_lines(inference_only=self.inference_only)

    @property
    def uses_torch_index(self) -> bool:
        return bool(self.torch_index) and any(r.startswith("torch==") for r in self.requirements())


def _readable(path: str, flag: str) -> Path:
    p = Path(path).expanduser()
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise FlashError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    if not p.is_file():
        raise FlashError(f"{flag} {path}: not a file")
    return p


def _parse_settings(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not _KEY.fullmatch(key):
            raise FlashError(f"--set {item!r}: expected KEY=VALUE with a lower-case key")
        if key in MANAGED_KEYS:
            raise FlashError(f"--set {key}: use the flag --{key.replace('_', '-')} (or the board profile) instead")
        try:
            out[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw.strip()                 # a bare word is a string
        if isinstance(out[key], (dict, dt.date, dt.time, dt.datetime)):
            raise FlashError(f"--set {key}: give a string, number, boolean or list")
    return out


# -- file contents ----------------------------------------------------------------------------
def agent_settings(req: FlashRequest) -> dict:
    """The agent's settings (flat, keys as `pqsu edge run` flags) plus the profile's [board] hints."""
    b = req.board
    s: dict = {"broker": req.broker, "device_id": req.device_id, "fleet": req.fleet, "data": req.data,
               "state_dir": req.state_dir, "stay": True, "providers": list(b.providers),
               "inference_threads": b.inference_threads, "torch_threads": b.torch_threads}
    if not req.trains:
        s["inference_only"] = True
    for key, (name, _) in req.credentials.items():
        s[key] = f"{CREDENTIALS_DIR}/{name}"
    if req.username:
        s["username"] = req.username
    if req.http_port is not None:
        s["http_port"] = req.http_port
    s.update(req.extra_settings)
    s["board"] = {"name": b.name, "max_epochs": b.max_epochs, "max_batch_size": b.max_batch_size,
                  "time_budget_s": b.time_budget_s}
    return s


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)                     # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(settings: dict, header: str = "") -> str:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    tables = {k: v for k, v in settings.items() if isinstance(v, dict)}
    lines += [f"{k} = {_toml_value(v)}" for k, v in settings.items() if k not in tables]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def agent_toml(req: FlashRequest, created: str) -> str:
    header = (f"fl-pqsu edge agent settings for {req.device_id} (board {req.board.name}), written by `pqsu flash` "
              f"on {created}.\nRead by: {VENV_DIR}/bin/pqsu edge run --config {CONFIG_PATH} (flags win).\n"
              "Re-flashing replaces this file; the device state in state_dir is kept.\n"
              "providers: onnxruntime execution providers, best first; those missing are skipped, CPU is the fallback.\n"
              "[board]: the profile's training budget per round (a cap on what a round asks of this board).")
    return to_toml(agent_settings(req), header)


def systemd_unit(req: FlashRequest) -> str:
    b = req.board
    lines = ["[Unit]", f"Description=fl-pqsu edge agent {req.device_id} (board {b.name})",
             "Wants=network-online.target", "After=network-online.target time-sync.target",
             "StartLimitIntervalSec=0", "",
             "[Service]", "Type=simple", f"User={req.user}", f"Group={req.user}"]
    if b.groups:
        lines.append(f"SupplementaryGroups={' '.join(b.groups)}")
    lines += [f"ExecStart={VENV_DIR}/bin/pqsu edge run --config {CONFIG_PATH}",
              f"WorkingDirectory=-{req.state_dir}",
              "Environment=PYTHONUNBUFFERED=1", f"Environment=OMP_NUM_THREADS={b.torch_threads}",
              "Restart=always", "RestartSec=10", "TimeoutStopSec=30",
              f"MemoryMax={b.memory_max}", f"CPUQuota={b.cpu_quota}", "Nice=5",
              "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only", "PrivateTmp=yes",
              f"ReadWritePaths=-{req.state_dir}", "",
              "[Install]", "WantedBy=multi-user.target"]
    return "\n".join(lines) + "\n"


INSTALL_SH = r"""#!/bin/sh
# install.sh: written by `pqsu flash` on @CREATED@ for device @DEVICE@ (board @BOARD@).
#
# Idempotent: run it after every flash. It makes (or updates) the agent's virtualenv, installs
# the pinned requirements and the fl-pqsu wheel, links /etc/pqsu to the bundle's etc/ and, as
# root on a running systemd, creates the service user and installs and restarts the unit.
# It never touches the device state in @STATE_DIR@ (it only creates the folder when missing).
#
# Environment:
#   PQSU_ROOT=/mnt/root   install under this prefix instead of / (no user, no systemd)
#   PQSU_PYTHON=python3   interpreter for the virtualenv (Python @PYTHON@ with a wheelhouse)
#   PQSU_FRESH_VENV=1     remove the virtualenv and make it again
#   PQSU_EXTRA_PIP="..."  more `pip install` arguments, run last (e.g. NVIDIA's torch wheel on Jetson)
set -eu

BUNDLE=$(cd "$(dirname "$0")" && pwd -P)
ROOT=${PQSU_ROOT:-}
ROOT=${ROOT%/}
PYTHON=${PQSU_PYTHON:-python3}
VENV="$ROOT@VENV_DIR@"
STATE="$ROOT@STATE_DIR@"
SERVICE_USER=@USER@
BOARD_PYTHON=@PYTHON@
WHEELHOUSE=@WHEELHOUSE@
TORCH_INDEX=@TORCH_INDEX@
SYSTEM_SITE=@SYSTEM_SITE@
TRAINS=@TRAINS@
PROJECT_WHEEL=@PROJECT_WHEEL@
UNIT=@UNIT@

say() { printf 'pqsu install: %s\n' "$*"; }
die() { printf 'pqsu install: error: %s\n' "$*" >&2; exit 1; }
pyver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install python3 and python3-venv"
PYV=$(pyver "$PYTHON") || die "$PYTHON does not run"
case "$PYV" in 3.1[0-9]) ;; *) die "Python 3.10+ needed, $PYTHON is $PYV" ;; esac
if [ "$WHEELHOUSE" = 1 ] && [ "$PYV" != "$BOARD_PYTHON" ]; then
    die "the wheelhouse holds wheels for Python $BOARD_PYTHON but $PYTHON is $PYV: re-flash with --python $PYV (or set PQSU_PYTHON)"
fi

# 1. the virtualenv (kept across runs; made again when asked or when the Python changed)
if [ "${PQSU_FRESH_VENV:-0}" = 1 ] || [ ! -x "$VENV/bin/python" ] || [ "$(pyver "$VENV/bin/python" || true)" != "$PYV" ]; then
    say "creating the virtualenv $VENV (Python $PYV)"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    if [ "$SYSTEM_SITE" = 1 ]; then
        "$PYTHON" -m venv --system-site-packages "$VENV" || die "cannot make a virtualenv (Debian/Ubuntu: apt-get install python3-venv)"
    else
        "$PYTHON" -m venv "$VENV" || die "cannot make a virtualenv (Debian/Ubuntu: apt-get install python3-venv)"
    fi
fi
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check --no-input "$@"; }

# 2. packages: the pins, then this bundle's fl-pqsu wheel (reinstalled: a re-flash may keep the version)
if [ "$WHEELHOUSE" = 1 ]; then
    say "installing offline from $BUNDLE/wheels"
    (
        unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX
        PIP_CONFIG_FILE=/dev/null; export PIP_CONFIG_FILE
        # (set -e does not act inside a subshell followed by ||: chain explicitly)
        pip_ install --no-index --find-links "$BUNDLE/wheels" -r "$BUNDLE/requirements.txt" &&
        { [ ! -f "$BUNDLE/requirements-nodeps.txt" ] ||
          pip_ install --no-index --find-links "$BUNDLE/wheels" --no-deps -r "$BUNDLE/requirements-nodeps.txt"; } &&
        pip_ install --no-index --no-deps --force-reinstall "$BUNDLE/wheels/$PROJECT_WHEEL"
    ) || die "offline install from the wheelhouse failed"
else
    say "installing from the package index"
    if [ -n "$TORCH_INDEX" ]; then
        pip_ install --extra-index-url "$TORCH_INDEX" -r "$BUNDLE/requirements.txt" || die "pip install failed (network?)"
    else
        pip_ install -r "$BUNDLE/requirements.txt" || die "pip install failed (network?)"
    fi
    if [ -f "$BUNDLE/requirements-nodeps.txt" ]; then
        pip_ install --no-deps -r "$BUNDLE/requirements-nodeps.txt" || die "pip install failed (network?)"
    fi
    pip_ install --no-deps --force-reinstall "$BUNDLE/wheels/$PROJECT_WHEEL" || die "cannot install $PROJECT_WHEEL"
fi
if [ -n "${PQSU_EXTRA_PIP:-}" ]; then
    say "pip install $PQSU_EXTRA_PIP"
    # shellcheck disable=SC2086  # word splitting wanted: several pip arguments
    pip_ install $PQSU_EXTRA_PIP || die "pip install $PQSU_EXTRA_PIP failed"
fi
"$VENV/bin/pqsu" --help >/dev/null || die "the installed pqsu does not run"
"$VENV/bin/python" -c 'import onnxruntime, paho.mqtt, numpy, pqsu.edge.agent' || die "the agent's imports fail"
if [ "$TRAINS" = 1 ]; then
    if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        "$VENV/bin/python" -c 'import pqsu.edge.learner' || die "the agent's training imports fail"
    else
        say "torch is not installed: the agent serves predictions but does not train. @TORCH_NOTE@"
    fi
fi

# 3. /etc/pqsu -> the bundle's etc/ (relative, so it also resolves under PQSU_ROOT)
mkdir -p "$ROOT/etc"
if [ -e "$ROOT@ETC_LINK@" ] && [ ! -L "$ROOT@ETC_LINK@" ]; then
    die "$ROOT@ETC_LINK@ exists and is not the bundle's link: move it away and run again"
fi
ln -sfn ../opt/pqsu/bundle/etc "$ROOT@ETC_LINK@"

# 4. device state: created when missing, never changed
NEW_STATE=0
if [ ! -d "$STATE" ]; then mkdir -p "$STATE"; NEW_STATE=1; fi

# 5. service user and systemd unit: only as root on the real root
START="$VENV/bin/pqsu edge run --config $ROOT@CONFIG_PATH@"
if [ -z "$ROOT" ] && [ "$(id -u)" = 0 ]; then
    if [ "$SERVICE_USER" != root ] && ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        say "creating the system user $SERVICE_USER"
        useradd --system --user-group --home-dir "$(dirname "$STATE")" --no-create-home \
            --shell /usr/sbin/nologin "$SERVICE_USER" || die "cannot create the user $SERVICE_USER"
    fi
    if [ "$NEW_STATE" = 1 ]; then chown "$SERVICE_USER:" "$STATE"; fi
    if [ -d "$BUNDLE/etc/credentials" ]; then
        chown -R "$SERVICE_USER:" "$BUNDLE/etc/credentials"
        chmod 0700 "$BUNDLE/etc/credentials"
        find "$BUNDLE/etc/credentials" -type f -exec chmod 0600 {} +
    fi
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        install -m 0644 "$BUNDLE/$UNIT" "/etc/systemd/system/$UNIT"
        systemctl daemon-reload
        systemctl enable "$UNIT" >/dev/null 2>&1 || die "systemctl enable $UNIT failed"
        systemctl restart "$UNIT" || die "systemctl restart $UNIT failed (journalctl -u $UNIT)"
        say "$UNIT installed and (re)started"
    else
        say "systemd is not running here: start the agent with: $START"
    fi
else
    say "not root on / (PQSU_ROOT='$ROOT'): no service user, no systemd unit; start the agent with: $START"
fi
say "done: @DEVICE@ installed in $VENV"
"""


def install_script(req: FlashRequest, created: str, project_wheel: str) -> str:
    values = {
        "CREATED": created, "DEVICE": req.device_id, "BOARD": req.board.name, "STATE_DIR": req.state_dir,
        "PYTHON": req.python, "VENV_DIR": VENV_DIR, "USER": shlex.quote(req.user),
        "WHEELHOUSE": "1" if req.wheelhouse else "0",
        "TORCH_INDEX": shlex.quote(req.torch_index if req.uses_torch_index else ""),
        "SYSTEM_SITE": "1" if req.board.system_site_packages else "0", "TRAINS": "1" if req.trains else "0",
        "PROJECT_WHEEL": shlex.quote(project_wheel), "UNIT": UNIT_NAME, "ETC_LINK": ETC_LINK,
        "CONFIG_PATH": CONFIG_PATH,
        "TORCH_NOTE": req.board.torch_note.replace("'", "").replace('"', "").replace("$", "").replace("`", ""),
    }
    text = INSTALL_SH
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def requirements_txt(req: FlashRequest) -> str:
    head = [f"# pinned requirements of board {req.board.name} (Python {req.python}), written by pqsu flash"]
    if req.uses_torch_index:
        head.append(f"# torch comes from {req.torch_index}")
    return "\n".join(head + req.requirements()) + "\n"


def nodeps_txt(req: FlashRequest) -> str:
    head = ["# installed with --no-deps after requirements.txt (their dependencies are pinned there)"]
    return "\n".join(head + req.nodeps()) + "\n"


# -- building ---------------------------------------------------------------------------------
def source_tree() -> Path:
    """The repository root of the running fl-pqsu (setup.cfg next to the package folders)."""
    root = Path(__file__).resolve().parent.parent
    cfg = root / "setup.cfg"
    if not cfg.is_file() or PROJECT_NAME not in cfg.read_text(errors="replace"):
        raise FlashError(f"no fl-pqsu source tree at {root} (fl-pqsu is installed as a package): "
                         "pass --project-wheel FILE")
    return root


def build_project_wheel(dest: Path) -> Path:
    """Build the fl-pqsu wheel from a copy of the source tree (the tree itself stays untouched)."""
    root = source_tree()
    cfg = ConfigParser()
    cfg.read(root / "setup.cfg")
    package_dirs = {line.split("=", 1)[1].strip() for line in cfg.get("options", "package_dir").splitlines()
                    if "=" in line}
    with tempfile.TemporaryDirectory(prefix="pqsu-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
            if (root / name).is_file():
                shutil.copy2(root / name, src / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for d in sorted(package_dirs):
            shutil.copytree(root / d, src / d, ignore=ignore)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
               "-w", str(dest), str(src)]
        if importlib.util.find_spec("setuptools") is not None:  # build with what is here: no index needed
            cmd.insert(cmd.index("--no-deps"), "--no-build-isolation")
        _run_pip(cmd, "building the fl-pqsu wheel", timeout=600)
    wheels = sorted(dest.glob("fl_pqsu-*.whl"))
    if not wheels:
        raise FlashError("building the fl-pqsu wheel produced no wheel")
    return wheels[-1]


def pip_target_args(req: FlashRequest) -> list[str]:
    out = ["--only-binary=:all:", "--implementation", "cp", "--python-version", req.python]
    for tag in req.board.platform_tags():
        out += ["--platform", tag]
    return out


def torch_index_args(req: FlashRequest) -> list[str]:
    """`--extra-index-url` for torch when the board takes it from an index and that index answers.

    An unreachable index would cost minutes of pip retries; without it the exact `+cpu` pin is only
    found in pip's configured sources (a find-links folder, a mirror), else pip fails clearly.
    """
    if not req.uses_torch_index:
        return []
    try:
        urllib.request.urlopen(urllib.request.Request(req.torch_index, method="HEAD"), timeout=5).close()
    except urllib.error.HTTPError:
        pass                                  # the server answered: pip can ask it for torch
    except Exception as exc:  # noqa: BLE001 - no answer at all: do not send pip there
        pin = next(r for r in req.requirements() if r.startswith("torch=="))
        log.warning("torch index %s is unreachable (%s): looking for %s in pip's configured sources only",
                    req.torch_index, getattr(exc, "reason", exc), pin)
        return []
    return ["--extra-index-url", req.torch_index]


def download_wheelhouse(req: FlashRequest, requirements: Path, nodeps: Path | None, dest: Path) -> None:
    log.info("downloading the wheelhouse for %s (Python %s, %s): %s", req.board.name, req.python, req.board.arch,
             " ".join(req.requirements() + req.nodeps()))
    base = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--progress-bar", "off", "-q",
            "--dest", str(dest), *pip_target_args(req)]
    _run_pip(base + [*torch_index_args(req), "-r", str(requirements)],
             f"downloading the wheelhouse for board {req.board.name}", timeout=3600)
    if nodeps:
        _run_pip(base + ["--no-deps", "-r", str(nodeps)], f"downloading the wheelhouse for board {req.board.name}",
                 timeout=600)


def verify_wheelhouse(req: FlashRequest, wheels: Path, requirements: Path, nodeps: Path | None,
                      project_wheel: Path) -> None:
    """Resolve the whole install from the wheelhouse alone, as install.sh will on the board."""
    with tempfile.TemporaryDirectory(prefix="pqsu-verify-") as tmp:
        base = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--dry-run",
                "--ignore-installed", "--no-index", "--find-links", str(wheels), "--target", tmp, *pip_target_args(req)]
        what = "checking that the wheelhouse installs offline"
        _run_pip(base + ["-r", str(requirements), str(project_wheel)], what, timeout=600, isolated=True)
        if nodeps:
            _run_pip(base + ["--no-deps", "-r", str(nodeps)], what, timeout=600, isolated=True)


def resolve_wheelhouse(req: FlashRequest, requirements: Path, nodeps: Path | None) -> list[tuple[str, int | None]]:
    """(file name, size or None) of every wheel the wheelhouse would hold, without downloading them."""
    with tempfile.TemporaryDirectory(prefix="pqsu-resolve-") as tmp:
        base = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--dry-run",
                "--ignore-installed", "--target", str(Path(tmp) / "t"), *pip_target_args(req)]
        what = f"resolving the wheelhouse for board {req.board.name}"
        _run_pip(base + ["--report", str(Path(tmp) / "r1.json"), *torch_index_args(req), "-r", str(requirements)],
                 what, timeout=900)
        items = json.loads((Path(tmp) / "r1.json").read_text()).get("install", [])
        if nodeps:
            _run_pip(base + ["--report", str(Path(tmp) / "r2.json"), "--no-deps", "-r", str(nodeps)], what, timeout=600)
            items += json.loads((Path(tmp) / "r2.json").read_text()).get("install", [])
        out = []
        for item in items:
            url = item.get("download_info", {}).get("url", "")
            name = urllib.parse.unquote(url.rsplit("/", 1)[-1].split("#")[0])
            size = None
            if url.startswith("file://"):
                try:
                    size = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).stat().st_size
                except OSError:
                    pass
            out.append((name, size))
        return out


def _run_pip(cmd: list[str], what: str, *, timeout: float, isolated: bool = False) -> None:
    env = dict(os.environ)
    if isolated:  # only what the command line names: no configured index or find-links
        for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
            env.pop(k, None)
        env["PIP_CONFIG_FILE"] = os.devnull
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FlashError(f"{what}: pip did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise FlashError(f"{what} failed: {_last_error(proc.stderr.decode(errors='replace'))}")


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and "is ignored: it is neither" not in ln]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    line = (errors or lines or ["(no message)"])[-1 if not errors else 0]
    return line.removeprefix("ERROR: ")


# -- staging ----------------------------------------------------------------------------------
@dataclass
class Staged:
    folder: Path                      # the bundle folder, complete
    files: list[tuple[str, int, int]]  # (path inside the bundle, mode, size); folders end with "/"


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)                                             # whatever the umask was


def _mkdir(path: Path, mode: int) -> None:
    path.mkdir(mode=0o700)
    os.chmod(path, mode)


def build_bundle(req: FlashRequest, folder: Path, *, dry_run: bool = False) -> Staged:
    """Write the complete bundle into `folder` (which must not exist). With dry_run the wheelhouse
    is only resolved (listed, not downloaded) and `Staged.files` lists it with unknown sizes."""
    created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    _mkdir(folder, 0o755)
    for sub in ("wheels", "etc"):
        _mkdir(folder / sub, 0o755)
    if req.project_wheel:
        project_wheel = folder / "wheels" / req.project_wheel.name
        shutil.copyfile(req.project_wheel, project_wheel)
        os.chmod(project_wheel, 0o644)
    else:
        log.info("building the fl-pqsu wheel from %s", source_tree())
        project_wheel = build_project_wheel(folder / "wheels")
    requirements = folder / "requirements.txt"
    _write(requirements, requirements_txt(req).encode(), 0o644)
    nodeps = folder / "requirements-nodeps.txt" if req.nodeps() else None
    if nodeps:
        _write(nodeps, nodeps_txt(req).encode(), 0o644)
    unresolved: list[tuple[str, int | None]] = []
    if req.wheelhouse and dry_run:
        unresolved = resolve_wheelhouse(req, requirements, nodeps)
    elif req.wheelhouse:
        download_wheelhouse(req, requirements, nodeps, folder / "wheels")
        verify_wheelhouse(req, folder / "wheels", requirements, nodeps, project_wheel)
    for w in (folder / "wheels").iterdir():
        os.chmod(w, 0o644)
    _write(folder / "etc" / "agent.toml", agent_toml(req, created).encode(), 0o644)
    if req.credentials:
        _mkdir(folder / "etc" / "credentials", 0o700)
        for name, source in req.credentials.values():
            _write(folder / "etc" / "credentials" / name, source.read_bytes(), 0o600)
    _write(folder / UNIT_NAME, systemd_unit(req).encode(), 0o644)
    _write(folder / "install.sh", install_script(req, created, project_wheel.name).encode(), 0o755)
    files = _inventory(folder)
    manifest = {
        "format": 1, "flash_id": req.flash_id, "created": created, "board": req.board.name,
        "device_id": req.device_id, "fleet": req.fleet, "broker": str(BrokerURL.parse(req.broker)),
        "pqsu_version": _version(), "python": req.python, "arch": req.board.arch,
        "platform_tags": req.board.platform_tags(), "wheelhouse": req.wheelhouse,
        "requirements": req.requirements(), "requirements_no_deps": req.nodeps(),
        "torch_index": req.torch_index if req.uses_torch_index else None,
        "trains": req.trains, "project_wheel": project_wheel.name,
        "paths": {"bundle": BUNDLE_DIR, "venv": VENV_DIR, "config": CONFIG_PATH, "credentials": CREDENTIALS_DIR,
                  "state_dir": req.state_dir, "data": req.data, "unit": f"/etc/systemd/system/{UNIT_NAME}"},
        "files": {rel: {"mode": f"{mode:04o}", "size": size, "sha256": _sha256(folder / rel)}
                  for rel, mode, size in files if rel and not rel.endswith("/")},
    }
    if unresolved:
        manifest["wheelhouse_files"] = [name for name, _ in unresolved]
    _write(folder / "bundle.json", (json.dumps(manifest, indent=2) + "\n").encode(), 0o644)
    files = _inventory(folder)
    files += [(f"wheels/{name}", 0o644, -1 if size is None else size) for name, size in unresolved]
    return Staged(folder, sorted(files, key=lambda f: f[0]))


def _inventory(folder: Path) -> list[tuple[str, int, int]]:
    out = [("", os.stat(folder).st_mode & 0o7777, 0)]              # "": the bundle folder itself
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        rel = path.relative_to(folder).as_posix()
        out.append((rel + "/" if path.is_dir() else rel, st.st_mode & 0o7777, 0 if path.is_dir() else st.st_size))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version() -> str:
    try:
        return importlib.metadata.version(PROJECT_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- putting it in place ----------------------------------------------------------------------
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
            f"on the board: {board_hint}")


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


def flash(req: FlashRequest) -> str:
    if isinstance(req.target, SshTarget):
        return flash_ssh(req)
    return flash_local(req)


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
        return f"flashed {req.board.name} bundle for {req.device_id} into {t.destination}:{bundle} (not installed)"
    env = "" if t.root.rstrip("/") == "" else f"PQSU_ROOT={shlex.quote(t.root)} "
    log.info("running install.sh on %s", t.destination)
    _ssh(req, f"{sudo}env {env}sh {shlex.quote(bundle + '/install.sh')}", timeout=3600,
         what="install.sh", stream=True)
    return f"flashed and installed {req.board.name} bundle for {req.device_id} on {t.destination}:{bundle}"


def _ssh_cleanup(req: FlashRequest, upload: str) -> None:
    try:
        _ssh(req, f"rm -rf {shlex.quote(upload)}", timeout=req.ssh_timeout + 20, what="cleaning up")
    except FlashError as exc:
        log.warning("could not remove %s on the board: %s", upload, exc)
