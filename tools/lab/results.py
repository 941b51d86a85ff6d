"""The results runner that `pqsu bench` and `pqsu reliability` share.

Both choose sections (bench calls them suites) by name, measure each into one JSON file under
`--out`, keeping the sections an earlier run measured there, write the file after every section
(a later failure keeps the others), stamp each with how long it took and when, render markdown
from the merged file, and with `--docs` regenerate a docs file and a README block between markers.
What differs (the sections, the file name, the markdown, the checks) stays in each command.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable, Iterable

from pqsu.protocol.errors import PqsuError

log = logging.getLogger(__name__)


def choose(names: Iterable[str], known: Iterable[str], what: str) -> list[str]:
    """`names` in order, each once; an unknown one is a one-line error listing the choices."""
    names, known = list(names), list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PqsuError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def out_folder(out: str | None, kind: str) -> Path:
    """--out, or runs/<kind>-<today>."""
    return Path(out or f"runs/{kind}-{dt.date.today().isoformat()}")


def machine() -> dict:
    return {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count()}


def load(path: Path, *, required: bool = False) -> dict:
    """The merged results in `path` ({} if there are none yet); `required`: for --render, which has
    nothing to render without them."""
    if not path.is_file():
        if required:
            raise PqsuError(f"--render: {path} does not exist; run the sections into {path.parent} first")
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PqsuError(f"{path} is not readable JSON ({exc}); move it away or choose another --out") from None


def save(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")


def measure(name: str, fn: Callable[[], dict], *, record_errors: bool, **stamps) -> dict:
    """fn()'s section, stamped with `seconds`, `stamps` and `measured_at`. With record_errors, a
    section that raises is recorded with its error (and the others still run) instead of ending the run."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - reported in the results, never hidden
        if not record_errors:
            raise
        log.exception("section %s failed", name)
        result = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    result.update(stamps, measured_at=dt.datetime.now().isoformat(timespec="minutes"))
    return result


def run_sections(path: Path, results: dict, names: list[str], section: Callable[[str], dict], *,
                 what: str = "section", record_errors: bool = False, stamps: dict | None = None,
                 after: Callable[[str], None] | None = None) -> dict:
    """Measure each of `names` with `section(name)` into `results`, saving `path` after each one."""
    for i, name in enumerate(names, 1):
        log.info("%s %s (%d of %d)", what, name, i, len(names))
        results[name] = measure(name, lambda: section(name), record_errors=record_errors, **(stamps or {}))
        save(path, results)
        if after:
            after(name)
    return results


def replace_block(text: str, block: str, begin: str, end: str, where: str = "README.md") -> str:
    """`text` with what lies between the `begin` and `end` markers replaced by `block`."""
    b, e = text.find(begin), text.find(end)
    if b < 0 or e < b:
        raise PqsuError(f"{where} has no {begin} ... {end} block to regenerate")
    return text[:b + len(begin)] + "\n" + block + text[e:]


def write_docs(doc: Path, text: str, readme: Path | None = None, block: str | None = None,
               markers: tuple[str, str] | None = None) -> None:
    """--docs: `doc` rewritten with `text`; and, when it exists, only `readme`'s block between `markers`."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    if readme is not None and block is not None and markers and readme.exists():
        readme.write_text(replace_block(readme.read_text(), block, *markers))
