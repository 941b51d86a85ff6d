"""What goes into a bundle: agent.toml, the credentials, the requirements, the wheels, the scripts
and the manifest (bundle.json), written into a folder with each file's final mode."""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pqsu.protocol.mqtt import BrokerURL
from pqsu.tools.flash.model_code import copy_model_code
from pqsu.tools.flash.scripts import install_model_script, install_script, systemd_unit
from pqsu.tools.flash.request import (BUNDLE_DIR, BUNDLE_MODEL_FILE, CONFIG_PATH, CREDENTIALS_DIR, STATE_MODEL_FILE,
                                      UNIT_NAME, VENV_DIR, FlashRequest)
from pqsu.tools.flash.wheels import (PROJECT_NAME, build_project_wheel, download_wheelhouse, resolve_wheelhouse,
                               source_tree, verify_wheelhouse)

log = logging.getLogger(__name__)


# -- file contents ----------------------------------------------------------------------------
def agent_settings(req: FlashRequest) -> dict:
    """The agent's settings as agent.toml holds them (flat, keys as `pqsu edge run` flags, plus the
    profile's [board] table): written from the typed settings, so the board reads back the same."""
    settings, keys = req.agent_settings()
    return settings.to_mapping(keys)


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


def requirements_txt(req: FlashRequest) -> str:
    head = [f"# pinned requirements of board {req.board.name} (Python {req.python}), written by pqsu flash"]
    if req.uses_torch_index:
        head.append(f"# torch comes from {req.torch_index}")
    return "\n".join(head + req.requirements()) + "\n"


def nodeps_txt(req: FlashRequest) -> str:
    head = ["# installed with --no-deps after requirements.txt (their dependencies are pinned there)"]
    return "\n".join(head + req.nodeps()) + "\n"


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
    if req.model_code is not None:
        copy_model_code(req.model_code, folder)
    if req.model:  # verified when the request was made: these are the bytes that verified
        _write(folder / BUNDLE_MODEL_FILE, req.model.file.data, 0o644)
        _write(folder / "install-model.sh", install_model_script(req, created).encode(), 0o755)
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
        "model_code": req.model_code.name if req.model_code else None,
        "paths": {"bundle": BUNDLE_DIR, "venv": VENV_DIR, "config": CONFIG_PATH, "credentials": CREDENTIALS_DIR,
                  "state_dir": req.state_dir, "data": req.data, "unit": f"/etc/systemd/system/{UNIT_NAME}"},
        "files": {rel: {"mode": f"{mode:04o}", "size": size, "sha256": _sha256(folder / rel)}
                  for rel, mode, size in files if rel and not rel.endswith("/")},
    }
    if req.model:
        manifest["model"] = {"model_id": req.model.model_id, "bytes": len(req.model.file), "source": req.model.source,
                             "file": BUNDLE_MODEL_FILE, "installed_to": f"{req.state_dir}/{STATE_MODEL_FILE}"}
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
