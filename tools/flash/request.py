"""What one `pqsu flash` is for: the board, the device's settings and credentials, the target,
and the paths the bundle installs to on the board.

The request is checked when it is made (tools/flash/command.py, from the command line), so everything
after it (building, placing) may take it as valid.
"""
from __future__ import annotations

import dataclasses
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pqsu.edge.settings import AgentSettings
from pqsu.protocol.errors import PqsuError
from pqsu.tools.flash.boards import BoardProfile

if TYPE_CHECKING:
    from pqsu.tools.flash.model_code import ModelCode
    from pqsu.tools.flash.model import FlashedModel

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
MODEL_CODE = "model-code"                     # the user's model code, inside the bundle (tools/flash/model_code.py)
MODEL_CODE_DIR = f"{BUNDLE_DIR}/{MODEL_CODE}"
# The model the agent loads at start, inside its state dir (edge/agent.py MODEL_FILE; not imported from
# there, which would load onnxruntime to build a parser), and the flashed copy in the bundle.
STATE_MODEL_FILE = "model.onnx"
BUNDLE_MODEL_FILE = "model.onnx"


class FlashError(PqsuError):
    """The bundle could not be built or put in place; the target is left as it was."""


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
    model_code: "ModelCode | None" = None      # the user's architecture, shipped for the agent to import
    allow_model_code: tuple[str, ...] = ()     # the factories the agent may import (from model_code or installed)
    model: "FlashedModel | None" = None        # the fleet's current model, installed as the agent's first
    flash_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        self.agent_settings()  # a mistyped or unknown --set fails here, before anything is built

    def agent_settings(self) -> tuple[AgentSettings, list[str]]:
        """The board's agent settings, and the keys its agent.toml spells out (the others keep their
        defaults): the device's, the profile's hints and --set, typed and checked like `pqsu edge run`
        checks them."""
        b = self.board
        values: dict = {"broker": self.broker, "device_id": self.device_id, "fleet": self.fleet, "data": self.data,
                        "state_dir": self.state_dir, "stay": True, "providers": list(b.providers),
                        "inference_threads": b.inference_threads, "torch_threads": b.torch_threads}
        if not self.trains:
            values["inference_only"] = True
        for key, (name, _) in self.credentials.items():
            values[key] = f"{CREDENTIALS_DIR}/{name}"
        if self.username:
            values["username"] = self.username
        if self.http_port is not None:
            values["http_port"] = self.http_port
        if self.allow_model_code:
            values["allow_model_code"] = list(self.allow_model_code)
        if self.model_code is not None:
            values["model_code_dir"] = MODEL_CODE_DIR
        AgentSettings.from_mapping(self.extra_settings, "--set")  # names the flag, not the file, in an error
        values.update(self.extra_settings)
        values["board"] = {"name": b.name, "max_epochs": b.max_epochs, "max_batch_size": b.max_batch_size,
                           "time_budget_s": b.time_budget_s}
        settings = AgentSettings.from_mapping(values, "agent settings")
        # The credentials' paths are the board's, not this machine's: they are checked when copied.
        problems = dataclasses.replace(settings, password_file=None, model_code_dir=None).problems(trains=self.trains)
        if problems:
            raise FlashError(f"agent settings: {'; '.join(problems)}")
        return settings, list(values)

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
