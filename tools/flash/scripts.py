"""The scripts in a bundle that run on the board: the systemd unit of the agent and install.sh."""
from __future__ import annotations

import shlex

from pqsu.tools.flash.request import (BUNDLE_MODEL_FILE, CONFIG_PATH, ETC_LINK, STATE_MODEL_FILE, UNIT_NAME, VENV_DIR,
                                      FlashRequest)


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
              # onnxruntime's telemetry otherwise writes a device id and an event store to $HOME/.cache at
              # import (a warning under this unit, whose home is read-only) for upload over the board's link
              "Environment=ORT_DISABLE_TELEMETRY=1",
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
# It never touches the device state in @STATE_DIR@ (it only creates the folder when missing), but
# for a model flashed with the bundle: install-model.sh puts it there unless a verified one is there.
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

# 4b. the fleet's model flashed into the bundle: where the agent loads it at start
if [ -f "$BUNDLE/install-model.sh" ]; then
    PQSU_ROOT="$ROOT" sh "$BUNDLE/install-model.sh" || die "the bundle's model was not installed"
fi

# 5. service user and systemd unit: only as root on the real root
START="$VENV/bin/pqsu edge run --config $ROOT@CONFIG_PATH@"
if [ -z "$ROOT" ] && [ "$(id -u)" = 0 ]; then
    if [ "$SERVICE_USER" != root ] && ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        say "creating the system user $SERVICE_USER"
        useradd --system --user-group --home-dir "$(dirname "$STATE")" --no-create-home \
            --shell /usr/sbin/nologin "$SERVICE_USER" || die "cannot create the user $SERVICE_USER"
    fi
    if [ "$NEW_STATE" = 1 ]; then chown "$SERVICE_USER:" "$STATE"; fi
    if [ -f "$STATE/@STATE_MODEL@" ]; then chown "$SERVICE_USER:" "$STATE/@STATE_MODEL@"; fi
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
        "CONFIG_PATH": CONFIG_PATH, "STATE_MODEL": STATE_MODEL_FILE,
        "TORCH_NOTE": req.board.torch_note.replace("'", "").replace('"', "").replace("$", "").replace("`", ""),
    }
    text = INSTALL_SH
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


INSTALL_MODEL_SH = r"""#!/bin/sh
# install-model.sh: written by `pqsu flash` on @CREATED@ for device @DEVICE@ with model @MODEL_ID@
# (@SOURCE@). Run by install.sh; may be run alone.
#
# Puts the bundle's model at @STATE_DIR@/@STATE_MODEL@, where the agent loads it at start: the board
# serves it before it ever reaches the broker, and its first radio download can be a patch from it.
# The model is verified first, with the installed fl-pqsu (as the agent verifies what it loads). A
# verified model already in the state is kept: a board that has been following its fleet holds the
# newer one (PQSU_REPLACE_MODEL=1 replaces it anyway).
#
# Environment:
#   PQSU_ROOT=/mnt/root       the board's root under this prefix
#   PQSU_AGENT_PYTHON=python  a Python with fl-pqsu installed (default: the agent's virtualenv)
#   PQSU_REPLACE_MODEL=1      replace a verified model already in the state
set -eu

BUNDLE=$(cd "$(dirname "$0")" && pwd -P)
ROOT=${PQSU_ROOT:-}
ROOT=${ROOT%/}
STATE="$ROOT@STATE_DIR@"
PY=${PQSU_AGENT_PYTHON:-"$ROOT@VENV_DIR@/bin/python"}
MODEL="$BUNDLE/@BUNDLE_MODEL@"
WANT=@MODEL_ID@

say() { printf 'pqsu install: %s\n' "$*"; }
die() { printf 'pqsu install: error: %s\n' "$*" >&2; exit 1; }
model_id() {
    "$PY" -c 'import sys
from pqsu.protocol.model_id import verified
with open(sys.argv[1], "rb") as f:
    sys.stdout.write(verified(f.read()).model_id)' "$1" 2>/dev/null
}

[ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1 || die "$PY not found: run install.sh (it makes the virtualenv)"
GOT=$(model_id "$MODEL") || die "$MODEL does not verify (a corrupt copy?): flash the board again"
[ "$GOT" = "$WANT" ] || die "$MODEL is model $GOT, the bundle was flashed with $WANT: flash the board again"
mkdir -p "$STATE"
if [ -f "$STATE/@STATE_MODEL@" ] && HAVE=$(model_id "$STATE/@STATE_MODEL@"); then
    if [ "$HAVE" = "$WANT" ]; then
        say "the device already holds model $WANT"
        exit 0
    fi
    if [ "${PQSU_REPLACE_MODEL:-0}" != 1 ]; then
        say "the device holds model $HAVE (verified): kept; PQSU_REPLACE_MODEL=1 installs the flashed $WANT instead"
        exit 0
    fi
fi
# beside its place, then renamed: the agent never sees half a file
cp "$MODEL" "$STATE/.@STATE_MODEL@.flash" && chmod 0644 "$STATE/.@STATE_MODEL@.flash" &&
    mv -f "$STATE/.@STATE_MODEL@.flash" "$STATE/@STATE_MODEL@" || die "cannot write $STATE/@STATE_MODEL@"
say "model $WANT installed at $STATE/@STATE_MODEL@: the agent serves it from its start"
"""


def install_model_script(req: FlashRequest, created: str) -> str:
    """install-model.sh of a bundle with a model (`req.model` set)."""
    values = {"CREATED": created, "DEVICE": req.device_id, "MODEL_ID": req.model.model_id,
              "SOURCE": req.model.source.replace("\n", " "), "STATE_DIR": req.state_dir, "VENV_DIR": VENV_DIR,
              "STATE_MODEL": STATE_MODEL_FILE, "BUNDLE_MODEL": BUNDLE_MODEL_FILE}
    text = INSTALL_MODEL_SH
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text
