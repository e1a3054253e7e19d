"""The invalidation broadcast: payload format, strict parser, chunking and the publisher."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from fleetcache.notifications import (
    INVALIDATED_CHANNEL,
    Invalidation,
    PostgresInvalidationPublisher,
    encode_global_payload,
    encode_module_payloads,
    encode_realm_payload,
    parse_invalidation,
)

WAIT = 10.0  # generous bound on any wait; never an assertion about speed

# Names as they come: URLs, but also any non-empty text, non-ASCII included.
names_strategy = st.text(min_size=1, max_size=40)
namespaces_strategy = st.text(min_size=1, max_size=60)


def size(payload: str) -> int:
    """A payload's size as Postgres counts it: UTF-8 bytes."""
    return len(payload.encode())


def names_of(payloads: list[str]) -> list[str]:
    """Every name carried by a list of module payloads, in order."""
    out: list[str] = []
    for payload in payloads:
        parsed = parse_invalidation(payload)
        assert parsed is not None
        assert parsed.kind == "module"
        out.extend(parsed.names)
    return out


# ------------------------------------------------------------------ exact encodings


def test_module_payload_is_compact_json_with_keys_in_order() -> None:
    """A module payload is compact JSON, keys k, r, m in that order, non-ASCII unescaped."""
    assert encode_module_payloads("https://r/", ["a.gts", "é✓"]) == [
        '{"k":"module","r":"https://r/","m":["a.gts","é✓"]}'
    ]


def test_realm_and_global_payloads_are_exact() -> None:
    """The realm and global payloads have exactly the documented form."""
    assert encode_realm_payload("https://r/ü") == '{"k":"realm","r":"https://r/ü"}'
    assert encode_global_payload() == '{"k":"global"}'


def test_no_names_means_no_payloads() -> None:
    """Invalidating no names produces no payload (an empty 'm' is not a valid payload)."""
    assert encode_module_payloads("ns", []) == []


def test_encoded_payloads_match_json_dumps() -> None:
    """The hand-assembled payload equals json.dumps of the same object."""
    names = ['quote"d', "back\\slash", "nul\x00", "tab\t", "日本"]
    (payload,) = encode_module_payloads("ns", names)
    expected = json.dumps(
        {"k": "module", "r": "ns", "m": names}, separators=(",", ":"), ensure_ascii=False
    )
    assert payload == expected


# ------------------------------------------------------------------ parser


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ('{"k":"module","r":"ns","m":["a","b"]}', Invalidation("module", "ns", ("a", "b"))),
        ('{"k":"realm","r":"ns"}', Invalidation("realm", "ns")),
        ('{"k":"global"}', Invalidation("global")),
        ('{"k":"module","r":"ñ","m":["日本"]}', Invalidation("module", "ñ", ("日本",))),
        # Keys are found by name, and unknown keys (a newer peer's) are ignored.
        ('{"m":["a"],"r":"ns","k":"module","v":2}', Invalidation("module", "ns", ("a",))),
        ('{"k":"global","r":"ignored"}', Invalidation("global")),
    ],
)
def test_parser_accepts_each_valid_form(payload: str, expected: Invalidation) -> None:
    """Each documented payload form parses to the matching Invalidation."""
    assert parse_invalidation(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "{",
        "[123]",
        "[]",
        "123",
        "null",
        '"global"',
        "{}",
        '{"k":null}',
        '{"k":["global"]}',
        '{"K":"global"}',
        '{"k":"bogus","r":"ns"}',
        '{"k":"module"}',
        '{"k":"module","r":"ns"}',
        '{"k":"module","m":["a"]}',
        '{"k":"module","r":"","m":["a"]}',
        '{"k":"module","r":1,"m":["a"]}',
        '{"k":"module","r":"ns","m":[]}',
        '{"k":"module","r":"ns","m":"a"}',
        '{"k":"module","r":"ns","m":[""]}',
        '{"k":"module","r":"ns","m":["a",""]}',
        '{"k":"module","r":"ns","m":[1]}',
        '{"k":"module","r":"ns","m":["a",null]}',
        '{"k":"module","r":"ns","m":{"a":1}}',
        '{"k":"realm"}',
        '{"k":"realm","r":""}',
        '{"k":"realm","r":null}',
        '{"k":"realm","r":["ns"]}',
        "[" * 100_000,  # too deep even for the parser's recursion
    ],
)
def test_parser_rejects_malformed_payloads_with_a_warning(
    payload: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed payload returns None and logs one warning, never raising."""
    with caplog.at_level(logging.WARNING, logger="fleetcache.notifications"):
        assert parse_invalidation(payload) is None
    warnings = [r for r in caplog.records if r.name == "fleetcache.notifications"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert len(warnings[0].getMessage()) < 1000  # a huge payload is not logged in full


# ------------------------------------------------------------------ properties


@given(namespace=namespaces_strategy, names=st.lists(names_strategy, min_size=1, max_size=30))
def test_encode_then_parse_round_trips(namespace: str, names: list[str]) -> None:
    """Every encoded payload parses back to exactly what was encoded."""
    payloads = encode_module_payloads(namespace, names)
    assert len(payloads) == 1  # these lists fit one 7000-byte payload
    assert parse_invalidation(payloads[0]) == Invalidation("module", namespace, tuple(names))
    assert parse_invalidation(encode_realm_payload(namespace)) == Invalidation("realm", namespace)
    assert parse_invalidation(encode_global_payload()) == Invalidation("global")


@given(
    namespace=namespaces_strategy,
    names=st.lists(names_strategy, max_size=60),
    budget=st.integers(min_value=1, max_value=400),
)
def test_chunks_stay_under_budget_in_order_without_loss_or_duplicates(
    namespace: str, names: list[str], budget: int
) -> None:
    """Chunking keeps each payload under the byte budget (unless it holds one name that
    cannot fit alone), keeps the order, and loses or repeats no name; chunks are full."""
    payloads = encode_module_payloads(namespace, names, budget=budget)
    assert names_of(payloads) == names
    for payload in payloads:
        parsed = parse_invalidation(payload)
        assert parsed is not None
        assert parsed.namespace == namespace
        assert size(payload) < budget or len(parsed.names) == 1
    # Greedy: the next chunk's first name would not have fitted in the previous chunk.
    for before, after in itertools.pairwise(payloads):
        first, rest = parse_invalidation(before), parse_invalidation(after)
        assert first is not None
        assert rest is not None
        (merged,) = encode_module_payloads(namespace, [*first.names, rest.names[0]], budget=10**9)
        assert size(merged) >= budget


@given(names=st.lists(st.text(alphabet="é✓日a", min_size=1, max_size=300), min_size=1, max_size=80))
def test_default_budget_chunks_multibyte_names_under_7000_bytes(names: list[str]) -> None:
    """With the default budget, multi-byte names are chunked by bytes, not characters."""
    payloads = encode_module_payloads("https://realm.example/ü/", names)
    assert names_of(payloads) == names
    assert all(size(p) < 7000 for p in payloads)


def test_oversize_name_gets_a_payload_of_its_own() -> None:
    """A name too big for any payload is sent alone, between its neighbours' payloads."""
    huge = "x" * 500
    payloads = encode_module_payloads("ns", ["a", "b", huge, "c"], budget=100)
    assert [parse_invalidation(p) for p in payloads] == [
        Invalidation("module", "ns", ("a", "b")),
        Invalidation("module", "ns", (huge,)),
        Invalidation("module", "ns", ("c",)),
    ]
    assert size(payloads[1]) >= 100


def test_many_names_need_several_payloads_at_the_default_budget() -> None:
    """Thousands of URLs are split into several payloads, each under 7000 bytes."""
    names = [f"https://realm.example/dir/module-{i:05d}.gts" for i in range(2000)]
    payloads = encode_module_payloads("https://realm.example/", names)
    assert len(payloads) > 10
    assert all(size(p) < 7000 for p in payloads)
    assert names_of(payloads) == names


# ------------------------------------------------------------------ publisher (Postgres)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool[psycopg.AsyncConnection]]:
    """An open pool of autocommit connections to the test database."""
    made: AsyncConnectionPool[psycopg.AsyncConnection] = AsyncConnectionPool(
        database_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    )
    await made.open(wait=True)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def listening(database_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    """A plain connection LISTENing on the invalidated channel."""
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await conn.execute(f"LISTEN {INVALIDATED_CHANNEL}")
    try:
        yield conn
    finally:
        await conn.close()


async def received(conn: psycopg.AsyncConnection, count: int) -> list[str]:
    """Collect ``count`` payloads from a LISTENing connection (bounded wait)."""
    got: list[str] = []
    async for notify in conn.notifies(timeout=WAIT, stop_after=count):
        assert notify.channel == INVALIDATED_CHANNEL
        got.append(notify.payload)
    return got


async def nothing_more(conn: psycopg.AsyncConnection) -> list[str]:
    """Whatever else arrives within a short grace period (expected: nothing)."""
    return [n.payload async for n in conn.notifies(timeout=0.3)]


@pytest.mark.postgres
async def test_publisher_sends_payloads_as_encoded(
    pool: AsyncConnectionPool[psycopg.AsyncConnection], listening: psycopg.AsyncConnection
) -> None:
    """Each publisher method sends exactly the encoded payloads, in order."""
    publisher = PostgresInvalidationPublisher(pool, budget=200)
    names = [f"https://r/mod-{i}-ü.gts" for i in range(20)]
    module_payloads = encode_module_payloads("https://r/", names, budget=200)
    assert len(module_payloads) > 1
    await publisher.names_invalidated("https://r/", names)
    await publisher.namespace_cleared("https://r/")
    await publisher.all_cleared()
    expected = [*module_payloads, encode_realm_payload("https://r/"), encode_global_payload()]
    assert await received(listening, len(expected)) == expected


@pytest.mark.postgres
async def test_publisher_logs_and_survives_an_oversize_payload(
    pool: AsyncConnectionPool[psycopg.AsyncConnection],
    listening: psycopg.AsyncConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A payload Postgres refuses (over 8000 bytes) is logged with its size, not raised,
    and the other chunks of the same invalidation are still sent."""
    publisher = PostgresInvalidationPublisher(pool)
    huge = "h" * 9000
    with caplog.at_level(logging.WARNING, logger="fleetcache.notifications"):
        await publisher.names_invalidated("ns", ["before", huge, "after"])
    assert await received(listening, 2) == [
        encode_module_payloads("ns", ["before"])[0],
        encode_module_payloads("ns", ["after"])[0],
    ]
    (record,) = [r for r in caplog.records if r.name == "fleetcache.notifications"]
    huge_size = size(encode_module_payloads("ns", [huge])[0])
    assert f"{huge_size} bytes" in record.getMessage()


@pytest.mark.postgres
async def test_publisher_logs_and_survives_a_closed_pool(
    database_url: str, listening: psycopg.AsyncConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """Publishing on a closed pool logs one warning per payload and raises nothing."""
    closed: AsyncConnectionPool[psycopg.AsyncConnection] = AsyncConnectionPool(
        database_url, min_size=1, max_size=1, open=False
    )
    await closed.open(wait=True)
    await closed.close()
    publisher = PostgresInvalidationPublisher(closed)
    with caplog.at_level(logging.WARNING, logger="fleetcache.notifications"):
        await publisher.names_invalidated("ns", ["a"])
        await publisher.namespace_cleared("ns")
        await publisher.all_cleared()
    records = [r for r in caplog.records if r.name == "fleetcache.notifications"]
    assert len(records) == 3
    assert all("failed" in r.getMessage() for r in records)
    assert await nothing_more(listening) == []


@pytest.mark.postgres
async def test_publisher_works_on_a_pool_without_autocommit(
    database_url: str, listening: psycopg.AsyncConnection
) -> None:
    """On a pool whose connections are not autocommit the NOTIFY is still committed."""
    async with AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False) as tx_pool:
        await PostgresInvalidationPublisher(tx_pool).all_cleared()
        assert await received(listening, 1) == [encode_global_payload()]


@pytest.mark.postgres
async def test_publisher_uses_a_custom_channel(
    pool: AsyncConnectionPool[psycopg.AsyncConnection], database_url: str
) -> None:
    """A publisher built with another channel notifies on that channel."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("LISTEN other_channel")
        await PostgresInvalidationPublisher(pool, channel="other_channel").all_cleared()
        notifies = [n async for n in conn.notifies(timeout=WAIT, stop_after=1)]
        assert [(n.channel, n.payload) for n in notifies] == [
            ("other_channel", encode_global_payload())
        ]
