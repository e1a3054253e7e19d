"""The public surface: what ``fleetcache`` and ``fleetcache.definitions`` export is what the
README's reference lists, the internal packages export nothing, and the verbs of an open
cache are methods ``help()`` shows."""

from __future__ import annotations

import importlib
import inspect
import pydoc
import re
from pathlib import Path

import pytest

import fleetcache
import fleetcache.definitions

README = Path(__file__).resolve().parent.parent / "README.md"

VERBS = (
    "get",
    "get_value",
    "peek",
    "set",
    "delete",
    "invalidate",
    "clear_namespace",
    "clear_all",
    "cached",
    "stats",
    "close",
)


def listed(heading: str) -> list[str]:
    """The names the README's reference lists under ``heading`` (its bullets' first
    backticked word)."""
    text = README.read_text()
    start = text.index(f"### {heading}\n")
    end = text.find("\n#", start + 1)
    section = text[start : end if end != -1 else None]
    return re.findall(r"^- `(\w+)", section, flags=re.MULTILINE)


def test_help_on_fleetcache_lists_every_verb_as_a_documented_method() -> None:
    """help(fleetcache.Fleetcache) shows every verb: each is a function of the class (not
    a bound method copied onto an instance), typed and documented."""
    shown = pydoc.render_doc(fleetcache.Fleetcache, renderer=pydoc.plaintext)
    for verb in VERBS:
        method = inspect.getattr_static(fleetcache.Fleetcache, verb)
        assert inspect.isfunction(method), verb
        assert method.__doc__, verb
        assert "return" in method.__annotations__, verb
        assert re.search(rf"^ \|  (async )?{verb}\(self", shown, flags=re.MULTILINE), verb


def test_the_top_level_exports_are_the_documented_ones() -> None:
    """``fleetcache.__all__`` is exactly the README's list, sorted as ruff keeps it, each
    name documented; ``open`` is public but kept out of ``__all__``."""
    assert sorted(fleetcache.__all__) == sorted(listed("`fleetcache`"))
    assert "open" not in fleetcache.__all__
    assert callable(fleetcache.open)
    for name in fleetcache.__all__:
        assert getattr(fleetcache, name).__doc__, name


def test_the_definitions_exports_are_the_documented_ones() -> None:
    """``fleetcache.definitions.__all__`` is exactly the README's list."""
    assert sorted(fleetcache.definitions.__all__) == sorted(listed("`fleetcache.definitions`"))


@pytest.mark.parametrize(
    "package", ["fleetcache.stores", "fleetcache.lookup", "fleetcache.coordination"]
)
def test_internal_packages_export_nothing(package: str) -> None:
    """The internal layers re-export nothing at their package level: their names are
    reached through their modules, and the public ones through ``fleetcache``."""
    module = importlib.import_module(package)
    assert not hasattr(module, "__all__")
    public = [
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    ]
    assert public == []
