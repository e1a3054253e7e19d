"""The command line lives beside the library, never inside its import path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fleetcache


def test_the_library_never_imports_the_command_line() -> None:
    """No module under ``fleetcache`` names ``fleetcache_cli``, and importing the library
    with every optional layer loads none of the command line (nor rich)."""
    root = Path(fleetcache.__file__).parent
    assert not (root / "cli").exists()
    offenders = [p for p in root.rglob("*.py") if "fleetcache_cli" in p.read_text()]
    assert offenders == []
    code = (
        "import sys, fleetcache, fleetcache.definitions, fleetcache.definitions.simulated;"
        "print(sorted(m for m in sys.modules if m.startswith(('fleetcache_cli', 'rich'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
