"""`attnflow --version` and `import attnflow` answer without importing torch (seconds on a busy machine)."""
from __future__ import annotations

import subprocess
import sys


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_version_without_torch():
    out = run("import sys; sys.argv = ['attnflow', '--version']\n"
              "from attnflow.launch import main; main(); print('torch' in sys.modules)")
    assert out.splitlines() == [f"attnflow {__import__('attnflow').__version__}", "False"]


def test_package_imports_lazily_and_exports_everything():
    out = run("import sys, attnflow; print('torch' in sys.modules); print(attnflow.open_cache.__module__, "
              "attnflow.AttentionCapture.__module__); print(sorted(set(attnflow.__all__) - set(dir(attnflow))))")
    assert out.splitlines() == ["False", "attnflow.store.read attnflow.capture", "[]"]
