"""A user's model code in a bundle (`pqsu flash --model-code PATH --allow-model-code pkg.module:factory`).

A board that trains a custom architecture imports the user's module to rebuild the model it is sent.
The bundle carries that module (one .py file, or a package folder) under model-code/, agent.toml
puts that folder on the agent's import path (`model_code_dir`) and names the factories the agent may
import (`allow_model_code`): nothing else a model file names is ever imported on the board.

Checked before anything is written: the path is a .py file or a folder with Python files, every
allowed factory lives in the module or package shipped (or, without --model-code, is installed on the
board some other way), and only Python sources are copied (no caches, no hidden files, no symlinks).
That a factory is there is read from the module's source, not by importing it: flashing runs none
of the user's code.
"""
from __future__ import annotations

import ast
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pqsu.export.model_check import check_custom_name
from pqsu.protocol.errors import PqsuError
from pqsu.tools.flash.request import MODEL_CODE, FlashError


@dataclass(frozen=True)
class ModelCode:
    source: Path      # a .py file or a package folder on this machine
    name: str         # its import name on the board (the file's stem, or the folder's name)


def check_model_code(path: str | None, allowed: list[str], trains: bool) -> ModelCode | None:
    """The model code to ship, or None; a FlashError (one line) for anything a board could not import."""
    for arch in allowed:
        try:
            check_custom_name(arch)
        except PqsuError as exc:
            raise FlashError(f"--allow-model-code: {exc}") from None
    if (path or allowed) and not trains:
        raise FlashError("--model-code and --allow-model-code are for boards that train: an inference-only board "
                         "serves any model without its code")
    if path is None:
        return None
    if not allowed:
        raise FlashError(f"--model-code {path} needs --allow-model-code package.module:factory, the factory "
                         "the board may import from it")
    source = Path(path).expanduser().absolute()
    if source.is_file() and source.suffix == ".py":
        name = source.stem
    elif source.is_dir() and any(source.rglob("*.py")):
        name = source.name
    else:
        raise FlashError(f"--model-code {path}: give a .py file or a package folder holding .py files")
    if not name.isidentifier():
        raise FlashError(f"--model-code {path}: {name!r} is not an importable module name")
    outside = [arch for arch in allowed if arch.partition(":")[0].split(".")[0] != name]
    if outside:
        raise FlashError(f"--allow-model-code {outside[0]} is not in --model-code {path}, which the board imports "
                         f"as {name}")
    for arch in allowed:
        _check_defined(source, name, arch, path)
    return ModelCode(source, name)


def _check_defined(source: Path, name: str, arch: str, path: str) -> None:
    """A FlashError unless `arch`'s module is a file of the shipped code whose source defines its factory."""
    module, _, factory = arch.partition(":")
    parts = module.split(".")[1:]
    if source.is_file():
        candidates = [source] if not parts else []
    else:
        base = source.joinpath(*parts)
        candidates = [base.with_name(base.name + ".py"), base / "__init__.py"] if parts else [source / "__init__.py"]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise FlashError(f"--allow-model-code {arch}: --model-code {path} has no module {module}")
    try:
        tree = ast.parse(file.read_text(errors="replace"), str(file))
    except SyntaxError as exc:
        raise FlashError(f"--allow-model-code {arch}: {file} is not valid Python (line {exc.lineno}: {exc.msg})") \
            from None
    if not _may_define(tree.body, factory):
        raise FlashError(f"--allow-model-code {arch}: {file} defines no {factory}")


def _may_define(body: list[ast.stmt], name: str) -> bool:
    """True when top-level statements define `name`, or might (a star import, a module __getattr__)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in (name, "__getattr__"):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*" or (alias.asname or alias.name.split(".")[0]) == name:
                    return True
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        if any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t)):
            return True
        nested = [getattr(node, f, []) for f in ("body", "orelse", "finalbody")] + \
            [h.body for h in getattr(node, "handlers", [])]
        if isinstance(node, (ast.If, ast.Try, ast.With)) and any(_may_define(b, name) for b in nested):
            return True
    return False


def copy_model_code(code: ModelCode, bundle: Path) -> None:
    """model-code/<name>[.py] inside `bundle`: Python sources only, files 0644, folders 0755."""
    folder = bundle / MODEL_CODE
    folder.mkdir(mode=0o755)
    if code.source.is_file():
        _copy(code.source, folder / code.source.name)
        return
    for root, dirs, files in os.walk(code.source):  # os.walk does not follow symlinked folders
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                         and not os.path.islink(os.path.join(root, d)))
        rel = Path(root).relative_to(code.source)
        (folder / code.name / rel).mkdir(mode=0o755, exist_ok=True)
        for f in sorted(files):
            path = Path(root) / f
            if f.endswith(".py") and not f.startswith(".") and not path.is_symlink():
                _copy(path, folder / code.name / rel / f)
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        os.chmod(d, 0o755)


def _copy(source: Path, dest: Path) -> None:
    shutil.copyfile(source, dest)
    os.chmod(dest, 0o644)
