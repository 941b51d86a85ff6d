"""Shared by the flash tests: one fl-pqsu wheel built from this tree for the whole session."""
from __future__ import annotations

from pathlib import Path

import pytest

from pqsu.tools.flash import wheels as wheels_mod


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    return wheels_mod.build_project_wheel(tmp_path_factory.mktemp("wheel"))
