"""The demo end to end, small: real worker processes on the test database."""

from __future__ import annotations

import json

import pytest

from fleetcache_cli import main
from fleetcache_cli.demo import build_graph

pytestmark = pytest.mark.processes


def test_small_demo_coalesces_and_its_invalidation_act_holds(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With coordination each module is rendered once (without it, at most once per
    process), on Postgres and on the embedded sqlite file, the invalidation act, near tier
    on, leaves every process on the new version with no stale row and no stale read, and
    the transaction act (a row change and its invalidation in one transaction) has no
    stale read."""
    status = main(
        [
            "demo",
            "--json",
            "--processes",
            "3",
            "--modules",
            "10",
            "--latency-ms",
            "100",
            "--database-url",
            database_url,
        ]
    )
    captured = capsys.readouterr()
    assert captured.out, f"the demo printed no report (status {status}): {captured.err}"
    report = json.loads(captured.out)
    assert report["problems"] == []
    assert status == 0
    plain, coordinated = report["runs"]["uncoordinated"], report["runs"]["coordinated"]
    assert coordinated["max_per_module"] == 1
    assert coordinated["duplicates"] == 0
    # What the demo guarantees without coordination: every module rendered, by each process
    # at most once (its own single flight). How many processes found a row another had
    # already written is up to the scheduler, so the total is a range, not 3x.
    assert plain["modules_rendered"] == coordinated["modules_rendered"]
    assert coordinated["prerenders"] <= plain["prerenders"] <= 3 * coordinated["prerenders"]
    assert plain["max_per_module"] <= 3
    assert coordinated["errors"] == plain["errors"] == 0
    # The same fleet on the embedded sqlite file (no server): each module rendered once.
    local = report["runs"]["sqlite"]
    assert local["max_per_module"] == 1
    assert local["prerenders"] == local["modules_rendered"] == coordinated["modules_rendered"]
    assert local["errors"] == 0
    # From the processes' Prometheus scrapes: one stored computation per module in the
    # fleet with coordination, and only then do lookups wait for another process.
    assert coordinated["computations"] == 10
    assert plain["computations"] >= 10
    assert plain["waited_for_another_process"] == 0
    act = report["act"]
    assert act["stale_rows"] == []
    assert set(act["rerendered"].values()) == {1}
    assert all(versions == [act["new_version"]] for versions in act["versions_seen"])
    assert act["stale_reads"] == 0
    assert act["leaf_reads"] > 0
    assert act["near_hits"] > 0  # the near tier served reads from memory
    txn = report["txn_act"]
    assert txn["reads"] > 0
    assert txn["stale_reads"] == 0  # the row change and its invalidation commit together


def test_graph_has_realms_failures_and_extensionless_requests() -> None:
    """The default graph: 40 modules in a public and a private realm, two failing modules,
    imports between modules, some requested without extension, and a leaf with dependents."""
    graph = build_graph(40, "run")
    assert len(graph.files) == 40
    assert [realm.visibility for realm in graph.realms] == ["public", "private"]
    assert len(graph.failing) == 2
    assert all(graph.dependents_of(failing) for failing in graph.failing)
    assert any(spec.imports for spec in graph.files.values())
    assert any(not request.endswith((".gts", ".ts")) for request in graph.requests)
    assert graph.dependents_of(graph.leaf)
    assert not graph.dependents_of(graph.leaf) & set(graph.failing)
