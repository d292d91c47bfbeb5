"""The layers of src/ only point down: import-linter checks the contract in pyproject.toml ([tool.importlinter])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_import_contract_holds() -> None:
    """`make test` runs `lint-imports` too; here a broken layer fails the suite however it is started."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.is_file(), f"{lint_imports} is missing: install the dev extra (pip install -e '.[dev]')"
    done = subprocess.run([lint_imports, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
