"""The house's layers (docs/ARCHITECTURE.md) hold: import-linter's contracts from pyproject.toml.

The second test proves the contracts can fail: a copy of the package with `import kit.cli` in a
core module must be refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(project))
    return subprocess.run([str(LINT_IMPORTS), "--config", str(project / "pyproject.toml"), "--no-cache"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_a_core_module_importing_the_cli_breaks_the_contracts(tmp_path):
    shutil.copytree(ROOT / "kit", tmp_path / "kit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    units = tmp_path / "kit" / "units.py"
    units.write_text(units.read_text() + "\nimport kit.cli  # noqa: E402,F401 - the circle this test makes\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and "kit.units -> kit.cli" in done.stdout, done.stdout[-4000:]
