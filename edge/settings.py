"""The edge agent's settings, typed: one definition for `pqsu edge run`, `pqsu edge doctor` and the
agent.toml that `pqsu flash` writes onto a board.

Sources, later ones win: the defaults below, a settings file (TOML or JSON, keys named like the
flags with underscores; `pqsu flash` adds a [board] table), the flags given.

Bad input is caught at two moments:
- types and unknown keys while the settings are read: one line naming the key, the value and the
  type expected (a `SettingsError`, so the command exits with status 2 before any work);
- values (device id, broker URL, upload rule, port range...) by `AgentSettings.problems()`, which
  `pqsu edge run` refuses to start with and `pqsu edge doctor` reports as its settings check.

Only TOML booleans are booleans here: `stay = "no"` is an error, not a true string. On the command
line a boolean flag alone means true and also takes true/false, yes/no or 1/0.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.identity_args import add_identity_arguments, read_password_file
from pqsu.protocol.settings import read_settings

DEFAULT_HTTP_PORT = 8780
PROTOCOLS = ("auto", "5", "3.1.1")
MIN_CHUNK_LIMIT = 1024
IDENTITY_KEYS = ("tls_ca", "tls_cert", "tls_key", "username", "password_file")


class SettingsError(PqsuError):
    """A setting of the wrong type, or one the agent does not know."""


@dataclass(frozen=True)
class BoardBudget:
    """The [board] table of a flashed board: its profile's name and what it accepts per round."""

    name: str | None = None
    max_epochs: float | None = None
    max_batch_size: int | None = None
    time_budget_s: float | None = None


@dataclass(frozen=True)
class AgentSettings:
    broker: str | None = None
    device_id: str | None = None
    fleet: str = "default"
    data: str | None = None
    state_dir: str = "pqsu-device"
    upload: str = "norm:0.0001"
    select: str = "topk:0.02"
    error_feedback: bool = True
    key_file: str | None = None
    chunk_limit: int = 128 * 1024
    protocol: str = "auto"
    inference_only: bool = False
    allow_model_code: tuple[str, ...] = ()  # package.module:factory names this device may import and run
    model_code_dir: str | None = None       # a folder put on the import path for them (a flashed bundle's)
    torch_threads: int = 0              # 0: torch's choice
    eval_holdout: float = 0.1           # pqsu.edge.learner.HOLDOUT (not imported here: it brings torch)
    stay: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    username: str | None = None
    password_file: str | None = None
    http_port: int | None = None        # None: DEFAULT_HTTP_PORT, left out when busy; 0: any free port; -1: off
    providers: tuple[str, ...] = ()
    inference_threads: int = 0          # 0: onnxruntime's choice
    board: BoardBudget = field(default_factory=BoardBudget)

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "settings") -> "AgentSettings":
        """Typed settings from a table (a parsed settings file, or values a tool assembled);
        `where` starts the error line ("settings file /etc/pqsu/agent.toml")."""
        return cls(**_typed(cls, data, where))

    @classmethod
    def from_file(cls, path: str | Path) -> "AgentSettings":
        return cls.from_mapping(read_settings(path), f"settings file {path}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AgentSettings":
        """The defaults, then --config's file, then the flags given (those left at None were not)."""
        config = getattr(args, "config", None)
        base = cls.from_file(config) if config else cls()
        flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                 if f.name != "board" and getattr(args, f.name, None) is not None}
        return dataclasses.replace(base, **_typed(cls, flags, "flags"))

    # -- writing ---------------------------------------------------------------------------
    def to_mapping(self, keys: typing.Iterable[str] | None = None) -> dict:
        """A table that `from_mapping` reads back to these settings: the given keys (default: all),
        without the unset ones (TOML has no null); providers as a list, [board] as a table."""
        out = {}
        for name in keys if keys is not None else (f.name for f in dataclasses.fields(self)):
            value = getattr(self, name)
            if isinstance(value, BoardBudget):
                value = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
            elif isinstance(value, tuple):
                value = list(value)
            if value is not None:
                out[name] = value
        return out

    # -- values ----------------------------------------------------------------------------
    def problems(self, *, trains: bool) -> list[str]:
        """What is wrong with the values (empty: nothing); a missing broker or device id included."""
        from pqsu.export.model_check import check_custom_name  # stdlib only: no torch here
        from pqsu.protocol.mqtt import BrokerURL
        from pqsu.protocol.topics import check_device, check_fleet

        out = [f"--{key.replace('_', '-')} is missing" for key in ("device_id", "broker") if not getattr(self, key)]
        checks = [lambda: check_device(self.device_id)] if self.device_id else []
        checks.append(lambda: check_fleet(self.fleet))
        if self.broker:
            checks.append(lambda: BrokerURL.parse(self.broker))
        for check in checks:
            out += _failure(check)
        if self.protocol not in PROTOCOLS:
            out.append(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.chunk_limit < MIN_CHUNK_LIMIT:
            out.append(f"chunk_limit below {MIN_CHUNK_LIMIT} bytes")
        for check in ([self.policy] if trains else []) + [self.http_endpoint, self.password]:
            out += _failure(check)
        out += [msg for arch in self.allow_model_code for msg in _failure(lambda a=arch: check_custom_name(a))]
        if self.model_code_dir and not Path(self.model_code_dir).is_dir():
            out.append(f"model_code_dir {self.model_code_dir} is not a folder")
        if not 0 <= self.eval_holdout < 1:
            out.append(f"eval_holdout {self.eval_holdout} must be a fraction in [0, 1)")
        for key in ("torch_threads", "inference_threads"):
            if getattr(self, key) < 0:
                out.append(f"{key} {getattr(self, key)} is negative (0: the library's choice)")
        for key in ("max_epochs", "max_batch_size", "time_budget_s"):
            value = getattr(self.board, key)
            if value is not None and value <= 0:
                out.append(f"board.{key} {value} must be positive")
        return out

    def check(self, *, trains: bool) -> "AgentSettings":
        """These settings, or a PqsuError listing what is wrong (what `pqsu edge run` starts with)."""
        for key in ("broker", "device_id"):
            if not getattr(self, key):
                raise PqsuError(f"--{key.replace('_', '-')} is required (flag or settings file)")
        problems = self.problems(trains=trains)
        if problems:
            raise PqsuError("; ".join(problems))
        return self

    def http_endpoint(self) -> tuple[int | None, bool]:
        """(port or None for off, required): a port chosen explicitly must be free; the default may be busy."""
        if self.http_port is None:
            return DEFAULT_HTTP_PORT, False
        if self.http_port < -1 or self.http_port > 65535:
            raise PqsuError(f"http_port {self.http_port} out of range: 0-65535, 0 for any free port, -1 for none")
        return (None if self.http_port < 0 else self.http_port), True

    def password(self) -> str | None:
        """The MQTT password from password_file (its first line), None without one."""
        return read_password_file(self.password_file)

    def policy(self):
        """The selective-update policy of upload, select and error_feedback."""
        from pqsu.edge.selective import SelectivePolicy

        return SelectivePolicy.from_spec(self.upload, self.select, self.error_feedback)

    def agent_config(self):
        """The `AgentConfig` of these settings (reads the password file)."""
        from pqsu.edge.agent import AgentConfig

        port, required = self.http_endpoint()
        return AgentConfig(broker=self.broker, device_id=self.device_id, fleet=self.fleet, state_dir=self.state_dir,
                           chunk_limit=self.chunk_limit, protocol=self.protocol, exit_when_done=not self.stay,
                           tls_ca=self.tls_ca, tls_cert=self.tls_cert, tls_key=self.tls_key, username=self.username,
                           password=self.password(), http_port=port, http_required=required,
                           providers=self.providers, inference_threads=self.inference_threads)


DEFAULTS = AgentSettings().to_mapping()


def _failure(check) -> list[str]:
    """[the PqsuError message of check()], or [] when it passes."""
    try:
        check()
    except PqsuError as exc:
        return [str(exc)]
    return []


# -- types ---------------------------------------------------------------------------------------
_EXPECTED = {str: "a string", int: "an integer", float: "a number", bool: "a boolean (true or false, unquoted)",
             tuple: "a list of strings or one comma-separated string", BoardBudget: "a table ([board])"}


def _typed(cls: type, data: Mapping[str, Any], where: str, prefix: str = "") -> dict:
    """`data` checked against the fields of `cls`: each value of its field's type, or a SettingsError."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        if key not in hints:
            near = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else f"; known: {', '.join(hints)}"
            raise SettingsError(f"{where}: unknown setting {prefix}{key} = {_shown(value)}{hint}")
        kind, optional = _kind(hints[key])
        if value is None and optional:
            out[key] = None
        elif kind is BoardBudget:
            if not isinstance(value, Mapping):
                raise SettingsError(_mistyped(where, prefix + key, value, kind))
            out[key] = BoardBudget(**_typed(BoardBudget, value, where, f"{prefix}{key}."))
        else:
            out[key] = _coerce(kind, value, lambda: _mistyped(where, prefix + key, value, kind))
    return out


def _kind(hint) -> tuple[type, bool]:
    """(the type a field holds, whether it may be None) from its annotation."""
    if typing.get_origin(hint) is tuple:
        return tuple, False
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _coerce(kind: type, value: Any, error) -> Any:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is tuple:  # providers, allow_model_code: a settings file's list, or a flag's comma-separated string
        if isinstance(value, str):
            value = value.split(",")
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        if ok:
            value = tuple(v.strip() for v in value if v.strip())
    else:  # pragma: no cover - a field of a type this module does not read
        raise TypeError(f"no reader for {kind}")
    if not ok:
        raise SettingsError(error())
    return value


def _mistyped(where: str, key: str, value: Any, kind: type) -> str:
    return f"{where}: {key} = {_shown(value)}: expected {_EXPECTED[kind]}, not {_kind_of(value)}"


def _kind_of(value: Any) -> str:
    if isinstance(value, list) and any(not isinstance(v, str) for v in value):
        return "a list holding " + _kind_of(next(v for v in value if not isinstance(v, str)))
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "a list"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


def _shown(value: Any) -> str:
    """A value as a settings file spells it: "text", 5, true, [...]."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# -- command line ----------------------------------------------------------------------------------
def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, yes/no or 1/0, got {text!r}")


parse_bool.__name__ = "boolean"  # argparse names the type in its error: "invalid boolean value"

# Help of each flag (with its metavar); the identity flags come from protocol.identity_args.
_HELP: dict[str, tuple[str | None, str]] = {
    "broker": ("URL", "the fleet's MQTT broker: mqtt://host[:port] or mqtts://host[:port] (TLS)"),
    "device_id": ("ID", "this device's id (letters, digits, . _ -): its MQTT client id and its name at the coordinator"),
    "fleet": ("NAME", "the fleet to join, as the coordinator names it (default: default)"),
    "data": ("PATH", "local training data: an .npz shard (x uint8 N,C,H,W and y), a folder of shards, "
                     "or a folder with IDX files"),
    "state_dir": ("DIR", "where the device keeps its state (residual), its outbox and the current model "
                         "(default: pqsu-device)"),
    "upload": ("RULES", "when to upload: always, loss, norm:T or relevance:T, joined by + (default: norm:0.0001)"),
    "select": ("SPEC", "which entries to send: topk:F, threshold:T, dense (int8) or fp32 (default: topk:0.02)"),
    "error_feedback": ("BOOL", "keep what is not sent and add it to a later update (default: true)"),
    "key_file": ("FILE", "file with this device's HMAC key (hex) to sign its updates (default: unsigned)"),
    "chunk_limit": ("BYTES", "largest MQTT payload; bigger updates are sent in chunks (default: 131072)"),
    "protocol": (None, "MQTT version; auto tries 5, then 3.1.1 (default: auto)"),
    "inference_only": ("BOOL", "follow and serve the fleet's models, never train (even with torch installed)"),
    "allow_model_code": ("LIST", "custom architectures (package.module:factory, comma separated) this device may "
                                 "import and run to rebuild a model it is sent for training; without it a model of "
                                 "a custom architecture is served for inference but never trained on"),
    "model_code_dir": ("DIR", "folder put on the import path for --allow-model-code (a flashed bundle's model code)"),
    "torch_threads": ("N", "torch CPU threads for training (default: 0, torch's choice)"),
    "eval_holdout": ("F", "fraction of the local samples never trained on: each round the device evaluates the "
                          "model it received on them and reports it (federated evaluation; default: 0.1; 0: off)"),
    "stay": ("BOOL", "keep running after the coordinator says training is over (inference-only devices always stay)"),
    "http_port": ("PORT", f"port of POST /predict, GET /healthz, GET /metrics (default: {DEFAULT_HTTP_PORT}, "
                          "skipped when busy; 0: any free port; -1: off)"),
    "providers": ("LIST", "onnxruntime execution providers by preference, comma separated "
                          "(e.g. TensorrtExecutionProvider,CUDAExecutionProvider); CPU is the fallback"),
    "inference_threads": ("N", "onnxruntime threads for inference (default: 0, onnxruntime's choice)"),
}
_API_KEYS = ("http_port", "providers", "inference_threads")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--config and one flag per setting (the [board] table is for settings files only)."""
    p.add_argument("--config", metavar="FILE", help="settings file (TOML or JSON) with the settings below, named with "
                   "underscores (chunk_limit = 65536); flags given win")
    hints = typing.get_type_hints(AgentSettings)
    api = p.add_argument_group("local inference API (127.0.0.1 only)")
    for f in dataclasses.fields(AgentSettings):
        if f.name == "board" or f.name in IDENTITY_KEYS:
            continue
        group = api if f.name in _API_KEYS else p
        metavar, text = _HELP[f.name]
        flag = "--" + f.name.replace("_", "-")
        kind, _ = _kind(hints[f.name])
        if kind is bool:
            group.add_argument(flag, type=parse_bool, nargs="?", const=True, metavar=metavar, help=text)
        elif f.name == "protocol":
            group.add_argument(flag, choices=PROTOCOLS, help=text)
        else:
            group.add_argument(flag, type=kind if kind in (int, float) else str, metavar=metavar, help=text)
        if f.name == "error_feedback":
            group.add_argument("--no-error-feedback", dest="error_feedback", action="store_const", const=False,
                               help="drop what is not sent instead of keeping it (same as --error-feedback false)")
        elif f.name == "http_port":
            group.add_argument("--no-http", dest="http_port", action="store_const", const=-1,
                               help="no local inference API (same as --http-port -1)")
    add_identity_arguments(p.add_argument_group("broker security"), "this device's")
