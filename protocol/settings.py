"""Settings files for the commands: a flat TOML or JSON table, keys named like the flags."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pqsu.protocol.errors import PqsuError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Jetson JetPack 6): the backport has the same API
    import tomli as tomllib


def read_settings(path: str | Path) -> dict:
    """A flat table of settings from a TOML or JSON file (keys as the flags, with underscores)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PqsuError(f"cannot read settings file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise PqsuError(f"settings file {path} does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise PqsuError(f"settings file {path} must hold a table of settings")
    return {k.replace("-", "_"): v for k, v in data.items()}
