"""Coordinator checkpoints: the fp32 master, the server optimizer, the round, the history.

One `.npz` per completed round (arrays plus a JSON blob, read with allow_pickle=False),
written to a temp file, fsynced and renamed, so a crash or a full disk mid-write leaves
the previous checkpoint as it was. The newest `KEEP` are kept; loading falls back to an
older one when the newest is unreadable.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pqsu.protocol.atomic import atomic_file
from pqsu.protocol.errors import PqsuError

log = logging.getLogger(__name__)
KEEP = 2
_NAME = re.compile(r"^round-(\d{6})\.npz$")


class CheckpointError(PqsuError):
    """No usable checkpoint."""


@dataclass
class Checkpoint:
    round: int
    master: dict[str, np.ndarray]
    velocity: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # spec, model info, reports so far, config
    files: dict[str, bytes] = field(default_factory=dict)  # the downlink's versions by model id (patches' bases)


def save(directory: str | Path, ckpt: Checkpoint) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round-{ckpt.round:06d}.npz"
    arrays = {f"master/{k}": v for k, v in ckpt.master.items()}
    arrays.update({f"velocity/{k}": v for k, v in ckpt.velocity.items()})
    arrays.update({f"file/{k}": np.frombuffer(v, dtype=np.uint8) for k, v in ckpt.files.items()})
    arrays["meta"] = np.frombuffer(json.dumps({"round": ckpt.round, **ckpt.meta}).encode(), dtype=np.uint8)
    with atomic_file(path) as f:
        np.savez(f, **arrays)
    for old in _listed(directory)[KEEP:]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | Path) -> Checkpoint:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            master = {k[len("master/"):]: z[k] for k in z.files if k.startswith("master/")}
            velocity = {k[len("velocity/"):]: z[k] for k in z.files if k.startswith("velocity/")}
            files = {k[len("file/"):]: z[k].tobytes() for k in z.files if k.startswith("file/")}
    except Exception as exc:  # zipfile, json and numpy raise many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    if not master or not isinstance(meta.get("round"), int):
        raise CheckpointError(f"checkpoint {path} is incomplete")
    return Checkpoint(meta.pop("round"), master, velocity, meta, files)


def load_latest(directory: str | Path) -> Checkpoint | None:
    """The newest readable checkpoint, or None when the folder has none at all."""
    paths = _listed(Path(directory))
    for path in paths:
        try:
            return load(path)
        except CheckpointError as exc:
            log.error("%s; trying an older checkpoint", exc)
    if paths:
        raise CheckpointError(f"no readable checkpoint in {directory} ({len(paths)} damaged)")
    return None


def latest_job(directory: str | Path) -> str | None:
    """The job the newest readable checkpoint belongs to (its meta alone is read, not the weights),
    so a restarted coordinator knows before any work that it resumes its own job."""
    for path in _listed(Path(directory)):
        try:
            with np.load(path, allow_pickle=False) as z:
                job = json.loads(bytes(z["meta"]).decode()).get("job")
            return job if isinstance(job, str) and job else None
        except Exception:  # a damaged newest file: load_latest falls back the same way
            continue
    return None


def _listed(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), reverse=True)
