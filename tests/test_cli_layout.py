"""The command line lives beside the library, never inside its import path, and its
migrate command needs no extra."""

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
    # httpx loads its own command line (click, rich) when click is installed (Flask, a dev
    # extra, brings it): that import is httpx's, so click is hidden here.
    code = (
        "import sys; sys.modules['click'] = None;"
        "import fleetcache, fleetcache.definitions, fleetcache.definitions.testing;"
        "print(sorted(m for m in sys.modules if m.startswith(('fleetcache_cli', 'rich'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_migrate_needs_no_extra_and_the_others_say_which(database_url: str) -> None:
    """Without rich (the ``cli`` extra) ``fleetcache migrate`` still works, and ``demo``
    exits 2 naming the missing module and the extras to install."""
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "from fleetcache_cli import main\n"
        "print(main(['migrate', '--database-url', sys.argv[1]]))\n"
        "print(main(['demo', '--processes', '2']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, database_url],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.splitlines()[-2:] == ["0", "2"]
    assert "needs the module 'rich'" in done.stderr
    assert "fleetcache[embedded,definitions,cli]" in done.stderr
