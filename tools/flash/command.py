"""Flash an edge agent onto a board: a self-contained bundle, staged, then moved into place.

  pqsu flash --list-boards
  pqsu flash --board rpi5 --device-id pi-kitchen-01 --broker mqtts://broker.example:8883 \\
             --tls-ca ca.crt --tls-cert pi.crt --tls-key pi.key --target /media/$USER/rootfs
  pqsu flash --board rpi4 --device-id pi-shed --broker mqtt://10.0.0.2 --wheelhouse \\
             --target ssh://pi@pi-shed.local
  pqsu flash --board jetson-orin --device-id orin-01 --broker mqtt://10.0.0.2 --target /tmp/x --dry-run
  pqsu flash --board rpi4 --device-id pi-field-07 --broker mqtt://10.0.0.2 --fleet field \\
             --model-from-broker --target /media/$USER/rootfs          (or --model-file model.int8.onnx)

The bundle lands in <target>/opt/pqsu/bundle/ (the target is the board's root file system: a
mounted SD card, any folder, or ssh://[user@]host[:port][/root] on a running board):

  bundle.json              manifest: board, device, versions, every file with mode, size, sha256
  install.sh               idempotent installer, run on the board (as root for the systemd unit)
  requirements.txt         the board profile's pinned requirements
  pqsu-agent.service       systemd unit (Restart=always, the profile's MemoryMax/CPUQuota)
  wheels/                  the fl-pqsu wheel (+ with --wheelhouse every pinned wheel: offline install)
  etc/agent.toml           settings for `pqsu edge run --config` (paths as installed on the board)
  etc/credentials/         TLS files, password, device key: 0600 in a 0700 folder
  model-code/              with --model-code: the user's model module or package, on the agent's path
  model.onnx               with --model-file / --model-from-broker: the fleet's current model, verified
  install-model.sh         puts it at <state-dir>/model.onnx (run by install.sh), where the agent loads it
                           at start: the board serves it at once, its first radio download can be a patch

install.sh makes /opt/pqsu/venv, links /etc/pqsu -> /opt/pqsu/bundle/etc and, as root on a
systemd board, installs and restarts pqsu-agent.service. Device state (error-feedback residual,
round, outbox) lives in --state-dir (/var/lib/pqsu/state), outside the bundle: re-flashing
replaces the bundle and its config, never the state. Nothing is half-written: the bundle is
built in a staging folder next to its place and renamed into it; on any error the target is
left as it was. docs/boards.md has the details.
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path

from pqsu.protocol.identity_args import add_identity_arguments, read_password_file
from pqsu.protocol.mqtt import BrokerURL
from pqsu.protocol.topics import check_device, check_fleet
from pqsu.tools.flash.boards import BOARDS, format_boards, get_board
from pqsu.tools.flash.model import model_from_broker, model_from_file
from pqsu.tools.flash.request import DATA_DIR, STATE_DIR, FlashError, FlashRequest, SshTarget
from pqsu.tools.flash.install import dry_run, flash
from pqsu.tools.flash.model_code import check_model_code

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Settings with their own flash flag; --set may add any other agent setting or override a profile
# value (providers, inference_threads, torch_threads, stay).
MANAGED_KEYS = {"broker", "device_id", "fleet", "data", "state_dir", "key_file", "tls_ca", "tls_cert", "tls_key",
                "username", "password_file", "http_port", "inference_only", "board", "allow_model_code",
                "model_code_dir"}
_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list-boards", action="store_true", help="print the board profiles and exit")
    g = p.add_argument_group("device")
    g.add_argument("--board", help=f"board profile: {', '.join(BOARDS)}")
    g.add_argument("--device-id", help="the device's id (letters, digits, . _ -): its MQTT client id")
    g.add_argument("--broker", help="broker URL, mqtt://host[:port] or mqtts://host[:port] (no password in it)")
    g.add_argument("--fleet", default="default", help="fleet the device joins: its topics live under pqsu/<fleet>/ "
                   "(default: %(default)s)")
    g.add_argument("--data", default=DATA_DIR, help=f"training data path on the board (default: {DATA_DIR})")
    g.add_argument("--state-dir", default=STATE_DIR,
                   help=f"device state folder on the board, kept across re-flashes (default: {STATE_DIR})")
    g.add_argument("--inference-only", action="store_true", help="never train: no torch/onnx in the bundle")
    g.add_argument("--http-port", type=int, help="port of the agent's local inference API on 127.0.0.1")
    g.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="another agent setting for agent.toml (e.g. upload=always); repeatable")
    c = p.add_argument_group("credentials (copied into the bundle with mode 0600)")
    add_identity_arguments(c, "this device's")
    c.add_argument("--key-file", metavar="FILE", help="file with the device's HMAC key (hex) for signed updates")
    b = p.add_argument_group("bundle")
    b.add_argument("--target", help="the board's root: a folder (mounted SD card...) or ssh://[user@]host[:port][/root]")
    b.add_argument("--wheelhouse", action="store_true",
                   help="include every pinned wheel for the board's platform: install.sh then works offline")
    b.add_argument("--python", metavar="X.Y", help="the board's Python version (default: the profile's)")
    b.add_argument("--torch-index", metavar="URL",
                   help="index torch comes from (default: the profile's; 'none': only pip's configured sources)")
    b.add_argument("--project-wheel", metavar="FILE", help="use this fl-pqsu wheel instead of building one")
    m = b.add_mutually_exclusive_group()
    m.add_argument("--model-file", metavar="FILE",
                   help="put this fl-pqsu model (int8 ONNX, verified first) into the bundle: the board serves it "
                        "from its first start, and its first radio download can be a patch")
    m.add_argument("--model-from-broker", metavar="URL", nargs="?", const="",
                   help="the same with the model retained on the broker for --fleet (default URL: --broker's; "
                        "connects with this device's credentials)")
    b.add_argument("--model-wait", type=float, default=60.0, metavar="S",
                   help="--model-from-broker: give up after this many seconds (default: %(default)g)")
    b.add_argument("--user", default="pqsu", help="system user the agent runs as (default: %(default)s)")
    b.add_argument("--dry-run", action="store_true", help="list every file that would be written; write nothing")
    m = p.add_argument_group("a custom architecture (the board imports its code to train on it)")
    m.add_argument("--model-code", metavar="PATH", help="a .py file or a package folder with the model's code, "
                   "copied into the bundle and put on the agent's import path")
    m.add_argument("--allow-model-code", metavar="PKG.MODULE:FACTORY", action="append", default=[],
                   help="a factory the agent may import to rebuild a model it is sent (in --model-code, or "
                        "installed on the board); repeatable")
    s = p.add_argument_group("ssh targets")
    s.add_argument("--ssh-timeout", type=float, default=10.0, help="ssh connect timeout in seconds (default: 10)")
    s.add_argument("--ssh-identity", metavar="FILE", help="ssh private key to log in with")
    s.add_argument("--no-install", action="store_true", help="only put the bundle in place; do not run install.sh")


def run(args: argparse.Namespace) -> int:
    if args.list_boards:
        print(format_boards())
        return 0
    request = request_from_args(args)
    if request.dry_run:
        print(dry_run(request))
        return 0
    result = flash(request)
    print(result)
    return 0


def request_from_args(args: argparse.Namespace) -> FlashRequest:
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
    model_code = check_model_code(args.model_code, args.allow_model_code,
                                  board.trains and not args.inference_only)
    if args.model_wait <= 0:
        raise FlashError("--model-wait must be positive")
    target: Path | SshTarget
    if args.target.startswith("ssh://"):
        target = SshTarget.parse(args.target)
    elif "://" in args.target:
        raise FlashError(f"--target {args.target!r}: a folder or ssh://[user@]host[:port][/root]")
    else:
        target = Path(args.target).absolute()
        if not target.is_dir():
            raise FlashError(f"target {target} is not a folder (mount the board's root there, or create it)")
    request = FlashRequest(
        board=board, device_id=device_id, broker=args.broker, fleet=fleet, data=args.data,
        state_dir=args.state_dir.rstrip("/") or "/", inference_only=bool(args.inference_only),
        http_port=args.http_port, extra_settings=_parse_settings(args.settings), credentials=credentials,
        username=args.username, target=target, wheelhouse=bool(args.wheelhouse), python=python,
        torch_index=torch_index, project_wheel=project_wheel, user=args.user, dry_run=bool(args.dry_run),
        ssh_timeout=args.ssh_timeout, ssh_identity=args.ssh_identity, install=not args.no_install,
        model_code=model_code, allow_model_code=tuple(args.allow_model_code))
    request.model = _model(args, url, fleet, credentials)  # last: the one check that may take a while (the broker)
    return request


def _model(args: argparse.Namespace, device_url: BrokerURL, fleet: str, credentials: dict[str, tuple[str, Path]]):
    """The model for the bundle (`FlashedModel`), verified; None without --model-file/--model-from-broker."""
    if args.model_file:
        return model_from_file(_readable(args.model_file, "--model-file"))
    if args.model_from_broker is None:
        return None
    url = BrokerURL.parse(args.model_from_broker) if args.model_from_broker else device_url
    files = {k: str(v[1]) for k, v in credentials.items() if k in ("tls_ca", "tls_cert", "tls_key")}
    if not url.tls:
        files = {}                              # the device's TLS files mean nothing to a plain URL given here
    password = read_password_file(str(credentials["password_file"][1])) if "password_file" in credentials else None
    return model_from_broker(url, fleet, wait_s=args.model_wait, connect_timeout_s=min(10.0, args.model_wait),
                             username=args.username, password=password, **files)


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
