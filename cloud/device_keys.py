"""The fleet's device keys (`pqsu cloud --keys FILE`): who may take part, and the HMAC key that
authenticates each one's updates.

The file is JSON `{device id: hex key}`. `refresh()` re-reads it when it changed on disk (the
coordinator calls it at every round start), so removing a device from the file takes it out of
the fleet without restarting the coordinator: from the next round on it is not asked, and its
updates are refused as `unknown-device`. A file that cannot be read or parsed after a change
keeps the last valid keys (logged as an error, retried at the next check): a half-written edit
must not stop the fleet. Replace the file atomically (write a copy, rename it over) when you can.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.topics import TopicError, check_device

log = logging.getLogger(__name__)


def read_keys_file(path: str | Path) -> dict[str, bytes]:
    """{device: key} from a keys file, or PqsuError saying what is wrong with it."""
    try:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        keys = {check_device(d): bytes.fromhex(k) for d, k in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError, TopicError) as exc:
        raise PqsuError(f"device keys file {path} must be JSON {{device: hex key}}: {exc}") from None
    if empty := sorted(d for d, k in keys.items() if not k):
        raise PqsuError(f"device keys file {path}: empty key for {', '.join(empty)}")
    return keys


class DeviceKeys(Mapping[str, bytes]):
    """A read-only {device: key} mapping backed by a keys file; `refresh()` follows its changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._signature = self._stat()
        self._keys = read_keys_file(self.path)  # at start a bad file is an error, not a warning
        self._failed: tuple | None = None

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; True when the keys changed."""
        signature = self._stat()
        if signature == self._signature or (signature is not None and signature == self._failed):
            return False
        try:
            keys = read_keys_file(self.path)
        except PqsuError as exc:
            if signature != self._failed:  # once per version of the file, not at every round
                log.error("%s; keeping the %d keys read before", exc, len(self._keys))
            self._failed = signature
            return False
        self._signature, self._failed = signature, None
        removed, added = sorted(self._keys.keys() - keys.keys()), sorted(keys.keys() - self._keys.keys())
        changed = keys != self._keys
        self._keys = keys
        if changed:
            log.warning("device keys reloaded from %s: %d devices%s%s", self.path, len(keys),
                        f"; removed {', '.join(removed)}" if removed else "",
                        f"; added {', '.join(added)}" if added else "")
        return changed

    def __getitem__(self, device: str) -> bytes:
        return self._keys[device]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
