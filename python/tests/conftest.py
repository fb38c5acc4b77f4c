"""Shared fixtures: the repository, the `attnc` binary, deterministic plans.

Plans depend on the cost model's machine ceilings; both the binary and the package read them
from `ATTNC_CEILINGS` first, so the tests fix them to the documented defaults before any kernel
is compiled (the package computes them once per process) and every subprocess inherits that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ["ATTNC_CEILINGS"] = "default"

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cli() -> Path:
    """The release `attnc` binary: `$ATTNC_CLI`, else the target directory's, else built now."""
    given = os.environ.get("ATTNC_CLI")
    if given:
        path = Path(given)
        assert path.is_file(), f"ATTNC_CLI={given} is not a file"
        return path
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    path = target / "release" / "attnc"
    if not path.is_file():
        cargo = shutil.which("cargo")
        if cargo is None:
            pytest.skip("no attnc binary (set ATTNC_CLI) and no cargo to build one")
        subprocess.run(
            [cargo, "build", "--release", "--bin", "attnc"], cwd=REPO, check=True
        )
    return path
