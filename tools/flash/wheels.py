"""The wheels of a bundle, made with pip: the fl-pqsu wheel built from this source tree, and the
board's pinned wheelhouse downloaded (or, for a dry run, only resolved) for the board's platform."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from configparser import ConfigParser
from pathlib import Path

from pqsu.tools.flash.request import FlashError, FlashRequest

log = logging.getLogger(__name__)

PROJECT_NAME = "fl-pqsu"


def source_tree() -> Path:
    """The repository root of the running fl-pqsu (setup.cfg next to the package folders)."""
    root = Path(__file__).resolve().parents[2]  # tools/flash/wheels.py
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
